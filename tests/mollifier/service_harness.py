"""The mollifier service in-process (on the session's control plane and run store), stubs,
seeded environments, and reads of Postgres itself."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

from runops.common.v1 import common_pb2
from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.kit.ids import body_of
from runops.localstack import LocalStack
from runops.localstack.ports import HOST, free_port
from runops.localstack.settings import ADMIN_TOKEN, INTERNAL_TOKEN, in_process_settings
from runops.mollifier.v1 import mollifier_pb2 as m
from runops.mollifier.v1 import mollifier_pb2_grpc as m_grpc
from services.mollifier.app import Mollifier, build_mollifier
from services.mollifier.settings import MollifierSettings
from services.runstore.app import RunStoreApp
from tests.controlplane.harness import Seeded, seed
from tests.controlplane.harness import stub as cp_stub
from tests.harness import stub_on
from tests.runstore.harness import start_on_stack

if TYPE_CHECKING:
    from runops.mollifier.v1.mollifier_pb2_grpc import MollifierServiceAsyncStub

    Stub: TypeAlias = MollifierServiceAsyncStub
else:
    Stub = m_grpc.MollifierServiceStub

TASK = "email/send"

# Gate settings under which an environment's first trigger takes the only pass and every later
# one is buffered. The window is as long as the hold: with the default 0.2 s window, a slow
# machine let a trigger arriving 0.2 s after the first pass too (a CI flake).
TRIPPED: dict[str, Any] = {
    "gate_threshold": 1,
    "gate_window_seconds": 600,
    "gate_hold_seconds": 600,
}


def settings_for(**overrides: Any) -> MollifierSettings:
    values: dict[str, Any] = {
        "drainer_enabled": False,
        "drain_idle_seconds": 0.02,
        "sweep_interval_seconds": 5,
    }
    values.update(overrides)
    return in_process_settings(MollifierSettings, **values)


async def start_mollifier(**overrides: Any) -> Mollifier:
    service = await build_mollifier(settings_for(**overrides))
    await service.app.start()
    return service


class RunStoreOnPort:
    """A run store of one test on the session stack, on a fixed port, which the test may stop
    and start again (its clients reconnect to the same target)."""

    def __init__(self, stack: LocalStack, **overrides: Any) -> None:
        self._stack = stack
        self._overrides = overrides
        self.port = free_port()
        self.app: RunStoreApp | None = None

    @property
    def target(self) -> str:
        return f"{HOST}:{self.port}"

    async def start(self) -> None:
        self.app = await start_on_stack(
            self._stack, split=True, name="runstore-on-port", grpc_port=self.port, **self._overrides
        )

    async def stop(self) -> None:
        if self.app is not None:
            await self.app.app.stop(grace=0.5)
            self.app = None


def stub(target: str, token: str | None = INTERNAL_TOKEN) -> Stub:
    return stub_on(m_grpc.MollifierServiceStub, target, token)


async def seeded_env(
    control_plane_target: str,
    *,
    enabled: bool,
    shadow: bool = False,
    env_type: common_pb2.EnvironmentType.ValueType = common_pb2.ENVIRONMENT_TYPE_DEVELOPMENT,
) -> Seeded:
    admin = cp_stub(control_plane_target, ADMIN_TOKEN)
    seeded = await seed(admin, env_type)
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


async def run_rows(stack: LocalStack, env: str) -> dict[str, asyncpg.Record]:
    """run id (body) -> row of every run of `env`, read on both writers directly."""
    found: dict[str, asyncpg.Record] = {}
    for db in (stack.controlplane_db, stack.runops_db):
        conn = await asyncpg.connect(db.admin_writer_dsn)
        try:
            rows = await conn.fetch("SELECT * FROM runs WHERE environment_id = $1", env)
        finally:
            await conn.close()
        for row in rows:
            assert row["id"] not in found, f"run {row['id']} in both databases"
            found[row["id"]] = row
    return found


async def runs_in_postgres(stack: LocalStack, env: str) -> dict[str, datetime]:
    """run id (body) -> created_at of every run of `env`, read on both writers directly."""
    return {run_id: row["created_at"] for run_id, row in (await run_rows(stack, env)).items()}


async def count_runs(stack: LocalStack, env: str) -> int:
    total = 0
    for db in (stack.controlplane_db, stack.runops_db):
        conn = await asyncpg.connect(db.admin_writer_dsn)
        try:
            total += await conn.fetchval("SELECT count(*) FROM runs WHERE environment_id = $1", env)
        finally:
            await conn.close()
    return total


def body(run_id: str) -> str:
    return body_of(run_id)
