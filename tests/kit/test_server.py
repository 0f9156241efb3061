"""The runtime kit, through a real grpc.aio server: health, reflection, errors, auth, metrics,
deadline propagation, graceful shutdown and settings validation."""

from __future__ import annotations

import asyncio
import signal
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from runops.kit import server as kit_server
from runops.kit.errors import details_of
from runops.kit.server import LIVENESS, ServiceApp
from runops.kit.settings import ServerSettings, SettingsError, load_settings
from runops.testing.v1 import testing_pb2 as t
from tests.kit.app import SERVICE, build_app
from tests.kit.harness import (
    ADMIN,
    INTERNAL,
    PROCESS_ENV,
    behave,
    serving_address,
    settings,
    spawn,
    stub,
)
from tests.kit.harness import auth as _auth
from tests.kit.harness import health as _health


async def test_health_reports_serving_per_service(channel: grpc.aio.Channel) -> None:
    assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
    assert await _health(channel, SERVICE.full_name) == health_pb2.HealthCheckResponse.SERVING


async def test_health_follows_a_dependency(
    app: ServiceApp, channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    (tmp_path / "down").touch()
    await _wait_for_health(channel, health_pb2.HealthCheckResponse.NOT_SERVING)
    # Liveness does not follow dependencies: a restart would not bring the database back.
    assert await _health(channel, LIVENESS) == health_pb2.HealthCheckResponse.SERVING
    (tmp_path / "down").unlink()
    await _wait_for_health(channel, health_pb2.HealthCheckResponse.SERVING)


async def _wait_for_health(channel: grpc.aio.Channel, want: int, within: float = 5) -> None:
    deadline = asyncio.get_running_loop().time() + within
    status = -1
    while asyncio.get_running_loop().time() < deadline:
        status = await _health(channel)
        if status == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"health stayed {status}, wanted {want}")


async def test_reflection_lists_services(channel: grpc.aio.Channel) -> None:
    stub: Any = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names: set[str] = set()
    async for response in stub.ServerReflectionInfo(requests()):
        names |= {s.name for s in response.list_services_response.service}
    assert {SERVICE.full_name, "grpc.health.v1.Health"} <= names


async def test_domain_error_reaches_client_with_details(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(channel).Behave(behave("invalid"), metadata=_auth(INTERNAL))
    details = details_of(info.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "INVALID_ARGUMENT"
    assert details.fields == ["probe.text"]

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(channel).Behave(behave("missing"), metadata=_auth(INTERNAL))
    assert details_of(info.value).code == grpc.StatusCode.NOT_FOUND
    assert details_of(info.value).reason == "THING_NOT_FOUND"


async def test_dependency_failure_is_retryable_and_bugs_are_internal(
    channel: grpc.aio.Channel,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(channel).Behave(behave("pg-down"), metadata=_auth(INTERNAL))
    details = details_of(info.value)
    assert details.code == grpc.StatusCode.UNAVAILABLE
    assert details.reason == "DATABASE_UNAVAILABLE"
    assert details.retry_after is not None
    assert details.retry_after > 0

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(channel).Behave(
            behave("boom"), metadata=(*_auth(INTERNAL), ("x-request-id", "req-123"))
        )
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "req-123" in (info.value.details() or "")
    assert "a bug" not in (info.value.details() or "")


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        (_auth("wrong"), grpc.StatusCode.PERMISSION_DENIED),
        (_auth(INTERNAL), grpc.StatusCode.PERMISSION_DENIED),
        ((("authorization", "Basic abc"),), grpc.StatusCode.UNAUTHENTICATED),
    ],
)
async def test_admin_rpc_needs_the_admin_token(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...], code: grpc.StatusCode
) -> None:
    request = t.AdminOnlyRequest(probe=t.Probe(text="x"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(channel).AdminOnly(request, metadata=metadata)
    assert info.value.code() == code
    ok = await stub(channel).AdminOnly(request, metadata=_auth(ADMIN))
    assert ok.echo.text == "x"
    assert ok.echo.caller == "admin"


async def test_internal_rpc_needs_the_internal_token(channel: grpc.aio.Channel) -> None:
    request = behave(text="env_1")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(channel).Behave(request)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(channel).Behave(request, metadata=_auth("nope"))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await stub(channel).Behave(request, metadata=_auth(INTERNAL))).echo.text == "env_1"


async def test_deadline_propagates_downstream(app: ServiceApp, channel: grpc.aio.Channel) -> None:
    # The relay calls back into the same server without a timeout of its own.
    response = await stub(channel).Behave(
        behave(f"relay:{app.target}"), metadata=_auth(INTERNAL), timeout=3
    )
    # Without propagation the downstream call would get the channel default (30 s).
    remaining = response.echo.time_remaining
    assert 0 < remaining <= 3


async def test_metrics_count_handled_rpcs_by_code(
    app: ServiceApp, channel: grpc.aio.Channel
) -> None:
    with pytest.raises(grpc.aio.AioRpcError):
        await stub(channel).Behave(behave("missing"), metadata=_auth(INTERNAL))
    url = f"http://127.0.0.1:{app.metrics_port}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert (
        'grpc_server_handled_total{grpc_code="NOT_FOUND",grpc_method="Behave",'
        f'grpc_service="{SERVICE.full_name}",grpc_type="unary"}}'
    ) in body


async def test_shutdown_ends_long_lived_streams_without_waiting_out_the_grace(
    tmp_path: Path,
) -> None:
    service = build_app(settings(grace_period_seconds=30), down_file=None)
    await service.start()
    async with grpc.aio.insecure_channel(service.target) as ch:
        stream = stub(ch).Watch(t.WatchRequest(), metadata=_auth(INTERNAL))
        first = await stream.read()
        assert isinstance(first, t.WatchResponse)
        assert first.sequence == 1
        loop = asyncio.get_running_loop()
        began = loop.time()
        await service.stop()
        received: list[t.WatchResponse] = []
        while isinstance(message := await stream.read(), t.WatchResponse):
            received.append(message)
        assert await stream.code() == grpc.StatusCode.OK
        # The watch ended on shutdown, not by cancellation at the end of the 30 s grace.
        assert loop.time() - began < 10
        assert all(m.sequence > 1 for m in received)


def test_bad_settings_refuse_to_load() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(ServerSettings, grpc_port=70000, grace_period_seconds=-1)
    message = str(info.value)
    assert "RUNOPS_GRPC_PORT" in message
    assert "RUNOPS_GRACE_PERIOD_SECONDS" in message


def test_bad_settings_refuse_to_start_a_process() -> None:
    proc = spawn({"RUNOPS_GRPC_PORT": "not-a-port", "RUNOPS_LOG_LEVEL": "loud"})
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "RUNOPS_GRPC_PORT" in err
    assert "RUNOPS_LOG_LEVEL" in err
    assert "Traceback" not in err


async def test_sigterm_drains_in_flight_rpc_then_not_serving_and_exit() -> None:
    proc = spawn(
        {
            **PROCESS_ENV,
            "RUNOPS_SHUTDOWN_DELAY_SECONDS": "1.0",
            "RUNOPS_GRACE_PERIOD_SECONDS": "10",
        }
    )
    try:
        assert proc.stderr is not None
        target = await asyncio.wait_for(asyncio.to_thread(serving_address, proc), timeout=60)
        async with grpc.aio.insecure_channel(target) as ch:
            # No internal token configured in the process: internal RPCs are open.
            in_flight = asyncio.ensure_future(stub(ch).Behave(behave("sleep:2.5"), timeout=30))
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            await _wait_for_health(ch, health_pb2.HealthCheckResponse.NOT_SERVING, within=1)
            assert await _health(ch, LIVENESS) == health_pb2.HealthCheckResponse.NOT_SERVING
            response = await in_flight
            assert response.echo.behaviour == "sleep:2.5"
        code = await asyncio.to_thread(proc.wait, 30)
        assert code == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_shutdown_goes_on_when_grpc_stop_hangs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """grpc.aio's own stop has been seen to hang past its grace: pools must still close."""
    service = build_app(settings(), down_file=tmp_path / "down")
    closed = asyncio.Event()

    async def close_pools() -> None:
        closed.set()

    service.on_shutdown(close_pools)
    await service.start()
    server = service._server
    assert server is not None
    real_stop = server.stop
    never = asyncio.Event()

    async def hanging_stop(grace: float | None) -> None:
        await never.wait()

    monkeypatch.setattr(server, "stop", hanging_stop)
    monkeypatch.setattr(kit_server, "STOP_MARGIN_SECONDS", 0.2)
    try:
        await asyncio.wait_for(service.stop(grace=0.1), timeout=5)
        assert closed.is_set()
    finally:
        never.set()
        await real_stop(None)


async def test_run_loop_runs_on_the_loop_named() -> None:
    seen: list[str] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__)

    # In threads of their own, as a service process runs it in its main thread: run in this
    # one, asyncio.run would leave the test session's main thread with no current event loop
    # (the sync fixtures that build grpc.aio channels after it fail).
    await asyncio.to_thread(kit_server.run_loop, main(), "uvloop")
    await asyncio.to_thread(kit_server.run_loop, main(), "asyncio")
    assert seen[0].startswith("uvloop")
    assert seen[1].startswith("asyncio")


async def test_a_process_on_uvloop_serves_and_drains() -> None:
    proc = spawn({**PROCESS_ENV, "RUNOPS_EVENT_LOOP": "uvloop"})
    try:
        target = await asyncio.wait_for(asyncio.to_thread(serving_address, proc), timeout=60)
        async with grpc.aio.insecure_channel(target) as ch:
            in_flight = asyncio.ensure_future(stub(ch).Behave(behave("sleep:1"), timeout=30))
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            response = await in_flight
            assert response.echo.behaviour == "sleep:1"
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
