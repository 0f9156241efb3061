"""Every RPC routes by residency, asserted by reading each database directly: split on (NEW rows
in the run-ops database, LEGACY rows, old and new, in the control-plane database) and split off
(everything in the control-plane database, ids minted LEGACY-shaped)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from runops.common.v1 import common_pb2
from runops.kit.ids import Residency, is_legacy_body, is_new_body, residency_of
from runops.localstack import LocalStack
from runops.runstore.v1 import runstore_pb2 as rs
from tests.harness import expect_error
from tests.runstore.harness import (
    ORG,
    PROJECT,
    RYW,
    Stub,
    batch_request,
    body,
    items,
    new_env,
    new_key,
    rows,
    run_input,
    where,
)

CP = {"controlplane"}
RO = {"runops"}


async def test_runs_go_to_the_database_their_id_names(client: Stub, stack: LocalStack) -> None:
    env = new_env()
    fresh = (await client.CreateRun(rs.CreateRunRequest(run=run_input(env)))).run
    assert is_new_body(fresh.id)
    assert fresh.residency == common_pb2.RESIDENCY_NEW
    assert await where(stack, "runs", fresh.id) == RO
    legacy_id = body(Residency.LEGACY)
    old = (
        await client.CreateRun(rs.CreateRunRequest(run=run_input(env, run_id=f"run_{legacy_id}")))
    ).run
    assert old.id == legacy_id
    assert old.residency == common_pb2.RESIDENCY_LEGACY
    assert await where(stack, "runs", legacy_id) == CP
    for run in (fresh, old):
        got = await client.GetRun(
            rs.GetRunRequest(run_id=run.friendly_id, environment_id=env, consistency=RYW)
        )
        assert got.run.id == run.id
        # The internal id (the body) works too.
        got = await client.GetRun(
            rs.GetRunRequest(run_id=run.id, environment_id=env, consistency=RYW)
        )
        assert got.run.friendly_id == run.friendly_id


async def test_run_mutations_are_written_where_the_run_lives(
    client: Stub, stack: LocalStack
) -> None:
    env = new_env()
    future = timestamp_pb2.Timestamp()
    future.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    for residency, home in (
        (Residency.NEW, stack.runops_db),
        (Residency.LEGACY, stack.controlplane_db),
    ):
        run_id = f"run_{body(residency)}"
        options = common_pb2.TriggerOptions(delay_until=future, tags=["a"])
        await client.CreateRun(
            rs.CreateRunRequest(run=run_input(env, run_id=run_id, options=options))
        )
        tagged = await client.AddRunTags(
            rs.AddRunTagsRequest(run_id=run_id, environment_id=env, tags=["b", "a", "c"])
        )
        assert list(tagged.run.tags) == ["a", "b", "c"]
        await client.UpdateRunMetadata(
            rs.UpdateRunMetadataRequest(
                run_id=run_id,
                environment_id=env,
                metadata='{"x":1}',
                metadata_type="application/json",
            )
        )
        later = timestamp_pb2.Timestamp()
        later.FromDatetime(datetime.now(UTC) + timedelta(hours=2))
        rescheduled = await client.RescheduleRun(
            rs.RescheduleRunRequest(run_id=run_id, environment_id=env, delay_until=later)
        )
        assert rescheduled.run.delay_until == later
        cancelled = await client.CancelRun(
            rs.CancelRunRequest(run_id=run_id, environment_id=env, reason="no longer needed")
        )
        assert cancelled.run.status == common_pb2.RUN_STATUS_CANCELED
        # A retry of the same cancel answers the same; completing it now is refused.
        await client.CancelRun(rs.CancelRunRequest(run_id=run_id, environment_id=env))
        exc = await expect_error(
            client.CompleteRun(
                rs.CompleteRunRequest(run_id=run_id, environment_id=env, success=rs.RunSuccess())
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert "CANCELED" in (exc.details() or "")
        [row] = await rows(
            home.admin_writer_dsn,
            "SELECT tags, metadata, status, delay_until FROM runs WHERE id = $1",
            run_id.removeprefix("run_"),
        )
        assert list(row["tags"]) == ["a", "b", "c"]
        assert row["metadata"] == '{"x":1}'
        assert row["status"] == "CANCELED"
        assert row["delay_until"] == later.ToDatetime(tzinfo=UTC)
        # A run that is not DELAYED cannot be rescheduled.
        await expect_error(
            client.RescheduleRun(
                rs.RescheduleRunRequest(run_id=run_id, environment_id=env, delay_until=later)
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
        )


async def test_create_runs_writes_each_database_once_in_request_order(
    client: Stub, stack: LocalStack
) -> None:
    env = new_env()
    shown = timestamp_pb2.Timestamp()
    shown.FromDatetime(datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=UTC))
    inputs = [
        run_input(env, run_id=f"run_{body(Residency.LEGACY)}"),
        run_input(env),  # minted NEW
        run_input(env, run_id=f"run_{body(Residency.NEW)}", created_at=shown),
        run_input(
            env,
            run_id=f"run_{body(Residency.LEGACY)}",
            failed=common_pb2.RunError(code="PAYLOAD_TOO_LARGE", message="4 MiB"),
        ),
        run_input(env, cancelled=rs.RunCancellation(reason="cancelled while buffered")),
    ]
    reply = await client.CreateRuns(rs.CreateRunsRequest(runs=inputs))
    results = list(reply.results)
    assert len(results) == 5
    assert not any(r.HasField("error") for r in results)
    ids = [r.run.id for r in results]
    assert ids[0] == inputs[0].run_id.removeprefix("run_")
    assert ids[2] == inputs[2].run_id.removeprefix("run_")
    assert [residency_of(i) for i in ids] == [
        Residency.LEGACY, Residency.NEW, Residency.NEW, Residency.LEGACY, Residency.NEW,
    ]  # fmt: skip
    for run_id in ids:
        assert await where(stack, "runs", run_id) == (CP if is_legacy_body(run_id) else RO)
    assert results[2].run.created_at == shown
    assert results[3].run.status == common_pb2.RUN_STATUS_SYSTEM_FAILURE
    assert results[3].run.error.code == "PAYLOAD_TOO_LARGE"
    assert results[4].run.status == common_pb2.RUN_STATUS_CANCELED
    # A replay (the drainer retrying) returns the same runs, cached.
    again = await client.CreateRuns(rs.CreateRunsRequest(runs=inputs[:1] + inputs[2:4]))
    assert [r.run.id for r in again.results] == [ids[0], ids[2], ids[3]]
    assert all(r.is_cached for r in again.results)


async def test_idempotency_keys_are_unique_across_both_databases(
    client: Stub, stack: LocalStack
) -> None:
    env = new_env()
    key = new_key()
    options = common_pb2.TriggerOptions(idempotency_key=key)
    # An old LEGACY run holds the key: a NEW create returns it.
    legacy = (
        await client.CreateRun(
            rs.CreateRunRequest(
                run=run_input(env, run_id=f"run_{body(Residency.LEGACY)}", options=options)
            )
        )
    ).run
    replay = await client.CreateRun(rs.CreateRunRequest(run=run_input(env, options=options)))
    assert replay.is_cached
    assert replay.run.id == legacy.id
    found = await client.FindRunByIdempotencyKey(
        rs.FindRunByIdempotencyKeyRequest(
            environment_id=env, task_identifier="email/send", idempotency_key=key
        )
    )
    assert found.run.id == legacy.id
    # Reset clears it everywhere; the next create makes a NEW run holding it.
    reset = await client.ResetIdempotencyKey(
        rs.ResetIdempotencyKeyRequest(
            environment_id=env, task_identifier="email/send", idempotency_key=key
        )
    )
    assert reset.cleared_count == 1
    fresh = await client.CreateRun(rs.CreateRunRequest(run=run_input(env, options=options)))
    assert not fresh.is_cached
    assert is_new_body(fresh.run.id)
    # An expired key is cleared and a fresh run made.
    expiring = common_pb2.TriggerOptions(
        idempotency_key=new_key(), idempotency_key_ttl=duration_pb2.Duration(nanos=1_000_000)
    )
    first = await client.CreateRun(rs.CreateRunRequest(run=run_input(env, options=expiring)))
    await asyncio.sleep(0.05)
    second = await client.CreateRun(rs.CreateRunRequest(run=run_input(env, options=expiring)))
    assert not second.is_cached
    assert second.run.id != first.run.id
    [old] = await rows(
        stack.runops_db.admin_writer_dsn,
        "SELECT idempotency_key FROM runs WHERE id = $1",
        first.run.id,
    )
    assert old["idempotency_key"] is None


async def test_batches_and_their_runs_never_straddle_databases(
    client: Stub, stack: LocalStack
) -> None:
    env = new_env()
    for batch_id, home, name in (
        ("", stack.runops_db, RO),
        (f"batch_{body(Residency.LEGACY)}", stack.controlplane_db, CP),
    ):
        created = await client.CreateBatch(
            batch_request(
                env,
                4,
                batch_id=batch_id,
                parent_run_id="run_parent1",
                resume_parent_on_completion=True,
            )
        )
        batch = created.batch
        assert await where(stack, "batches", batch.id) == name
        assert await where(stack, "waitpoints", batch.waitpoint_id.removeprefix("wp_")) == name
        accepted = await client.AcceptBatchItems(
            rs.AcceptBatchItemsRequest(
                batch_id=batch.friendly_id, environment_id=env, items=items(range(4))
            )
        )
        assert accepted.accepted_count == 4
        run_ids = [item.run_id.removeprefix("run_") for item in accepted.items]
        assert {residency_of(r) for r in run_ids} == {residency_of(batch.id)}
        for run_id in run_ids:
            assert await where(stack, "runs", run_id) == name
        [count] = await rows(
            home.admin_writer_dsn, "SELECT count(*) FROM batch_items WHERE batch_id = $1", batch.id
        )
        assert count[0] == 4
        sealed = await client.SealBatch(rs.SealBatchRequest(batch_id=batch.id, environment_id=env))
        assert sealed.sealed_now
        assert sealed.outcome == rs.SEAL_BATCH_OUTCOME_SEALED
        page = await client.ListBatchRuns(
            rs.ListBatchRunsRequest(batch_id=batch.id, environment_id=env, consistency=RYW)
        )
        assert [r.id for r in page.runs] == run_ids
        for run_id in run_ids:
            done = await client.CompleteRun(
                rs.CompleteRunRequest(run_id=run_id, environment_id=env, success=rs.RunSuccess())
            )
        assert done.batch.status == common_pb2.BATCH_STATUS_COMPLETED
        waitpoint = await client.GetWaitpoint(
            rs.GetWaitpointRequest(
                waitpoint_id=batch.waitpoint_id, environment_id=env, consistency=RYW
            )
        )
        assert waitpoint.waitpoint.status == common_pb2.WAITPOINT_STATUS_COMPLETED


async def test_an_old_legacy_batch_is_still_readable_and_writable(
    client: Stub, stack: LocalStack
) -> None:
    """A batch written before the split (straight into the control-plane database) is served
    from there, while a new one goes to the run-ops database."""
    env = new_env()
    old = body(Residency.LEGACY)
    await rows(
        stack.controlplane_db.admin_writer_dsn,
        "INSERT INTO batches (id, environment_id, organization_id, project_id, run_count)"
        " VALUES ($1, $2, $3, $4, 2)",
        old, env, ORG, PROJECT,
    )  # fmt: skip
    got = await client.GetBatch(
        rs.GetBatchRequest(batch_id=f"batch_{old}", environment_id=env, consistency=RYW)
    )
    assert got.batch.residency == common_pb2.RESIDENCY_LEGACY
    await client.AcceptBatchItems(
        rs.AcceptBatchItemsRequest(
            batch_id=f"batch_{old}", environment_id=env, items=items(range(2))
        )
    )
    sealed = await client.SealBatch(
        rs.SealBatchRequest(batch_id=f"batch_{old}", environment_id=env)
    )
    assert sealed.sealed_now
    assert sealed.batch.status == common_pb2.BATCH_STATUS_PROCESSING
    [row] = await rows(
        stack.controlplane_db.admin_writer_dsn,
        "SELECT accepted_count, sealed FROM batches WHERE id = $1",
        old,
    )
    assert row["accepted_count"] == 2
    assert row["sealed"]
    fresh = await client.CreateBatch(batch_request(env, 1))
    assert is_new_body(fresh.batch.id)
    assert await where(stack, "batches", fresh.batch.id) == RO


async def test_split_off_keeps_everything_in_the_control_plane_database(
    single: Stub, stack: LocalStack
) -> None:
    env = new_env()
    run = (await single.CreateRun(rs.CreateRunRequest(run=run_input(env)))).run
    assert is_legacy_body(run.id)
    assert await where(stack, "runs", run.id) == CP
    # Even a NEW-shaped id (made while the split was on) lives there now.
    new_shaped = body(Residency.NEW)
    await single.CreateRun(rs.CreateRunRequest(run=run_input(env, run_id=f"run_{new_shaped}")))
    assert await where(stack, "runs", new_shaped) == CP
    batch = (await single.CreateBatch(batch_request(env, 3, idempotency_key=new_key()))).batch
    assert is_legacy_body(batch.id)
    assert await where(stack, "batches", batch.id) == CP
    accepted = await single.AcceptBatchItems(
        rs.AcceptBatchItemsRequest(batch_id=batch.id, environment_id=env, items=items(range(3)))
    )
    for item in accepted.items:
        assert is_legacy_body(item.run_id.removeprefix("run_"))
        assert await where(stack, "runs", item.run_id.removeprefix("run_")) == CP
    ranges = await single.GetBatchMissingRanges(
        rs.GetBatchMissingRangesRequest(batch_id=batch.id, environment_id=env, consistency=RYW)
    )
    assert list(ranges.ranges) == []
    assert ranges.accepted_count == 3
    sealed = await single.SealBatch(rs.SealBatchRequest(batch_id=batch.id, environment_id=env))
    assert sealed.sealed_now
    for call in (
        single.GetRun(rs.GetRunRequest(run_id=run.id, environment_id=env, consistency=RYW)),
        single.GetBatch(rs.GetBatchRequest(batch_id=batch.id, environment_id=env, consistency=RYW)),
    ):
        await call
