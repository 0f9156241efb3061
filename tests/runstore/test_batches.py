"""Batches through gRPC: concurrent overlapping chunks and seals, seal outcomes, missing ranges,
paging, completion bookkeeping, the seal-timeout reaper, and links across the two databases."""

from __future__ import annotations

import asyncio
import json
import random

import grpc

from runops.common.v1 import common_pb2
from runops.kit.errors import details_of
from runops.kit.ids import Residency
from runops.localstack import LocalStack
from runops.runstore.v1 import runstore_pb2 as rs
from tests.harness import expect_error, until
from tests.runstore.harness import (
    RYW,
    Stub,
    batch_request,
    body,
    items,
    new_env,
    new_key,
    rows,
    run_input,
)


async def get_batch(client: Stub, batch_id: str, env: str) -> common_pb2.Batch:
    reply = await client.GetBatch(
        rs.GetBatchRequest(batch_id=batch_id, environment_id=env, consistency=RYW)
    )
    return reply.batch


async def test_concurrent_overlapping_chunks_write_each_index_once(
    client: Stub, stack: LocalStack
) -> None:
    env = new_env()
    batch = (await client.CreateBatch(batch_request(env, 1000))).batch
    rng = random.Random(8)

    async def chunk(seed: int) -> rs.AcceptBatchItemsResponse:
        start = rng.randrange(0, 600)
        indexes = list(range(start, start + 400)) + rng.sample(range(1000), 100)
        rng.shuffle(indexes)
        while True:
            try:
                return await client.AcceptBatchItems(
                    rs.AcceptBatchItemsRequest(
                        batch_id=batch.id, environment_id=env, items=items(indexes)
                    )
                )
            except grpc.aio.AioRpcError as exc:
                # A deadlock between chunks is reported retryable (ABORTED); retry it.
                if exc.code() != grpc.StatusCode.ABORTED:
                    raise
        del seed

    await asyncio.gather(*(chunk(n) for n in range(8)))
    # Whatever the chunks missed, one more fills in.
    missing = await client.GetBatchMissingRanges(
        rs.GetBatchMissingRangesRequest(batch_id=batch.id, environment_id=env, consistency=RYW)
    )
    rest = [i for r in missing.ranges for i in range(r.start, r.end)]
    if rest:
        await client.AcceptBatchItems(
            rs.AcceptBatchItemsRequest(batch_id=batch.id, environment_id=env, items=items(rest))
        )
    dsn = stack.runops_db.admin_writer_dsn
    [counts] = await rows(
        dsn,
        "SELECT (SELECT count(*) FROM batch_items WHERE batch_id = $1) AS items,"
        " (SELECT count(DISTINCT index) FROM batch_items WHERE batch_id = $1) AS indexes,"
        " (SELECT count(*) FROM runs WHERE batch_id = $1) AS runs,"
        " (SELECT count(DISTINCT batch_index) FROM runs WHERE batch_id = $1) AS run_indexes,"
        " (SELECT accepted_count FROM batches WHERE id = $1) AS accepted",
        batch.id,
    )
    assert dict(counts) == {
        "items": 1000, "indexes": 1000, "runs": 1000, "run_indexes": 1000, "accepted": 1000,
    }  # fmt: skip
    # 8 concurrent seals: exactly one seals.
    seals = await asyncio.gather(
        *(
            client.SealBatch(rs.SealBatchRequest(batch_id=batch.id, environment_id=env))
            for _ in range(8)
        )
    )
    assert sum(s.sealed_now for s in seals) == 1
    assert (
        sorted(s.outcome for s in seals)
        == [rs.SEAL_BATCH_OUTCOME_SEALED] + [rs.SEAL_BATCH_OUTCOME_ALREADY_SEALED] * 7
    )
    # Every run, by pages, in index order.
    seen: list[int] = []
    token = ""
    while True:
        page = await client.ListBatchRuns(
            rs.ListBatchRunsRequest(
                batch_id=batch.id, environment_id=env, page_size=300, page_token=token,
                consistency=RYW,
            )
        )  # fmt: skip
        seen += [run.batch_index for run in page.runs]
        token = page.next_page_token
        if not token:
            break
    assert seen == list(range(1000))


async def test_duplicates_report_the_first_run_and_ranges_are_computed_in_sql(
    client: Stub,
) -> None:
    env = new_env()
    batch = (await client.CreateBatch(batch_request(env, 10))).batch
    first = await client.AcceptBatchItems(
        rs.AcceptBatchItemsRequest(batch_id=batch.id, environment_id=env, items=items([1, 2, 5]))
    )
    again = await client.AcceptBatchItems(
        rs.AcceptBatchItemsRequest(batch_id=batch.id, environment_id=env, items=items([2, 3]))
    )
    assert [(i.index, i.duplicate) for i in again.items] == [(2, True), (3, False)]
    assert again.items[0].run_id == first.items[1].run_id
    assert again.accepted_count == 4
    assert again.run_count == 10
    ranges = await client.GetBatchMissingRanges(
        rs.GetBatchMissingRangesRequest(batch_id=batch.id, environment_id=env, consistency=RYW)
    )
    assert [(r.start, r.end) for r in ranges.ranges] == [(0, 1), (4, 5), (6, 10)]
    assert not ranges.truncated
    capped = await client.GetBatchMissingRanges(
        rs.GetBatchMissingRangesRequest(
            batch_id=batch.id, environment_id=env, max_ranges=2, consistency=RYW
        )
    )
    assert [(r.start, r.end) for r in capped.ranges] == [(0, 1), (4, 5)]
    assert capped.truncated
    # Not every item is in: the seal changes nothing.
    seal = await client.SealBatch(rs.SealBatchRequest(batch_id=batch.id, environment_id=env))
    assert seal.outcome == rs.SEAL_BATCH_OUTCOME_COUNT_MISMATCH
    assert not seal.sealed_now
    assert seal.batch.accepted_count == 4
    assert not seal.batch.sealed
    # An index outside [0, run_count) fails the chunk, naming the item; nothing is written.
    exc = await expect_error(
        client.AcceptBatchItems(
            rs.AcceptBatchItemsRequest(batch_id=batch.id, environment_id=env, items=items([0, 10]))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details_of(exc).fields == ["items[1].index"]
    assert (await get_batch(client, batch.id, env)).accepted_count == 4


async def test_completion_bookkeeping_and_a_batch_of_only_failed_items(client: Stub) -> None:
    env = new_env()
    batch = (await client.CreateBatch(batch_request(env, 3))).batch
    chunk = items(range(3))
    chunk[0].pre_failed.CopyFrom(common_pb2.RunError(code="PAYLOAD_TOO_LARGE", message="big"))
    accepted = await client.AcceptBatchItems(
        rs.AcceptBatchItemsRequest(batch_id=batch.id, environment_id=env, items=chunk)
    )
    sealed = await client.SealBatch(rs.SealBatchRequest(batch_id=batch.id, environment_id=env))
    assert sealed.batch.status == common_pb2.BATCH_STATUS_PARTIAL_FAILED
    assert sealed.batch.HasField("processing_completed_at")
    assert (sealed.batch.successful_run_count, sealed.batch.failed_run_count) == (2, 1)
    for item in accepted.items[1:]:
        done = await client.CompleteRun(
            rs.CompleteRunRequest(run_id=item.run_id, environment_id=env, success=rs.RunSuccess())
        )
    assert done.batch.status == common_pb2.BATCH_STATUS_COMPLETED
    assert done.batch.completed_run_count == 3

    failed = (await client.CreateBatch(batch_request(env, 2))).batch
    chunk = items(range(2))
    for entry in chunk:
        entry.pre_failed.CopyFrom(common_pb2.RunError(code="PAYLOAD_TOO_LARGE"))
    await client.AcceptBatchItems(
        rs.AcceptBatchItemsRequest(batch_id=failed.id, environment_id=env, items=chunk)
    )
    sealed = await client.SealBatch(rs.SealBatchRequest(batch_id=failed.id, environment_id=env))
    assert sealed.batch.status == common_pb2.BATCH_STATUS_ABORTED
    assert sealed.batch.aborted_reason == common_pb2.BATCH_ABORTED_REASON_EVERY_ITEM_FAILED
    # Sealing again answers ALREADY_SEALED; a chunk for it is refused.
    again = await client.SealBatch(rs.SealBatchRequest(batch_id=failed.id, environment_id=env))
    assert again.outcome == rs.SEAL_BATCH_OUTCOME_ALREADY_SEALED
    await expect_error(
        client.AcceptBatchItems(
            rs.AcceptBatchItemsRequest(batch_id=failed.id, environment_id=env, items=items([0]))
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )


async def test_the_reaper_aborts_a_batch_never_sealed(client: Stub, stack: LocalStack) -> None:
    env = new_env()
    for batch_id, db in (
        ("", stack.runops_db),
        (f"batch_{body(Residency.LEGACY)}", stack.controlplane_db),
    ):
        batch = (
            await client.CreateBatch(
                batch_request(
                    env,
                    5,
                    batch_id=batch_id,
                    parent_run_id="run_parent1",
                    resume_parent_on_completion=True,
                )
            )
        ).batch
        await client.AcceptBatchItems(
            rs.AcceptBatchItemsRequest(batch_id=batch.id, environment_id=env, items=items(range(3)))
        )
        # Created long ago (the seal timeout is 30 minutes).
        await rows(
            db.admin_writer_dsn,
            "UPDATE batches SET created_at = now() - interval '31 minutes' WHERE id = $1",
            batch.id,
        )

        async def aborted(batch_id: str = batch.id) -> bool:
            found = await get_batch(client, batch_id, env)
            return found.status == common_pb2.BATCH_STATUS_ABORTED

        await until(aborted, limit=15, interval=0.1)
        found = await get_batch(client, batch.id, env)
        assert found.aborted_reason == common_pb2.BATCH_ABORTED_REASON_SEAL_TIMEOUT
        assert "expected 5 items, 3 accepted" in found.error_message
        waitpoint = (
            await client.GetWaitpoint(
                rs.GetWaitpointRequest(
                    waitpoint_id=batch.waitpoint_id, environment_id=env, consistency=RYW
                )
            )
        ).waitpoint
        assert waitpoint.status == common_pb2.WAITPOINT_STATUS_COMPLETED
        assert waitpoint.output_is_error
        error = json.loads(waitpoint.output)
        assert error["code"] == "BATCH_SEAL_TIMEOUT"
        assert "expected 5 items" in error["message"]
        seal = await client.SealBatch(rs.SealBatchRequest(batch_id=batch.id, environment_id=env))
        assert seal.outcome == rs.SEAL_BATCH_OUTCOME_ABORTED
        assert not seal.sealed_now
        exc = await expect_error(
            client.AcceptBatchItems(
                rs.AcceptBatchItemsRequest(batch_id=batch.id, environment_id=env, items=items([4]))
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert details_of(exc).reason == "BATCH_ABORTED"


async def test_links_to_runs_of_the_other_database_count(client: Stub, stack: LocalStack) -> None:
    """A NEW batch's items linked to LEGACY runs: one final already (counted at accept), one
    completed later (counted by CompleteRun in the other database), one finalized behind the
    service's back, as if the second write was lost (counted by the reaper)."""
    env = new_env()

    async def legacy_run() -> common_pb2.Run:
        run_id = f"run_{body(Residency.LEGACY)}"
        reply = await client.CreateRun(rs.CreateRunRequest(run=run_input(env, run_id=run_id)))
        return reply.run

    final, later, lost = await legacy_run(), await legacy_run(), await legacy_run()
    await client.CompleteRun(
        rs.CompleteRunRequest(run_id=final.id, environment_id=env, success=rs.RunSuccess())
    )
    batch = (
        await client.CreateBatch(
            batch_request(env, 4, parent_run_id="run_parent1", resume_parent_on_completion=True)
        )
    ).batch
    chunk = [
        rs.BatchItemInput(index=0, existing_run_id=final.friendly_id),
        rs.BatchItemInput(index=1, existing_run_id=later.friendly_id),
        rs.BatchItemInput(index=2, existing_run_id=lost.friendly_id),
        # Same key as a live LEGACY run: links to it instead of making a duplicate.
        *items([3]),
    ]
    key = new_key()
    keyed = await client.CreateRun(
        rs.CreateRunRequest(
            run=run_input(
                env,
                run_id=f"run_{body(Residency.LEGACY)}",
                options=common_pb2.TriggerOptions(idempotency_key=key),
            )
        )
    )
    chunk[3].run.options.idempotency_key = key
    accepted = await client.AcceptBatchItems(
        rs.AcceptBatchItemsRequest(batch_id=batch.id, environment_id=env, items=chunk)
    )
    assert accepted.items[3].run_id == keyed.run.friendly_id
    sealed = await client.SealBatch(rs.SealBatchRequest(batch_id=batch.id, environment_id=env))
    assert sealed.batch.completed_run_count == 1
    await client.CompleteRun(
        rs.CompleteRunRequest(run_id=later.id, environment_id=env, success=rs.RunSuccess())
    )
    await client.CancelRun(rs.CancelRunRequest(run_id=keyed.run.id, environment_id=env))
    assert (await get_batch(client, batch.id, env)).completed_run_count == 3
    # Final in its database, never told to the batch's: the reaper finds the link pending.
    await rows(
        stack.controlplane_db.admin_writer_dsn,
        "UPDATE runs SET status = 'COMPLETED_SUCCESSFULLY', completed_at = now() WHERE id = $1",
        lost.id,
    )

    async def completed() -> bool:
        return (await get_batch(client, batch.id, env)).status == common_pb2.BATCH_STATUS_COMPLETED

    await until(completed, limit=15, interval=0.1)
    waitpoint = await client.GetWaitpoint(
        rs.GetWaitpointRequest(waitpoint_id=batch.waitpoint_id, environment_id=env, consistency=RYW)
    )
    assert waitpoint.waitpoint.status == common_pb2.WAITPOINT_STATUS_COMPLETED
    # ListBatchRuns shows the linked runs of the other database too.
    page = await client.ListBatchRuns(
        rs.ListBatchRunsRequest(batch_id=batch.id, environment_id=env, consistency=RYW)
    )
    assert [r.id for r in page.runs] == [final.id, later.id, lost.id, keyed.run.id]
