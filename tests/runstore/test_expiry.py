"""TTL expiry (spec §3): a run still waiting to start past its TTL becomes EXPIRED (the
run store's own worker, nothing else involved); its batch counts it final, its waitpoint
completes with the error. A run that started or finished never expires."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import asyncpg
from google.protobuf import duration_pb2, timestamp_pb2

from runops.common.v1 import common_pb2
from runops.kit.ids import Residency, mint_body
from runops.localstack import LocalStack
from runops.runstore.v1 import runstore_pb2 as rs
from services.runstore.rows import RunRow
from services.runstore.tables import RunTables
from tests.harness import until
from tests.runstore.harness import (
    RYW,
    Stub,
    batch_request,
    body,
    get_waitpoint,
    items,
    new_env,
    new_key,
    rows,
    run_input,
)

EXPIRED = common_pb2.RUN_STATUS_EXPIRED
SHORT = common_pb2.TriggerOptions(ttl=duration_pb2.Duration(nanos=200_000_000))


async def get_run(client: Stub, run: common_pb2.Run) -> common_pb2.Run:
    reply = await client.GetRun(
        rs.GetRunRequest(run_id=run.friendly_id, environment_id=run.environment_id, consistency=RYW)
    )
    return reply.run


async def expired(client: Stub, run: common_pb2.Run) -> common_pb2.Run:
    """The run once EXPIRED (the expiry worker runs every 0.3 s in these tests)."""

    async def check() -> bool:
        return (await get_run(client, run)).status == EXPIRED

    await until(check, limit=10)
    return await get_run(client, run)


async def test_a_run_past_its_ttl_expires_and_its_waitpoint_fails(client: Stub) -> None:
    env = new_env()
    for residency in (Residency.NEW, Residency.LEGACY):
        run = (
            await client.CreateRun(
                rs.CreateRunRequest(
                    run=run_input(
                        env,
                        run_id=f"run_{body(residency)}",
                        options=SHORT,
                        parent_run_id=f"run_{body(Residency.NEW)}",
                        resume_parent_on_completion=True,
                    )
                )
            )
        ).run
        done = await expired(client, run)
        assert done.error.code == "TASK_RUN_EXPIRED"
        assert "TTL" in done.error.message
        assert done.HasField("completed_at")
        waitpoint = await get_waitpoint(client, run.waitpoint_id, env)
        assert waitpoint.status == common_pb2.WAITPOINT_STATUS_COMPLETED
        assert waitpoint.output_is_error
        assert json.loads(waitpoint.output)["code"] == "TASK_RUN_EXPIRED"


async def test_the_ttl_counts_from_the_callers_creation_time(client: Stub) -> None:
    # A run drained from the mollifier keeps the time its caller was shown: it may be due at once.
    env = new_env()
    shown = timestamp_pb2.Timestamp()
    shown.FromDatetime(datetime.now(UTC) - timedelta(minutes=5))
    options = common_pb2.TriggerOptions(ttl=duration_pb2.Duration(seconds=60))
    run = (
        (
            await client.CreateRuns(
                rs.CreateRunsRequest(runs=[run_input(env, options=options, created_at=shown)])
            )
        )
        .results[0]
        .run
    )
    assert (await expired(client, run)).created_at == shown


async def test_started_or_finished_runs_never_expire(client: Stub, stack: LocalStack) -> None:
    env = new_env()
    created = await client.CreateRuns(
        rs.CreateRunsRequest(runs=[run_input(env, options=SHORT) for _ in range(4)])
    )
    started, completed, cancelled, waiting = (r.run for r in created.results)
    await rows(
        stack.runops_db.admin_writer_dsn,
        "UPDATE runs SET status = 'EXECUTING' WHERE id = $1",
        started.id,
    )
    await client.CompleteRun(
        rs.CompleteRunRequest(
            run_id=completed.friendly_id, environment_id=env, success=rs.RunSuccess()
        )
    )
    await client.CancelRun(
        rs.CancelRunRequest(run_id=cancelled.friendly_id, environment_id=env, reason="no")
    )
    await expired(client, waiting)
    statuses = [(await get_run(client, run)).status for run in (started, completed, cancelled)]
    assert statuses == [
        common_pb2.RUN_STATUS_EXECUTING,
        common_pb2.RUN_STATUS_COMPLETED_SUCCESSFULLY,
        common_pb2.RUN_STATUS_CANCELED,
    ]


async def test_an_expired_run_completes_its_batch(client: Stub) -> None:
    env = new_env()
    parent = f"run_{body(Residency.NEW)}"
    batch = (
        await client.CreateBatch(
            batch_request(env, 2, parent_run_id=parent, resume_parent_on_completion=True)
        )
    ).batch
    await client.AcceptBatchItems(
        rs.AcceptBatchItemsRequest(
            batch_id=batch.id, environment_id=env, items=items([0], options=SHORT) + items([1])
        )
    )
    await client.SealBatch(rs.SealBatchRequest(batch_id=batch.id, environment_id=env))
    listed = await client.ListBatchRuns(
        rs.ListBatchRunsRequest(batch_id=batch.id, environment_id=env, consistency=RYW)
    )
    short, other = listed.runs
    await client.CompleteRun(
        rs.CompleteRunRequest(run_id=other.friendly_id, environment_id=env, success=rs.RunSuccess())
    )
    await expired(client, short)
    done = (
        await client.GetBatch(
            rs.GetBatchRequest(batch_id=batch.id, environment_id=env, consistency=RYW)
        )
    ).batch
    assert done.status == common_pb2.BATCH_STATUS_COMPLETED
    assert done.completed_run_count == 2
    waitpoint = await get_waitpoint(client, batch.waitpoint_id, env)
    assert waitpoint.status == common_pb2.WAITPOINT_STATUS_COMPLETED


async def test_an_expired_run_counts_for_items_of_the_other_database_linked_to_it(
    client: Stub,
) -> None:
    env = new_env()
    key = new_key()
    legacy = (
        await client.CreateRun(
            rs.CreateRunRequest(
                run=run_input(
                    env,
                    run_id=f"run_{body(Residency.LEGACY)}",
                    options=common_pb2.TriggerOptions(idempotency_key=key, ttl=SHORT.ttl),
                )
            )
        )
    ).run
    batch = (await client.CreateBatch(batch_request(env, 1))).batch
    accepted = await client.AcceptBatchItems(
        rs.AcceptBatchItemsRequest(
            batch_id=batch.id,
            environment_id=env,
            items=items([0], options=common_pb2.TriggerOptions(idempotency_key=key)),
        )
    )
    assert accepted.items[0].run_id == legacy.friendly_id
    await client.SealBatch(rs.SealBatchRequest(batch_id=batch.id, environment_id=env))
    await expired(client, legacy)

    async def batch_completed() -> bool:
        reply = await client.GetBatch(
            rs.GetBatchRequest(batch_id=batch.id, environment_id=env, consistency=RYW)
        )
        return reply.batch.status == common_pb2.BATCH_STATUS_COMPLETED

    await until(batch_completed, limit=5)


async def test_expiry_and_run_waitpoints_work_in_single_database_mode(single: Stub) -> None:
    env = new_env()
    run = (
        await single.CreateRun(
            rs.CreateRunRequest(
                run=run_input(
                    env,
                    options=SHORT,
                    parent_run_id=f"run_{body(Residency.LEGACY)}",
                    resume_parent_on_completion=True,
                )
            )
        )
    ).run
    assert (await expired(single, run)).error.code == "TASK_RUN_EXPIRED"
    waitpoint = await get_waitpoint(single, run.waitpoint_id, env)
    assert waitpoint.output_is_error


async def test_expiry_steps_are_batched_and_only_the_lease_holder_works(
    pool: asyncpg.Pool,
) -> None:
    tables = RunTables()
    lease = timedelta(seconds=30)
    past = datetime.now(UTC) - timedelta(minutes=1)
    due = [
        RunRow(
            id=mint_body(Residency.NEW),
            environment_id="env_x",
            organization_id="org_1",
            project_id="proj_1",
            task_identifier="email/send",
            ttl_ms=1000,
            created_at=past,
        )
        for _ in range(5)
    ]
    await tables.create_runs(pool, due)
    assert await tables.expire_runs(pool, holder="b", lease_ttl=lease, limit=2) is not None
    assert await tables.expire_runs(pool, holder="a", lease_ttl=lease, limit=2) is None
    await tables.release_expiry_lease(pool, "b")
    steps = [await tables.expire_runs(pool, holder="a", lease_ttl=lease, limit=2) for _ in range(3)]
    expired = [run_id for step in steps for run_id in step or []]
    # The first step of "b" took two already.
    assert [len(step or []) for step in steps] == [2, 1, 0]
    assert len(set(expired)) == 3
    statuses = await pool.fetch(
        "SELECT status FROM runs WHERE id = ANY($1::text[])", [row.id for row in due]
    )
    assert {r["status"] for r in statuses} == {"EXPIRED"}
