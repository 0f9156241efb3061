"""Background tasks on the real kit server: ready before serving, the stopping hook before the
drain, stop after it and bounded, and a worker's restarts with backoff."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from runops.kit.background import BackgroundTask, Worker
from runops.kit.backoff import ExponentialBackoff
from runops.kit.server import ServiceApp
from runops.kit.settings import ServerSettings
from runops.testing.v1 import testing_pb2 as t
from runops.testing.v1 import testing_pb2_grpc as t_grpc

SERVICE = t.DESCRIPTOR.services_by_name["TestingService"].full_name


class Slow(t_grpc.TestingServiceServicer):
    """`Open` sleeps for the probe's delay; records when calls start and end. (The other
    methods answer UNIMPLEMENTED.)"""

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.active = 0
        self.started = asyncio.Event()

    async def Open(self, request: t.OpenRequest, context: Any) -> t.OpenResponse:
        self.active += 1
        self.started.set()
        try:
            await asyncio.sleep(request.probe.delay.ToTimedelta().total_seconds())
        finally:
            self.active -= 1
        self.events.append("call done")
        return t.OpenResponse(echo=t.Echo(text=request.probe.text))


def _app(servicer: Slow) -> ServiceApp:
    settings = ServerSettings.model_validate(
        {"grpc_host": "127.0.0.1", "grpc_port": 0, "metrics_port": -1, "grace_period_seconds": 5}
    )
    app = ServiceApp("background-test", settings)
    app.add_service(SERVICE, t_grpc.add_TestingServiceServicer_to_server, servicer)
    return app


@pytest.fixture
async def channel_to() -> AsyncIterator[Any]:
    channels: list[grpc.aio.Channel] = []

    def open_stub(app: ServiceApp) -> Any:
        channel = grpc.aio.insecure_channel(app.target)
        channels.append(channel)
        return t_grpc.TestingServiceStub(channel)

    yield open_stub
    for channel in channels:
        await channel.close()


async def test_start_waits_for_ready_and_serves_without_a_task_that_is_not(
    channel_to: Any,
) -> None:
    async def gets_ready() -> None:
        await asyncio.sleep(0.2)
        ready_one.ready.set()
        await asyncio.Event().wait()

    async def never_ready() -> None:
        await asyncio.Event().wait()

    ready_one = BackgroundTask("gets-ready", gets_ready)
    lame = BackgroundTask("never-ready", never_ready)
    app = _app(Slow([]))  # type: ignore[abstract]
    app.add_background(ready_one, ready_timeout=30)
    app.add_background(lame, ready_timeout=0.3)
    await app.start()
    try:
        assert ready_one.ready.is_set()
        assert not lame.ready.is_set()
        assert lame.running
        reply = await channel_to(app).Open(t.OpenRequest(probe=t.Probe(text="hi")), timeout=5)
        assert reply.echo.text == "hi"
    finally:
        await app.stop(grace=1)
    assert not ready_one.running
    assert not lame.running


async def test_stopping_runs_before_the_drain_and_stop_after_it(channel_to: Any) -> None:
    events: list[str] = []
    servicer = Slow(events)  # type: ignore[abstract]

    async def body() -> None:
        task.ready.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            events.append("task cancelled")
            raise

    def stopping() -> None:
        events.append(f"stopping with {servicer.active} call in flight")

    async def app_stopping() -> None:
        events.append("app stopping hook")

    async def shutdown() -> None:
        events.append("shutdown hook")

    task = BackgroundTask("lifecycle", body, on_stopping=stopping)
    app = _app(servicer)
    app.add_background(task, ready_timeout=5)
    app.on_stopping(app_stopping)
    app.on_shutdown(shutdown)
    await app.start()
    probe = t.Probe(delay=duration_pb2.Duration(seconds=1))
    call = asyncio.ensure_future(channel_to(app).Open(t.OpenRequest(probe=probe), timeout=10))
    await asyncio.wait_for(servicer.started.wait(), 5)
    await app.stop()
    assert (await call).echo is not None  # the in-flight call finished during the drain
    assert events == [
        "app stopping hook",
        "stopping with 1 call in flight",
        "call done",
        "task cancelled",
        "shutdown hook",
    ]


async def test_stop_is_bounded_for_a_task_that_ignores_cancellation() -> None:
    released = asyncio.Event()
    events: list[str] = []

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            # Cleans up for far longer than it is given, then gives in.
            await released.wait()
            raise

    async def shutdown() -> None:
        events.append("shutdown hook")

    task = BackgroundTask("stubborn", stubborn, stop_timeout=0.3)
    app = _app(Slow([]))  # type: ignore[abstract]
    app.add_background(task)
    app.on_shutdown(shutdown)
    await app.start()
    began = time.monotonic()
    await asyncio.wait_for(app.stop(grace=1), 20)
    took = time.monotonic() - began
    # Shutdown went on without it: the pools would be closed, the process would exit.
    assert events == ["shutdown hook"]
    assert task.running, f"stop took {took:.2f}s and the task ended"
    released.set()
    await asyncio.sleep(0.05)
    assert not task.running
    assert await task.stop() is True


async def test_a_worker_backs_off_on_failures_and_starts_over_once_ready() -> None:
    runs: list[tuple[float, int]] = []
    fail_until = 3

    async def body() -> None:
        runs.append((time.monotonic(), worker.failures))
        if len(runs) <= fail_until:
            raise ConnectionError("down")
        if len(runs) == fail_until + 1:
            worker.ready.set()
            return  # a healthy run that ended (a stream closed): not a failure streak
        await asyncio.Event().wait()

    worker = Worker("flaky", body, backoff=ExponentialBackoff(base=0.02, cap=0.08))
    worker.start()
    try:
        for _ in range(500):
            if len(runs) >= fail_until + 2:
                break
            await asyncio.sleep(0.01)
        # Failures in a row before each run: 0, 1, 2, 3, then 1 after the healthy run.
        assert [failures for _, failures in runs] == [0, 1, 2, 3, 1]
        gaps = [b - a for (a, _), (b, _) in itertools.pairwise(runs)]
        # Each wait at least its policy's delay (0.02, 0.04, 0.08 capped, then base again).
        for gap, least in zip(gaps, [0.02, 0.04, 0.08, 0.02], strict=True):
            assert gap >= least * 0.9
        assert not worker.ready.is_set()  # cleared when the ready run ended
    finally:
        assert await worker.stop(within=5)
    assert not worker.running
