"""Structured logs: JSON lines with request-scoped context merged from contextvars.

The server interceptor opens a `request_log_context` per call (rpc, request id, and for API-key
callers the environment id); handlers add what they learn with `bind_request(environment_id=...,
batch_id=...)`. Everything bound is reset when the call ends.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import Any, Literal

import structlog

# Whether configure_logging asked for debug lines: the interceptor then logs every call
# ("rpc handled"). Off when logging was never configured (in-process tests, libraries).
_calls_logged = False

# The tokens bound during the current call, reset in reverse when it ends.
_bound: ContextVar[list[Mapping[str, Token[Any]]] | None] = ContextVar(
    "runops_log_bound", default=None
)


@contextmanager
def request_log_context(**values: object) -> Iterator[None]:
    """Binds `values` (None skipped) for the call's log lines, and resets them, and whatever
    `bind_request` added, when the call ends."""
    bound = [structlog.contextvars.bind_contextvars(**_present(values))]
    marker = _bound.set(bound)
    try:
        yield
    finally:
        _bound.reset(marker)
        for tokens in reversed(bound):
            structlog.contextvars.reset_contextvars(**tokens)


def bind_request(
    *, environment_id: str | None = None, batch_id: str | None = None, **more: object
) -> None:
    """Adds ids to every log line of the RPC being handled (spec §0: env id, batch id), from
    the moment a handler knows them; None values are skipped. Reset when the call ends."""
    tokens = structlog.contextvars.bind_contextvars(
        **_present({"environment_id": environment_id, "batch_id": batch_id, **more})
    )
    bound = _bound.get()
    if bound is not None:
        bound.append(tokens)


def calls_logged() -> bool:
    """True when the process logs at debug level: one "rpc handled" line per call."""
    return _calls_logged


def _present(values: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in values.items() if v is not None and v != ""}


def configure_logging(
    level: str = "info", fmt: Literal["json", "console"] = "json", service: str | None = None
) -> None:
    global _calls_logged
    numeric = logging.getLevelNamesMapping()[level.upper()]
    _calls_logged = numeric <= logging.DEBUG
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )

    def add_service(
        _logger: object, _method: str, event: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        if service:
            event.setdefault("service", service)
        return event

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_service,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries that log through stdlib logging end up on stderr at the same level.
    logging.basicConfig(
        level=numeric, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s"
    )
