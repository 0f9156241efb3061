"""The client library's retry policy: on a scripted stub, which failures it retries, what it
raises when it stops, and how `watch_batch` reopens its stream; against the real service, the
token bucket's RESOURCE_EXHAUSTED with RetryInfo honoured, and the give-up error."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import grpc
import pytest

from runops.common.v1 import common_pb2
from runops.ingest.client import GaveUp, IngestClient, IngestError
from runops.ingest.v1 import ingest_pb2 as ing
from runops.kit.backoff import ExponentialBackoff
from tests.controlplane.harness import Seeded
from tests.ingest.harness import FAST, Suite, ingest_in_process

PENDING, COMPLETED = common_pb2.BATCH_STATUS_PENDING, common_pb2.BATCH_STATUS_COMPLETED


def failure(code: grpc.StatusCode, message: str = "scripted") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=message)


def batch(status: common_pb2.BatchStatus.ValueType) -> ing.WatchBatchResponse:
    return ing.WatchBatchResponse(batch=common_pb2.Batch(friendly_id="batch_x", status=status))


class Stream:
    """One WatchBatch call: its messages, then EOF or a failure."""

    def __init__(self, script: list[Any]) -> None:
        self._script = iter(script)
        self.cancelled = False

    async def read(self) -> Any:
        step = next(self._script, grpc.aio.EOF)
        if isinstance(step, Exception):
            raise step
        return step

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Any:
        step = await self.read()
        if step is grpc.aio.EOF:
            raise StopAsyncIteration
        return step

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class Stub:
    def __init__(self, *streams: list[Any]) -> None:
        self._streams: Iterator[list[Any]] = iter(streams)
        self.opened: list[Stream] = []

    def WatchBatch(self, request: ing.WatchBatchRequest) -> Stream:
        self.opened.append(Stream(next(self._streams)))
        return self.opened[-1]


async def watched(stub: Stub, attempts: int = 3) -> list[common_pb2.BatchStatus.ValueType]:
    async with IngestClient("localhost:1", "key", backoff=FAST, attempts=attempts) as client:
        client.stub = stub  # type: ignore[assignment]
        return [b.status async for b in client.watch_batch("batch_x")]


async def test_watch_reopens_after_a_retryable_failure_and_an_early_end() -> None:
    unavailable = failure(grpc.StatusCode.UNAVAILABLE)
    stub = Stub(
        [batch(PENDING), unavailable],
        [unavailable],
        [batch(PENDING)],  # the server's shutdown ends it early: reopened
        [batch(PENDING), batch(COMPLETED)],
    )
    assert await watched(stub) == [PENDING, PENDING, PENDING, COMPLETED]
    assert len(stub.opened) == 4


async def test_watch_gives_up_after_consecutive_failures() -> None:
    unavailable = failure(grpc.StatusCode.UNAVAILABLE, "down")
    # A change between failures starts the count again: 2 + 3 failures, the third one fatal.
    stub = Stub([unavailable], [batch(PENDING), unavailable], [unavailable], [unavailable])
    with pytest.raises(GaveUp, match="WatchBatch: gave up after 3 attempts") as caught:
        await watched(stub)
    assert caught.value.attempts == 3
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


async def test_watch_raises_a_caller_mistake_at_once() -> None:
    stub = Stub([failure(grpc.StatusCode.NOT_FOUND, "no such batch")])
    with pytest.raises(IngestError, match="WatchBatch: NOT_FOUND: no such batch") as caught:
        await watched(stub)
    assert not isinstance(caught.value, GaveUp)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


async def test_a_watch_left_early_cancels_its_stream() -> None:
    stub = Stub([batch(PENDING), batch(PENDING)])
    async with IngestClient("localhost:1", "key", backoff=FAST) as client:
        client.stub = stub  # type: ignore[assignment]
        watch = client.watch_batch("batch_x")
        assert isinstance(watch, AsyncGenerator)
        assert (await anext(watch)).status == PENDING
        await watch.aclose()
    assert stub.opened[0].cancelled


# -- against the real service: the token bucket's RESOURCE_EXHAUSTED with RetryInfo ------------

# Without the server's hint the client would wait this long before its second try.
SLOW = ExponentialBackoff(base=30.0, cap=30.0)


def counting_creates(client: IngestClient) -> list[float]:
    """Wraps the client's CreateBatch so each call's start time is recorded."""
    calls: list[float] = []
    real = client.stub.CreateBatch

    def create(request: ing.CreateBatchRequest, **kwargs: Any) -> Any:
        calls.append(time.monotonic())
        return real(request, **kwargs)

    client.stub.CreateBatch = create  # type: ignore[assignment]
    return calls


async def test_create_waits_what_retry_info_says_then_succeeds(
    suite: Suite, seeded: Seeded
) -> None:
    async with ingest_in_process(
        suite, rate_limit_capacity=100, max_run_count=100, rate_limit_refill_per_second=50
    ) as small:
        target = small.app.target
        async with IngestClient(target, seeded.api_key, backoff=SLOW, attempts=3) as client:
            calls = counting_creates(client)
            await client.create_batch(100)  # the bucket is empty now: 100 more take 2 s
            created = await client.create_batch(100, idempotency_key="after-the-hint")
        assert not created.is_cached
        # Refused once with RetryInfo (about 2 s), tried again when the hint said, not after
        # the 30 s backoff.
        assert len(calls) == 3
        assert 1.0 <= calls[2] - calls[1] < 10


async def test_create_gives_up_with_the_last_refusal(suite: Suite, seeded: Seeded) -> None:
    async with ingest_in_process(
        suite, rate_limit_capacity=100, max_run_count=100, rate_limit_refill_per_second=0.01
    ) as small:
        target = small.app.target
        async with IngestClient(target, seeded.api_key, backoff=FAST, attempts=1) as client:
            await client.create_batch(100)
            with pytest.raises(GaveUp) as caught:
                await client.create_batch(50)
    assert str(caught.value).startswith("CreateBatch: gave up after 1 attempts; last error ")
    assert caught.value.attempts == 1
    details = caught.value.details
    assert details is not None
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.reason == "BATCH_RATE_LIMITED"
    assert details.retry_after is not None
    assert details.retry_after > 1000  # 50 tokens at 0.01/s
