"""The one call helper every client uses (`ServiceClient._call`): the client's deadline, an
optional retry policy that waits what RetryInfo says, and one translation of failures."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, cast

import grpc
import pytest

from runops.kit.backoff import ExponentialBackoff, Retry
from runops.kit.clients import ServiceClient
from runops.kit.errors import NotFound, Unavailable, retry_delay, rich_status

Method = grpc.aio.UnaryUnaryMultiCallable[str, str]


def failure(err: Exception | grpc.StatusCode) -> grpc.aio.AioRpcError:
    """A failed call as a client sees it; a RunopsError travels with its rich details."""
    if isinstance(err, grpc.StatusCode):
        return grpc.aio.AioRpcError(err, grpc.aio.Metadata(), grpc.aio.Metadata(), "plain")
    assert isinstance(err, Unavailable | NotFound)
    status = rich_status(err)
    trailers = grpc.aio.Metadata(*status.trailing_metadata)
    return grpc.aio.AioRpcError(status.code, grpc.aio.Metadata(), trailers, status.details)


class Scripted:
    """A unary method that fails with each scripted error in turn, then answers."""

    def __init__(self, *failures: grpc.aio.AioRpcError) -> None:
        self.failures = list(failures)
        self.timeouts: list[float | None] = []

    def __call__(self, request: str, *, timeout: float | None = None) -> Awaitable[str]:
        # Like grpc's call objects: the deadline is taken now, the outcome awaited.
        self.timeouts.append(timeout)
        return self._outcome(request)

    async def _outcome(self, request: str) -> str:
        if self.failures:
            raise self.failures.pop(0)
        return f"answer to {request}"


async def call(method: Scripted, retry: Retry | None = None) -> Any:
    async with ServiceClient("localhost:1", timeout=2.5) as client:
        return await client._call(cast(Method, method), "ask", retry=retry)


async def test_a_call_carries_the_clients_deadline() -> None:
    method = Scripted()
    assert await call(method) == "answer to ask"
    assert method.timeouts == [2.5]


async def test_a_callers_mistake_comes_back_as_its_domain_error() -> None:
    refused = failure(NotFound("no such run", reason="RUN_NOT_FOUND"))
    with pytest.raises(NotFound) as caught:
        await call(Scripted(refused))
    assert caught.value.reason == "RUN_NOT_FOUND"
    assert caught.value.__cause__ is refused


async def test_a_transient_failure_stays_an_rpc_error_and_is_tried_once() -> None:
    method = Scripted(failure(grpc.StatusCode.UNAVAILABLE))
    with pytest.raises(grpc.aio.AioRpcError):
        await call(method)
    assert len(method.timeouts) == 1


async def test_a_retry_policy_waits_what_retry_info_says() -> None:
    hinted = failure(Unavailable("busy", retry_after=0.01))
    assert retry_delay(hinted) == pytest.approx(0.01)
    assert retry_delay(failure(grpc.StatusCode.UNAVAILABLE)) is None
    assert retry_delay(ValueError("not a call")) is None
    # A backoff far longer than the hint: the call only finishes in time if the hint is used.
    retry = Retry(
        ExponentialBackoff(base=60.0, cap=60.0),
        attempts=3,
        retry_on=(grpc.aio.AioRpcError,),
        delay_hint=retry_delay,
    )
    method = Scripted(hinted, hinted)
    assert await call(method, retry) == "answer to ask"
    assert len(method.timeouts) == 3
