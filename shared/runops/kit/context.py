"""Request-scoped state shared by the server interceptor, handlers and outgoing channels."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from enum import Enum
from typing import Any

import grpc


class Caller(Enum):
    ANONYMOUS = "anonymous"
    INTERNAL = "internal"
    ADMIN = "admin"
    API_KEY = "api_key"


@dataclass(frozen=True)
class Principal:
    """Who is calling. For API_KEY callers `subject` is whatever the service's resolver returned
    (for runops services: the control plane's Environment message)."""

    caller: Caller
    subject: Any = None


ANONYMOUS = Principal(Caller.ANONYMOUS)

current_principal: ContextVar[Principal] = ContextVar("runops_principal", default=ANONYMOUS)
current_request_id: ContextVar[str | None] = ContextVar("runops_request_id", default=None)
# The server-side context of the RPC being handled: outgoing calls inherit its deadline.
current_server_context: ContextVar[grpc.aio.ServicerContext[Any, Any] | None] = ContextVar(
    "runops_server_context", default=None
)


def remaining_deadline() -> float | None:
    """Seconds left before the RPC being handled times out, or None when it has no deadline."""
    ctx = current_server_context.get()
    if ctx is None:
        return None
    remaining = ctx.time_remaining()
    return None if remaining is None else max(remaining, 0.0)
