"""Reads take the caller's consistency on the owning database only: with the replica's replay
paused, a default read of a run written behind the service's back misses it and a
READ_YOUR_WRITES read finds it, for both residencies; and the other database's writer is never
touched (asserted from pg_stat_activity on a run store whose background work is idle)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from runops.kit.ids import Residency
from runops.localstack import LocalStack, PostgresDatabase
from runops.runstore.v1 import runstore_pb2 as rs
from services.runstore.app import RunStoreApp
from tests.harness import expect_error
from tests.runstore.harness import (
    ORG,
    PROJECT,
    RYW,
    Stub,
    body,
    new_env,
    rows,
    start_on_stack,
    stub,
)

# The quiet store's name: its connections are told apart by application_name.
QUIET = "runstore-quiet"


async def insert_behind_the_service(db: PostgresDatabase, run_id: str, env: str) -> None:
    await rows(
        db.admin_writer_dsn,
        "INSERT INTO runs (id, environment_id, organization_id, project_id, task_identifier)"
        " VALUES ($1, $2, $3, $4, 'email/send')",
        run_id, env, ORG, PROJECT,
    )  # fmt: skip


@pytest.mark.parametrize("residency", [Residency.NEW, Residency.LEGACY], ids=lambda r: r.name)
async def test_default_reads_use_the_replica_and_read_your_writes_the_writer(
    client: Stub, stack: LocalStack, residency: Residency
) -> None:
    db = stack.database_for(residency)
    env = new_env()
    run_id = body(residency)
    await db.wait_for_replica()
    async with db.replay_paused():
        await insert_behind_the_service(db, run_id, env)
        await expect_error(
            client.GetRun(rs.GetRunRequest(run_id=run_id, environment_id=env)),
            grpc.StatusCode.NOT_FOUND,
        )
        got = await client.GetRun(
            rs.GetRunRequest(run_id=run_id, environment_id=env, consistency=RYW)
        )
        assert got.run.id == run_id
    await db.wait_for_replica()
    got = await client.GetRun(rs.GetRunRequest(run_id=run_id, environment_id=env))
    assert got.run.id == run_id


@pytest.fixture(scope="module")
async def quiet_store(stack: LocalStack) -> AsyncIterator[RunStoreApp]:
    """A run store that touches no writer on its own while a test watches: health checks and
    reaper steps half an hour apart (each ran once at start)."""
    started = await start_on_stack(
        stack,
        split=True,
        name=QUIET,
        health_check_interval_seconds=60,
        runstore_reaper_interval_seconds=1800,
        runstore_reaper_lease_seconds=3600,
    )
    yield started
    await started.app.stop(grace=1)


async def writer_activity(db: PostgresDatabase) -> dict[int, object]:
    """state_change of every connection the quiet run store holds on this writer."""
    found = await rows(
        db.admin_writer_dsn,
        "SELECT pid, state_change FROM pg_stat_activity WHERE application_name = $1",
        f"runops-{QUIET}",
    )
    return {row["pid"]: row["state_change"] for row in found}


@pytest.mark.parametrize("residency", [Residency.NEW, Residency.LEGACY], ids=lambda r: r.name)
async def test_read_your_writes_never_touches_the_other_writer(
    quiet_store: RunStoreApp, stack: LocalStack, residency: Residency
) -> None:
    client = stub(quiet_store.app.target)
    owner = stack.database_for(residency)
    other = stack.database_for(Residency.LEGACY if residency is Residency.NEW else Residency.NEW)
    env = new_env()
    run_id = body(residency)
    await insert_behind_the_service(owner, run_id, env)
    before_owner, before_other = await writer_activity(owner), await writer_activity(other)
    for _ in range(3):
        got = await client.GetRun(
            rs.GetRunRequest(run_id=run_id, environment_id=env, consistency=RYW)
        )
        assert got.run.id == run_id
    after_owner, after_other = await writer_activity(owner), await writer_activity(other)
    # The check can fail: the owner's writer shows the reads.
    assert after_owner != before_owner
    assert after_other == before_other
