"""The mollifier service in-process (on the session's control plane and run store), stubs,
seeded environments, and reads of Postgres itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.kit.channels import create_channel
from runops.kit.ids import body_of
from runops.kit.settings import load_settings
from runops.localstack import LocalStack
from runops.mollifier.v1 import mollifier_pb2 as m
from runops.mollifier.v1 import mollifier_pb2_grpc as m_grpc
from services.mollifier.app import Mollifier, build_mollifier
from services.mollifier.settings import MollifierSettings
from tests.controlplane.harness import ADMIN, INTERNAL, Seeded, seed
from tests.controlplane.harness import stub as cp_stub

if TYPE_CHECKING:
    from runops.mollifier.v1.mollifier_pb2_grpc import MollifierServiceAsyncStub

    Stub: TypeAlias = MollifierServiceAsyncStub
else:
    Stub = m_grpc.MollifierServiceStub

TASK = "email/send"


def settings_for(**overrides: Any) -> MollifierSettings:
    values: dict[str, Any] = {
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": -1,
        "grace_period_seconds": 2,
        "health_check_interval_seconds": 0.2,
        "internal_token": INTERNAL,
        "drainer_enabled": False,
        "drain_idle_seconds": 0.02,
        "sweep_interval_seconds": 5,
    }
    values.update(overrides)
    return load_settings(MollifierSettings, **values)


async def start_mollifier(**overrides: Any) -> Mollifier:
    service = await build_mollifier(settings_for(**overrides))
    await service.app.start()
    return service


_channels: list[grpc.aio.Channel] = []


def stub(target: str, token: str | None = INTERNAL) -> Stub:
    channel = create_channel(target, token=token)
    _channels.append(channel)
    return m_grpc.MollifierServiceStub(channel)


async def health_status(target: str) -> int:
    """The server's overall grpc.health.v1 status (SERVING, NOT_SERVING)."""
    channel = create_channel(target)
    _channels.append(channel)
    health: Any = health_pb2_grpc.HealthStub(channel)  # the stubs type only sync channels
    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(reply.status)


async def until_health(target: str, status: int, limit: float = 10.0) -> None:
    """Waits until the server's overall health is `status` (health checks run every 0.2 s)."""

    async def reached() -> bool:
        return await health_status(target) == status

    await until(reached, limit)


async def seeded_env(control_plane_target: str, *, enabled: bool, shadow: bool = False) -> Seeded:
    admin = cp_stub(control_plane_target, ADMIN)
    seeded = await seed(admin)
    await admin.SetOrganizationFlags(
        cp.SetOrganizationFlagsRequest(
            organization_id=seeded.org_id,
            mollifier_enabled=enabled,
            mollifier_shadow_mode=shadow,
        )
    )
    return seeded


def trigger_request(env: str, **fields: Any) -> m.TriggerRequest:
    values: dict[str, Any] = {
        "environment_id": env,
        "task_identifier": TASK,
        "payload": b'{"to":"a@b"}',
        "payload_type": "application/json",
    }
    values.update(fields)
    return m.TriggerRequest(**values)


async def runs_in_postgres(stack: LocalStack, env: str) -> dict[str, datetime]:
    """run id (body) -> created_at of every run of `env`, read on both writers directly."""
    found: dict[str, datetime] = {}
    for db in (stack.controlplane_db, stack.runops_db):
        conn = await asyncpg.connect(db.admin_writer_dsn)
        try:
            rows = await conn.fetch(
                "SELECT id, created_at FROM runs WHERE environment_id = $1", env
            )
        finally:
            await conn.close()
        for row in rows:
            assert row["id"] not in found, f"run {row['id']} in both databases"
            found[row["id"]] = row["created_at"]
    return found


async def count_runs(stack: LocalStack, env: str) -> int:
    total = 0
    for db in (stack.controlplane_db, stack.runops_db):
        conn = await asyncpg.connect(db.admin_writer_dsn)
        try:
            total += await conn.fetchval("SELECT count(*) FROM runs WHERE environment_id = $1", env)
        finally:
            await conn.close()
    return total


async def until(check: Callable[[], Awaitable[bool]], limit: float = 60.0) -> None:
    began = time.monotonic()
    while not await check():
        if time.monotonic() - began > limit:
            raise AssertionError(f"not true within {limit}s")
        await asyncio.sleep(0.05)


def body(run_id: str) -> str:
    return body_of(run_id)
