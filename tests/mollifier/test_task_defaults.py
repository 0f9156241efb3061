"""Task defaults on the mollifier's Trigger (spec §4) end to end: the control plane's workers,
the mollifier (straight to the run store, and buffered then drained), the run store."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import pytest
import structlog

from runops.common.v1 import common_pb2
from runops.localstack import LocalStack
from runops.localstack.delay_proxy import DelayProxy
from runops.localstack.ports import HOST
from runops.localstack.settings import ADMIN_TOKEN
from runops.mollifier.v1 import mollifier_pb2 as m
from services.controlplane.app import ControlPlane
from services.mollifier.app import Mollifier
from tests.controlplane.harness import (
    ENV_TYPES,
    EXPLICIT_OPTIONS,
    PLATFORM_DEFAULTS,
    RunDefaults,
    explicit_defaults,
    register_workers,
)
from tests.controlplane.harness import stub as cp_stub
from tests.harness import until
from tests.mollifier.service_harness import (
    TASK,
    TRIPPED,
    count_runs,
    seeded_env,
    stub,
    trigger_request,
)

Factory = Callable[..., Awaitable[Mollifier]]


@pytest.mark.parametrize("path", ["straight", "buffered"])
@pytest.mark.parametrize("env_type", list(ENV_TYPES))
async def test_triggers_take_the_current_workers_task_defaults(
    services: Factory,
    svc_control_plane: ControlPlane,
    stack: LocalStack,
    env_type: str,
    path: str,
) -> None:
    target = svc_control_plane.app.target
    env = await seeded_env(target, enabled=True, env_type=ENV_TYPES[env_type])
    workers = await register_workers(cp_stub(target, ADMIN_TOKEN), env)
    buffered = path == "buffered"
    service = await services(drainer_enabled=True, **(TRIPPED if buffered else {}))
    client = stub(service.app.target)
    if buffered:
        await client.Trigger(trigger_request(env.env_id))  # takes the only pass

    cases = {
        "defaults": (trigger_request(env.env_id), workers.expected(TASK)),
        "other task": (
            trigger_request(env.env_id, task_identifier="sms/send"),
            workers.expected("sms/send"),
        ),
        "explicit": (
            trigger_request(env.env_id, options=EXPLICIT_OPTIONS),
            explicit_defaults(workers.current.worker.version),
        ),
        "unknown task": (
            trigger_request(env.env_id, task_identifier="not/registered"),
            PLATFORM_DEFAULTS,
        ),
    }
    shown: dict[str, common_pb2.Run] = {}
    for name, (request, expected) in cases.items():
        reply = await client.Trigger(request)
        assert reply.buffered == buffered, name
        assert RunDefaults.of(reply.run) == expected, name
        assert reply.run.lock_to_version == "", name
        shown[name] = reply.run

    # What the run store holds (drained, for buffered runs) is what the trigger showed.
    async def drained() -> bool:
        return (await service.buffer.stats(env.env_id)).depth == 0 and await count_runs(
            stack, env.env_id
        ) >= len(cases) + buffered

    await until(drained, limit=60, interval=0.05)
    for name, run in shown.items():
        stored = await client.GetRun(m.GetRunRequest(environment_id=env.env_id, run_id=run.id))
        assert not stored.run.buffered, name
        assert RunDefaults.of(stored.run) == RunDefaults.of(run), name


async def test_a_locked_trigger_takes_the_defaults_of_its_worker(
    services: Factory, svc_control_plane: ControlPlane
) -> None:
    target = svc_control_plane.app.target
    env = await seeded_env(target, enabled=True)
    workers = await register_workers(cp_stub(target, ADMIN_TOKEN), env)
    client = stub((await services()).app.target)
    locked = common_pb2.TriggerOptions(lock_to_version=workers.other.worker.version)
    reply = await client.Trigger(trigger_request(env.env_id, options=locked))
    other = workers.other.tasks[0]
    assert RunDefaults.of(reply.run) == RunDefaults(
        other.queue,
        other.default_ttl.seconds,
        other.max_attempts,
        other.machine_preset,
        workers.other.worker.version,
    )
    assert reply.run.lock_to_version == workers.other.worker.version
    missing = common_pb2.TriggerOptions(lock_to_version="no-such-version")
    reply = await client.Trigger(trigger_request(env.env_id, options=missing))
    assert RunDefaults.of(reply.run) == PLATFORM_DEFAULTS
    assert reply.run.lock_to_version == "no-such-version"


async def test_no_worker_yet_gives_platform_defaults_and_says_so(
    services: Factory, svc_control_plane: ControlPlane
) -> None:
    env = await seeded_env(svc_control_plane.app.target, enabled=True)
    client = stub((await services()).app.target)
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            reply = await client.Trigger(trigger_request(env.env_id))
            assert RunDefaults.of(reply.run) == PLATFORM_DEFAULTS
    # Said once, not once per trigger.
    assert [e["event"] for e in logs if "platform defaults" in e["event"]] == [
        "no worker to take task defaults from: platform defaults"
    ]
    # A worker registered later applies (its invalidation drops the cached absence).
    workers = await register_workers(cp_stub(svc_control_plane.app.target, ADMIN_TOKEN), env)

    async def applied() -> bool:
        reply = await client.Trigger(trigger_request(env.env_id))
        return RunDefaults.of(reply.run) == workers.expected(TASK)

    await until(applied, limit=15, interval=0.05)


async def test_a_control_plane_that_does_not_answer_fails_no_trigger(
    services: Factory, svc_control_plane: ControlPlane
) -> None:
    """Cached resolutions keep applying; an uncached one times out to the platform defaults
    with a warning, and the trigger is created."""
    target = svc_control_plane.app.target
    env = await seeded_env(target, enabled=True)
    workers = await register_workers(cp_stub(target, ADMIN_TOKEN), env)
    host, port = target.rsplit(":", 1)
    async with DelayProxy(host, int(port), delay=0) as proxy:
        client = stub((await services(controlplane_target=f"{HOST}:{proxy.port}")).app.target)
        warm = await client.Trigger(trigger_request(env.env_id))
        assert RunDefaults.of(warm.run) == workers.expected(TASK)
        proxy.delay = 3.0
        began = time.monotonic()
        cached = await client.Trigger(trigger_request(env.env_id))
        assert RunDefaults.of(cached.run) == workers.expected(TASK)
        assert time.monotonic() - began < 1.0, "a cached resolution costs no round trip"
        locked = common_pb2.TriggerOptions(lock_to_version=workers.other.worker.version)
        with structlog.testing.capture_logs() as logs:
            slow = await client.Trigger(trigger_request(env.env_id, options=locked))
        assert RunDefaults.of(slow.run) == PLATFORM_DEFAULTS
        assert [e["log_level"] for e in logs if "platform defaults" in e["event"]] == ["warning"]
        proxy.delay = 0
