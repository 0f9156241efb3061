"""The one server interceptor every service runs: request context, auth, input checks, metrics,
error mapping.

grpc.aio interceptors see a method handler, not the call; so this wraps each handler's
behaviour (all four RPC kinds) in `_call_scope`, which binds structlog context, authenticates,
counts the call and turns exceptions into rich statuses. Then, before the handler, every request
message passes `request_checks.check_request` (strings, Durations, Timestamps) and has its ids
bound to the call's log lines (`log_ids.bind_ids`: environment, batch, run; a unary answer's
too, when calls are logged); a stream's messages each as the handler reads them.

Access fails closed: a method whose access level is not declared (or not known at all) is
refused with PERMISSION_DENIED `ACCESS_NOT_DECLARED`, never served as PUBLIC.

Each handler's request deserializer is wrapped: bytes that are not a valid message (a DecodeError,
invalid UTF-8 in a string) become INVALID_ARGUMENT `MALFORMED_REQUEST` rather than grpc's
UNKNOWN naming a Python class.

A client stream is answered only once the client has finished sending (`_ClientStream.finish`):
grpc's asyncio client turns a write that fails because the server already answered into
`INTERNAL: Internal error from Core`, overwriting the status the server sent (grpc/grpc#36066).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextvars import Token
from types import TracebackType
from typing import Any

import grpc
import structlog

from runops.kit import metrics
from runops.kit.auth import Access, Authenticator
from runops.kit.context import (
    Caller,
    Principal,
    current_principal,
    current_request_id,
    current_server_context,
)
from runops.kit.errors import Internal, InvalidArgument, PermissionDenied, RunopsError, rich_status
from runops.kit.log_ids import bind_ids
from runops.kit.logging import bind_new, calls_logged, close_call_log, open_call_log
from runops.kit.request_checks import check_request

log = structlog.get_logger("runops.rpc")

# How much of a client stream the kit reads, and for how long, before answering it early
# (an error, or a handler that stopped reading): a client still sending gets to its half-close
# and then the answer. Past either bound the answer goes out anyway.
DRAIN_SECONDS = 2.0
DRAIN_MAX_BYTES = 64 * 1024 * 1024

# Turns a dependency's exception into a domain error (e.g. lost connection -> UNAVAILABLE);
# returns None for exceptions it does not know.
ErrorMapper = Callable[[BaseException], RunopsError | None]
Context = grpc.aio.ServicerContext[Any, Any]


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


class _Malformed:
    """Stands in for a request whose bytes did not parse; the call then fails INVALID_ARGUMENT
    inside the call scope (after authentication, counted, logged like any other refusal)."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    type_name = str(getattr(descriptor, "full_name", "") or "the request message")

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # DecodeError (invalid UTF-8 included), whatever a codec raises
            return _Malformed(type_name)

    return deserialize


def _checked(request: Any) -> Any:
    """The request, once it parsed and passed the kit's input check; its ids are bound to the
    call's log lines."""
    if isinstance(request, _Malformed):
        raise InvalidArgument(
            f"the request is not a valid {request.type_name} message", reason="MALFORMED_REQUEST"
        )
    if hasattr(request, "DESCRIPTOR"):
        check_request(request)
        bind_ids(request)
    return request


def _answered(response: Any) -> Any:
    """A unary answer; when calls are logged, its ids (one the handler minted, say) join the
    call's closing line."""
    if calls_logged() and hasattr(response, "DESCRIPTOR"):
        bind_ids(response)
    return response


def _kind(handler: Any) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


class _MethodMetrics:
    """One method's metric children, resolved once: `labels()` costs more than the increment."""

    def __init__(self, labels: tuple[str, str, str]) -> None:
        self.labels = labels
        self.started = metrics.STARTED.labels(*labels)
        self.seconds = metrics.HANDLING_SECONDS.labels(*labels)
        self.sent = metrics.MSG_SENT.labels(*labels)
        self.received = metrics.MSG_RECEIVED.labels(*labels)
        self._handled: dict[grpc.StatusCode, Any] = {}

    def handled(self, code: grpc.StatusCode) -> Any:
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = metrics.HANDLED.labels(*self.labels, code.name)
        return child


class ServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        authenticator: Authenticator,
        access: Mapping[str, Access | None],
        error_mappers: Sequence[ErrorMapper] = (),
    ) -> None:
        # access: full method name ("/pkg.Service/Method") -> level; None or absent: refused.
        self._auth = authenticator
        self._access = dict(access)
        self._mappers = tuple(error_mappers)
        # grpc hands us the same handler object for a method every call: wrap it once.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        # Handlers are typed loosely: the grpc stubs describe the sync API's behaviours.
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method, self._access.get(method))
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: Any, method: str, access: Access | None) -> Any:
        kind = _kind(handler)
        scope = self._call_scope
        service, name = _split(method)
        labels = _MethodMetrics((kind, service, name))
        deserialize = _tolerant(handler.request_deserializer)
        if access is None:
            log.warning("method declares no access level: refusing it", rpc=method)

        if kind == "unary":
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: Context) -> Any:
                async with scope(method, labels, access, context):
                    return _answered(await inner_uu(_checked(request), context))

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, deserialize, handler.response_serializer
            )
        if kind == "client_stream":
            inner_su = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[Any], context: Context) -> Any:
                stream = _ClientStream(requests, labels)
                async with scope(method, labels, access, context, stream):
                    return _answered(await inner_su(stream, context))

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, deserialize, handler.response_serializer
            )
        if kind == "server_stream":
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: Context) -> AsyncIterator[Any]:
                async with scope(method, labels, access, context):
                    async for response in _responses(inner_us(_checked(request), context)):
                        labels.sent.inc()
                        yield response

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, deserialize, handler.response_serializer
            )
        inner_ss = handler.stream_stream

        async def stream_stream(
            requests: AsyncIterator[Any], context: Context
        ) -> AsyncIterator[Any]:
            stream = _ClientStream(requests, labels)
            async with scope(method, labels, access, context, stream):
                async for response in _responses(inner_ss(stream, context)):
                    labels.sent.inc()
                    yield response

        return grpc.stream_stream_rpc_method_handler(
            stream_stream, deserialize, handler.response_serializer
        )

    def _map(self, exc: BaseException) -> RunopsError | None:
        if isinstance(exc, RunopsError):
            return exc
        for mapper in self._mappers:
            mapped = mapper(exc)
            if mapped is not None:
                return mapped
        return None

    def _call_scope(
        self,
        method: str,
        labels: _MethodMetrics,
        access: Access | None,
        context: Context,
        stream: _ClientStream | None = None,
    ) -> _CallScope:
        return _CallScope(self, method, labels, access, context, stream)


class _CallScope:
    """One call's scope (`async with`): request context and log context bound, the caller
    authenticated, the call counted and timed; an exception leaving it becomes a rich status,
    sent (like an early answer) once a client stream has been read to its end.
    A class rather than an @asynccontextmanager: it is entered on every call, and a generator
    per call costs more than the rest of it."""

    __slots__ = (
        "_access", "_context", "_interceptor", "_labels", "_log", "_method", "_principal_token",
        "_request_id", "_started", "_stream", "_tokens",
    )  # fmt: skip

    def __init__(
        self,
        interceptor: ServerInterceptor,
        method: str,
        labels: _MethodMetrics,
        access: Access | None,
        context: Context,
        stream: _ClientStream | None,
    ) -> None:
        self._interceptor = interceptor
        self._method = method
        self._labels = labels
        self._access = access
        self._context = context
        self._stream = stream

    async def __aenter__(self) -> None:
        context, method = self._context, self._method
        metadata = dict(context.invocation_metadata() or ())
        request_id = self._request_id = str(metadata.get("x-request-id") or os.urandom(16).hex())
        self._tokens = (
            current_request_id.set(request_id),
            current_server_context.set(context),
        )
        self._principal_token: Token[Principal] | None = None
        self._started = time.perf_counter()
        self._labels.started.inc()
        self._log = open_call_log({"rpc": method, "request_id": request_id})
        try:
            if self._access is None:
                raise PermissionDenied(
                    f"{method} declares no access level; the server refuses it",
                    reason="ACCESS_NOT_DECLARED",
                )
            principal = await self._interceptor._auth.authenticate(self._access, metadata)
            self._principal_token = current_principal.set(principal)
            if principal.caller is Caller.API_KEY:
                # API-key subjects are environments (the control plane's Environment).
                env_id = getattr(principal.subject, "id", None)
                bind_new({"environment_id": env_id if isinstance(env_id, str) else None})
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise

    async def __aexit__(
        self,
        _type: type[BaseException] | None,
        exc: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        code = grpc.StatusCode.OK
        context = self._context
        try:
            if exc is None:
                if self._stream is not None:
                    await self._stream.finish(context)
                return
            if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                # The client went away, or the server cancelled the RPC at the end of the grace
                # period; a stream's consumer closing the generator lands here too.
                code = grpc.StatusCode.CANCELLED
                return
            if _is_abort(exc):
                code = _context_code(context)
                return
            err = self._interceptor._map(exc)
            if err is None:
                log.exception("unhandled error", error_type=type(exc).__name__)
                err = Internal(
                    f"internal error; quote request id {self._request_id} when reporting it"
                )
            elif err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL):
                log.warning("rpc failed", code=err.code.name, reason=err.reason, error=str(exc))
            code = err.code
            if self._stream is not None:
                await self._stream.finish(context)
            await context.abort_with_status(rich_status(err))
        finally:
            labels = self._labels
            seconds = time.perf_counter() - self._started
            labels.handled(code).inc()
            labels.seconds.observe(seconds)
            if calls_logged():
                log.debug("rpc handled", code=code.name, seconds=round(seconds, 6))
            try:
                if self._principal_token is not None:
                    current_principal.reset(self._principal_token)
                current_request_id.reset(self._tokens[0])
                current_server_context.reset(self._tokens[1])
                close_call_log(self._log)
            except ValueError:
                # "Token ... was created in a different Context": a server stream whose client
                # went away is closed by asyncio's async-generator finalizer in a task of its
                # own, on a copy of another Context. Nothing was set there; nothing to restore.
                pass


def _is_abort(exc: BaseException) -> bool:
    # grpc.aio raises AbortError out of context.abort(); it must propagate untouched.
    return isinstance(exc, grpc.aio.AbortError)


def _context_code(context: Context) -> grpc.StatusCode:
    try:
        code = context.code()
    except Exception:
        return grpc.StatusCode.UNKNOWN
    if isinstance(code, grpc.StatusCode):
        return code
    for candidate in grpc.StatusCode:
        if candidate.value[0] == code:
            return candidate
    return grpc.StatusCode.UNKNOWN


async def _responses(result: Any) -> AsyncIterator[Any]:
    """A server-streaming behaviour is an async generator, or a coroutine using context.write."""
    if inspect.isawaitable(result):
        await result
        return
    async for item in result:
        yield item


class _ClientStream:
    """A client stream's requests as the handler reads them (counted, checked), and the rest of
    them read and dropped before the call is answered (`finish`).

    Each read runs as a task of its own that a cancelled reader leaves running (the ingest
    pipeline gives up a read in flight when a unit fails): grpc's receive operation cannot be
    abandoned half-way, so the next read, or `finish`, takes its result instead."""

    __slots__ = ("_labels", "_pending", "_requests", "ended")

    def __init__(self, requests: AsyncIterator[Any], labels: _MethodMetrics) -> None:
        self._requests = aiter(requests)
        self._labels = labels
        self._pending: asyncio.Future[Any] | None = None
        self.ended = False  # the client half-closed and the handler saw it

    def __aiter__(self) -> _ClientStream:
        return self

    async def __anext__(self) -> Any:
        request = await self._read()
        if request is _END:
            self.ended = True
            raise StopAsyncIteration
        self._labels.received.inc()
        return _checked(request)

    async def _read(self) -> Any:
        """The next request, or _END: the read in flight if a cancelled reader left one."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(_next_or_end(self._requests))
            self._pending.add_done_callback(_retrieve)
        request = await asyncio.shield(self._pending)
        self._pending = None
        return request

    async def finish(self, context: Context) -> None:
        """Before an answer the handler gives without having read the stream to its end: the
        initial metadata goes out at once (a client waiting on it knows to stop sending and
        half-close), then the rest is read, within DRAIN_SECONDS and DRAIN_MAX_BYTES."""
        if self.ended:
            return
        with contextlib.suppress(grpc.aio.UsageError):  # already sent (by the handler)
            await context.send_initial_metadata(())
        read = 0
        with contextlib.suppress(Exception):  # out of time, or the call broke: answer anyway
            async with asyncio.timeout(DRAIN_SECONDS):
                while read <= DRAIN_MAX_BYTES:
                    request = await self._read()
                    if request is _END:
                        break
                    read += request.ByteSize() if hasattr(request, "ByteSize") else 0
        if self._pending is not None:  # out of time mid-read: the answer goes out now
            self._pending.cancel()
        self.ended = True


_END = object()


async def _next_or_end(requests: AsyncIterator[Any]) -> Any:
    try:
        return await anext(requests)
    except StopAsyncIteration:
        return _END


def _retrieve(read: asyncio.Future[Any]) -> None:
    """A read nobody took (the call ended meanwhile): its error is not worth a warning."""
    if not read.cancelled():
        read.exception()
