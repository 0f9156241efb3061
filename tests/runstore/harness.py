"""Run-store servers (in-process, on the session stack or a cluster of a test's own), stubs,
and helpers that read each database directly."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
import pytest

from runops.common.v1 import common_pb2
from runops.kit.ids import Residency, mint_body
from runops.localstack import RUNOPS_DATABASE, LocalStack, PostgresCluster, PostgresDatabase
from runops.localstack.settings import INTERNAL_TOKEN, database, in_process_settings
from runops.runstore.v1 import runstore_pb2 as rs
from runops.runstore.v1 import runstore_pb2_grpc as rs_grpc
from services.runstore.app import RunStoreApp, build_run_store
from services.runstore.settings import RunStoreSettings
from tests.harness import private_postgres, stub_on

if TYPE_CHECKING:
    from runops.runstore.v1.runstore_pb2_grpc import RunStoreServiceAsyncStub

    Stub: TypeAlias = RunStoreServiceAsyncStub
else:
    Stub = rs_grpc.RunStoreServiceStub

RYW = common_pb2.CONSISTENCY_LEVEL_READ_YOUR_WRITES
ORG = "org_1"
PROJECT = "proj_1"


def settings_for(
    legacy: PostgresDatabase, new: PostgresDatabase | None, **overrides: Any
) -> RunStoreSettings:
    values: dict[str, Any] = {
        "controlplane_db": database(legacy),
        "runstore_split": new is not None,
        # The reaper runs often here, so a backdated batch is aborted within a test.
        "runstore_reaper_interval_seconds": 0.3,
        "runstore_reaper_lease_seconds": 5,
        "runstore_expiry_interval_seconds": 0.3,
        # Batches of earlier tests stay PROCESSING for the whole session (a 100,000-item one
        # among them): kept out of the re-check so no reaper step a later test waits on pays for
        # them (a precaution; the link-repair flake had another cause). Re-check tests backdate
        # their batch past this.
        "runstore_processing_recheck_seconds": 3600,
    }
    if new is not None:
        values["runops_db"] = database(new)
    values.update(overrides)
    return in_process_settings(RunStoreSettings, **values)


async def start_run_store(
    legacy: PostgresDatabase,
    new: PostgresDatabase | None,
    *,
    name: str = "runstore",
    **overrides: Any,
) -> RunStoreApp:
    started = await build_run_store(settings_for(legacy, new, **overrides), name=name)
    await started.app.start()
    return started


async def start_on_stack(
    stack: LocalStack, *, split: bool, name: str = "runstore", **overrides: Any
) -> RunStoreApp:
    return await start_run_store(
        stack.controlplane_db, stack.runops_db if split else None, name=name, **overrides
    )


@contextlib.asynccontextmanager
async def private_runops(
    tmp_path_factory: pytest.TempPathFactory, name: str
) -> AsyncIterator[PostgresCluster]:
    """A run-ops database (writer + streaming replica) of one test module alone: its tests may
    stop or hang its servers (the session's stack stays untouched)."""
    state_dir = Path(tmp_path_factory.mktemp(name))
    async with private_postgres(name, state_dir, RUNOPS_DATABASE, "runops") as pg:
        yield pg


@contextlib.asynccontextmanager
async def run_store_on(
    stack: LocalStack, cluster: PostgresCluster, *, name: str = "runstore", **db: Any
) -> AsyncIterator[RunStoreApp]:
    """A run store whose run-ops database is `cluster` (a replica read slower than 0.5 s goes to
    the writer); `db`: more settings of that database."""
    runops_db = {
        "writer_url": cluster.writer_dsn,
        "replica_url": cluster.replica_dsn,
        "replica_timeout_seconds": 0.5,
        **db,
    }
    started = await start_run_store(stack.controlplane_db, cluster, name=name, runops_db=runops_db)
    try:
        yield started
    finally:
        await started.app.stop(grace=1)


def stub(target: str, token: str | None = INTERNAL_TOKEN) -> Stub:
    return stub_on(rs_grpc.RunStoreServiceStub, target, token)


def new_env() -> str:
    return "env_" + mint_body(Residency.NEW)


def body(residency: Residency) -> str:
    return mint_body(residency)


def run_input(env: str, **fields: Any) -> rs.RunInput:
    values: dict[str, Any] = {
        "environment_id": env,
        "organization_id": ORG,
        "project_id": PROJECT,
        "task_identifier": "email/send",
        "payload": b'{"to":"a@b"}',
        "payload_type": "application/json",
    }
    values.update(fields)
    return rs.RunInput(**values)


def batch_request(env: str, run_count: int, **fields: Any) -> rs.CreateBatchRequest:
    return rs.CreateBatchRequest(
        environment_id=env,
        organization_id=ORG,
        project_id=PROJECT,
        run_count=run_count,
        **fields,
    )


def items(indexes: range | list[int], **run_fields: Any) -> list[rs.BatchItemInput]:
    return [
        rs.BatchItemInput(
            index=i, run=rs.RunInput(task_identifier="email/send", payload=b"{}", **run_fields)
        )
        for i in indexes
    ]


def new_key() -> str:
    return "key-" + secrets.token_hex(6)


async def rows(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def where(stack: LocalStack, table: str, row_id: str) -> set[str]:
    """Which databases hold the row (read on each writer directly, as the superuser)."""
    found = set()
    for name, db in (("controlplane", stack.controlplane_db), ("runops", stack.runops_db)):
        if await rows(db.admin_writer_dsn, f"SELECT 1 FROM {table} WHERE id = $1", row_id):
            found.add(name)
    return found


async def get_waitpoint(client: Stub, waitpoint_id: str, env: str) -> common_pb2.Waitpoint:
    reply = await client.GetWaitpoint(
        rs.GetWaitpointRequest(waitpoint_id=waitpoint_id, environment_id=env, consistency=RYW)
    )
    return reply.waitpoint
