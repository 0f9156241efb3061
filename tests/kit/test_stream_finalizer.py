"""A server stream whose client went away is closed by asyncio's async-generator finalizer, in a
task of its own on another Context. The kit's call scope then restores nothing there: before
that, resetting its context vars raised "Token ... was created in a different Context" in the
finalizer's task, which asyncio logged as an unhandled error (the hostile sweep's intermittent
control-plane traceback, seen in a fresh-clone CI run).

grpc.aio leaves a stream's generator suspended at its `yield` when the RPC's task is cancelled
while it writes; this test makes that state directly (the first message taken in one task, the
generator then dropped) so the finalizer path runs every time, not when a write happens to block.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from typing import Any

import grpc
from pydantic import SecretStr

from runops.kit.auth import Access, Authenticator
from runops.kit.context import current_request_id
from runops.kit.interceptors import ServerInterceptor
from tests.kit.harness import INTERNAL, auth

METHOD = "/runops.testing.v1.TestingService/Ticks"


class _Details(grpc.HandlerCallDetails):
    method = METHOD
    invocation_metadata = ()


class _CallContext:
    """What the call scope reads of a servicer context on a call that succeeds."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (*auth(INTERNAL), ("x-request-id", "finalized-stream"))


async def _ticks(request: object, context: object) -> AsyncIterator[int]:
    tick = 0
    while True:
        tick += 1
        yield tick


async def _wrapped_stream() -> Any:
    interceptor = ServerInterceptor(
        Authenticator(admin_token=None, internal_token=SecretStr(INTERNAL)),
        {METHOD: Access.INTERNAL},
    )
    handler: Any = grpc.unary_stream_rpc_method_handler(_ticks)

    async def continuation(details: grpc.HandlerCallDetails) -> Any:
        return handler

    wrapped: Any = await interceptor.intercept_service(continuation, _Details())
    return wrapped.unary_stream


async def test_a_stream_the_finalizer_closes_in_another_context_ends_quietly() -> None:
    unary_stream = await _wrapped_stream()
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, event: reported.append(event))
    try:
        stream = unary_stream(object(), _CallContext())
        # The RPC's own task takes the first message: the scope binds its vars in that task's
        # Context, and the generator stays suspended at its `yield`.
        assert await asyncio.create_task(stream.__anext__()) == 1
        del stream  # the RPC's task is gone: nothing holds the generator
        for _ in range(5):  # the finalizer's aclose() task runs, ends and is collected
            gc.collect()
            await asyncio.sleep(0.01)
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert reported == [], [str(event.get("exception") or event["message"]) for event in reported]
    assert current_request_id.get() is None  # this task's Context was never touched


async def test_a_stream_closed_in_another_task_ends_quietly() -> None:
    """The same, with the close awaited: aclose() in a task of its own returns cleanly."""
    unary_stream = await _wrapped_stream()
    stream = unary_stream(object(), _CallContext())
    assert await asyncio.create_task(stream.__anext__()) == 1
    await asyncio.create_task(stream.aclose())
    assert current_request_id.get() is None
