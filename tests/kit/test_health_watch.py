"""grpc.health.v1 Watch streams follow health and end at shutdown, so an open watch (a probe, a
load balancer) does not hold the server for its whole grace period."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runops.kit.server import ServiceApp
from tests.kit.app import SERVICE, build_app
from tests.kit.harness import PROCESS_ENV, serving_address, settings, spawn

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _watch(channel: grpc.aio.Channel, service: str = "") -> Any:
    health: Any = health_pb2_grpc.HealthStub(channel)  # the stubs type the sync channel
    return health.Watch(health_pb2.HealthCheckRequest(service=service))


async def _statuses(call: Any) -> list[int]:
    """What the watch still sends until it ends."""
    statuses = []
    while (reply := await call.read()) is not grpc.aio.EOF:
        statuses.append(int(reply.status))
    return statuses


async def test_watch_follows_health_then_ends_at_stop(tmp_path: Any) -> None:
    down = tmp_path / "down"
    app = build_app(settings(grace_period_seconds=60), down_file=down)
    await app.start()
    async with grpc.aio.insecure_channel(app.target) as ch:
        call = _watch(ch, SERVICE.full_name)
        assert (await call.read()).status == SERVING
        down.touch()
        assert (await asyncio.wait_for(call.read(), 10)).status == NOT_SERVING
        down.unlink()
        assert (await asyncio.wait_for(call.read(), 10)).status == SERVING
        unknown = _watch(ch, "no.such.Service")
        assert (await unknown.read()).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        loop = asyncio.get_running_loop()
        began = loop.time()
        await app.stop()
        # Told NOT_SERVING, then the stream ended by itself: no 60 s grace waited out.
        assert await asyncio.wait_for(_statuses(call), 10) == [NOT_SERVING]
        assert await call.code() == grpc.StatusCode.OK
        assert await asyncio.wait_for(_statuses(unknown), 10) == []
        assert loop.time() - began < 30


async def test_list_names_every_service(app: ServiceApp, channel: grpc.aio.Channel) -> None:
    health: Any = health_pb2_grpc.HealthStub(channel)
    reply = await health.List(health_pb2.HealthListRequest())  # type: ignore[attr-defined]
    assert {"", "liveness", SERVICE.full_name} <= set(reply.statuses)
    assert all(s.status == SERVING for s in reply.statuses.values())


async def test_sigterm_with_a_watch_open_exits_well_within_the_grace() -> None:
    proc = spawn({**PROCESS_ENV, "RUNOPS_GRACE_PERIOD_SECONDS": "60"})
    try:
        target = await asyncio.wait_for(asyncio.to_thread(serving_address, proc), timeout=60)
        async with grpc.aio.insecure_channel(target) as ch:
            call = _watch(ch)
            assert (await call.read()).status == SERVING
            loop = asyncio.get_running_loop()
            began = loop.time()
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(_statuses(call), 30) == [NOT_SERVING]
        assert await asyncio.to_thread(proc.wait, 30) == 0
        # Before: the open watch held the process for the whole 60 s grace.
        assert loop.time() - began < 30
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
