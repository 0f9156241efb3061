"""Structured logs: JSON lines with request-scoped context merged from contextvars.

The server interceptor opens a `request_log_context` per call (rpc, request id) and binds the
call's ids into it (`runops.kit.log_ids`: the API key's environment, then the ids the request
and the answer hold); handlers bind nothing. Everything bound is reset when the call ends.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Mapping
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

# Whether configure_logging asked for debug lines: the interceptor then logs every call
# ("rpc handled"). Off when logging was never configured (in-process tests, libraries).
_calls_logged = False


@dataclass
class _CallLog:
    """What the current call bound: the keys, and the tokens reset in reverse when it ends."""

    keys: set[str] = field(default_factory=set)
    tokens: list[Mapping[str, Token[Any]]] = field(default_factory=list)


_call: ContextVar[_CallLog | None] = ContextVar("runops_log_call", default=None)


@contextmanager
def request_log_context(**values: object) -> Iterator[None]:
    """Binds `values` (None and "" skipped) for the call's log lines, and resets them, and
    whatever `bind_new` added, when the call ends."""
    opened = open_call_log(values)
    try:
        yield
    finally:
        close_call_log(opened)


def open_call_log(values: Mapping[str, object]) -> Token[_CallLog | None]:
    """`request_log_context` without the context manager (the server interceptor's per-call
    path): binds `values`; `close_call_log` with what this returns resets everything bound."""
    marker = _call.set(_CallLog())
    bind_new(values)
    return marker


def close_call_log(marker: Token[_CallLog | None]) -> None:
    call = _call.get()
    _call.reset(marker)
    if call is not None:
        for tokens in reversed(call.tokens):
            structlog.contextvars.reset_contextvars(**tokens)


def bind_new(values: Mapping[str, object]) -> None:
    """Adds `values` to the current call's log lines, but only keys the call has not bound yet:
    the first source of an id wins. None and "" are skipped; outside a call, nothing is bound."""
    call = _call.get()
    if call is None:
        return
    fresh = {k: v for k, v in values.items() if v is not None and v != "" and k not in call.keys}
    if fresh:
        call.tokens.append(structlog.contextvars.bind_contextvars(**fresh))
        call.keys.update(fresh)


def bound_keys() -> AbstractSet[str]:
    """The keys the current call's log lines carry (none outside a call)."""
    call = _call.get()
    return frozenset() if call is None else call.keys


def calls_logged() -> bool:
    """True when the process logs at debug level: one "rpc handled" line per call."""
    return _calls_logged


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
