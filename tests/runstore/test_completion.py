"""Batch completion counts every way a run becomes final (spec §3), across both databases: items
linked to a run id not written yet (a run still buffered in the mollifier) count when it is
written final (cancelled, pre-failed), and move to the run holding its idempotency key when the
drain answers that run instead (the id is then never written)."""

from __future__ import annotations

from runops.common.v1 import common_pb2
from runops.kit.ids import Residency
from runops.runstore.v1 import runstore_pb2 as rs
from tests.runstore.harness import RYW, Stub, batch_request, body, new_env, new_key, run_input


async def linked_batches(client: Stub, env: str, run_ids: list[str]) -> list[common_pb2.Batch]:
    """A NEW and a LEGACY batch, sealed, each with one item linked to each of `run_ids`, each
    with a waitpoint."""
    made = []
    for batch_id in ("", f"batch_{body(Residency.LEGACY)}"):
        batch = (
            await client.CreateBatch(
                batch_request(
                    env,
                    len(run_ids),
                    batch_id=batch_id,
                    parent_run_id="run_parent1",
                    resume_parent_on_completion=True,
                )
            )
        ).batch
        chunk = [
            rs.BatchItemInput(index=i, existing_run_id=run_id) for i, run_id in enumerate(run_ids)
        ]
        await client.AcceptBatchItems(
            rs.AcceptBatchItemsRequest(batch_id=batch.id, environment_id=env, items=chunk)
        )
        sealed = await client.SealBatch(rs.SealBatchRequest(batch_id=batch.id, environment_id=env))
        assert sealed.batch.status == common_pb2.BATCH_STATUS_PROCESSING
        made.append(sealed.batch)
    return made


async def assert_completed(client: Stub, env: str, batch: common_pb2.Batch) -> None:
    found = (
        await client.GetBatch(
            rs.GetBatchRequest(batch_id=batch.id, environment_id=env, consistency=RYW)
        )
    ).batch
    assert found.status == common_pb2.BATCH_STATUS_COMPLETED
    assert found.completed_run_count == found.run_count
    waitpoint = (
        await client.GetWaitpoint(
            rs.GetWaitpointRequest(
                waitpoint_id=batch.waitpoint_id, environment_id=env, consistency=RYW
            )
        )
    ).waitpoint
    assert waitpoint.status == common_pb2.WAITPOINT_STATUS_COMPLETED
    assert not waitpoint.output_is_error


async def test_runs_written_final_count_their_linked_items_in_both_databases(
    client: Stub,
) -> None:
    env = new_env()
    cancelled = f"run_{body(Residency.NEW)}"
    failed = f"run_{body(Residency.LEGACY)}"
    batches = await linked_batches(client, env, [cancelled, failed])
    created = await client.CreateRuns(
        rs.CreateRunsRequest(
            runs=[
                run_input(env, run_id=cancelled, cancelled=rs.RunCancellation(reason="no")),
                run_input(
                    env,
                    run_id=failed,
                    failed=common_pb2.RunError(code="MOLLIFIER_DRAIN_FAILED", message="3 attempts"),
                ),
            ]
        )
    )
    assert [r.run.status for r in created.results] == [
        common_pb2.RUN_STATUS_CANCELED,
        common_pb2.RUN_STATUS_SYSTEM_FAILURE,
    ]
    # Counted by the create itself: no reaper step in between.
    for batch in batches:
        await assert_completed(client, env, batch)


async def test_an_unwritten_run_hands_its_items_to_the_key_holder(client: Stub) -> None:
    env = new_env()
    live_key, final_key = new_key(), new_key()
    holders = []
    for key in (live_key, final_key):
        options = common_pb2.TriggerOptions(idempotency_key=key)
        reply = await client.CreateRun(rs.CreateRunRequest(run=run_input(env, options=options)))
        holders.append(reply.run)
    live, final = holders
    await client.CompleteRun(
        rs.CompleteRunRequest(run_id=final.id, environment_id=env, success=rs.RunSuccess())
    )
    # Buffered ids (one per database) that the drain resolves to the key holders.
    unwritten = [f"run_{body(Residency.NEW)}", f"run_{body(Residency.LEGACY)}"]
    batches = await linked_batches(client, env, unwritten)
    created = await client.CreateRuns(
        rs.CreateRunsRequest(
            runs=[
                run_input(
                    env, run_id=run_id, options=common_pb2.TriggerOptions(idempotency_key=key)
                )
                for run_id, key in zip(unwritten, (live_key, final_key), strict=True)
            ]
        )
    )
    assert [r.run.id for r in created.results] == [live.id, final.id]
    for batch in batches:
        listed = await client.ListBatchItems(
            rs.ListBatchItemsRequest(batch_id=batch.id, environment_id=env, consistency=RYW)
        )
        assert [i.run_id for i in listed.items] == [live.friendly_id, final.friendly_id]
        found = (
            await client.GetBatch(
                rs.GetBatchRequest(batch_id=batch.id, environment_id=env, consistency=RYW)
            )
        ).batch
        # The final holder counted at once; the live one when it completes.
        assert found.completed_run_count == 1
    await client.CompleteRun(
        rs.CompleteRunRequest(run_id=live.id, environment_id=env, success=rs.RunSuccess())
    )
    for batch in batches:
        await assert_completed(client, env, batch)
