"""A batch-and-wait never waits forever (spec §3): whatever way its items' runs become final
(created, linked by key, buffered in the mollifier then cancelled, failed or resolved to another
run), the parent's waitpoint ends COMPLETED, or completed with an error that says why, within a
bounded time. All through gRPC: batches through ingest (`CreateBatch` with a parent and
`resume_parent_on_completion`), runs finished through the run store, buffered runs cancelled
through the mollifier and drained by a real drainer, the waitpoint read with `GetWaitpoint`.

The ingest suite's mollifier has no drainer of its own: a buffered run stays buffered until a
test drains it. Time passing (a seal timeout, the PROCESSING re-check threshold) is a batch
backdated in its database; the suite's reaper runs every 0.3 s."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets

import asyncpg
import grpc
import pytest

from runops.common.v1 import common_pb2
from runops.ingest.v1 import ingest_pb2 as ing
from runops.kit.errors import details_of
from runops.kit.ids import Residency, mint_body
from runops.localstack import PostgresDatabase
from runops.mollifier.v1 import mollifier_pb2 as m
from runops.runstore.v1 import runstore_pb2 as rs
from services.ingest.app import Ingest
from services.mollifier.app import Mollifier
from services.mollifier.builders import drainer_of
from services.mollifier.drainer.drainer import DRAIN_FAILED_CODE
from tests.controlplane.harness import Seeded
from tests.harness import expect_error, until
from tests.ingest.harness import (
    Stub,
    Suite,
    database_of,
    ingest_in_process,
    item,
    replayed,
    requests,
    stub,
)
from tests.ingest.test_keyed import flagged, keyed, outcomes
from tests.mollifier.service_harness import TASK, body, seeded_env, trigger_request
from tests.mollifier.service_harness import stub as mollifier_stub
from tests.runstore.harness import RYW
from tests.runstore.harness import stub as runstore_stub

# How long a parent may wait here: each case ends well within it (a liveness bound).
BOUND = 15.0


def parent() -> str:
    return f"run_{mint_body(Residency.NEW)}"


async def batch_and_wait(api: Stub, run_count: int) -> common_pb2.Batch:
    request = ing.CreateBatchRequest(
        run_count=run_count, parent_run_id=parent(), resume_parent_on_completion=True
    )
    batch = (await api.CreateBatch(request)).batch
    assert batch.waitpoint_id
    return batch


async def waitpoint(suite: Suite, env: str, batch: common_pb2.Batch) -> common_pb2.Waitpoint:
    request = rs.GetWaitpointRequest(
        waitpoint_id=batch.waitpoint_id, environment_id=env, consistency=RYW
    )
    return (await runstore_stub(suite.runstore_target).GetWaitpoint(request)).waitpoint


async def resumed(suite: Suite, env: str, batch: common_pb2.Batch) -> common_pb2.Waitpoint:
    """The parent's waitpoint once completed (AssertionError after BOUND seconds)."""

    async def done() -> bool:
        found = await waitpoint(suite, env, batch)
        return found.status == common_pb2.WAITPOINT_STATUS_COMPLETED

    await until(done, BOUND, interval=0.05)
    return await waitpoint(suite, env, batch)


async def pending(suite: Suite, env: str, batch: common_pb2.Batch) -> bool:
    found = await waitpoint(suite, env, batch)
    return found.status == common_pb2.WAITPOINT_STATUS_PENDING


async def assert_completed(suite: Suite, env: str, api: Stub, batch: common_pb2.Batch) -> None:
    """The waitpoint completed without error and the batch counts every item."""
    found = await resumed(suite, env, batch)
    assert not found.output_is_error, found.output
    done = await replayed(suite, api, batch)  # one statement completed both
    assert done.status == common_pb2.BATCH_STATUS_COMPLETED
    assert done.completed_run_count == done.run_count


async def complete(suite: Suite, env: str, run_id: str) -> None:
    await runstore_stub(suite.runstore_target).CompleteRun(
        rs.CompleteRunRequest(
            run_id=run_id,
            environment_id=env,
            success=rs.RunSuccess(output=b'{"ok":true}', output_type="application/json"),
        )
    )


async def stream(api: Stub, batch: common_pb2.Batch, *chunks: list[ing.BatchItem]) -> None:
    reply = await api.StreamBatchItems(requests(batch.friendly_id, *chunks))
    assert reply.sealed


async def triggered(suite: Suite, env: Seeded, key: str) -> common_pb2.Run:
    """A run triggered through the mollifier with `key` (a fresh environment's first triggers
    pass the gate: written to the run store)."""
    options = common_pb2.TriggerOptions(idempotency_key=key)
    request = trigger_request(env.env_id, options=options)
    reply = await mollifier_stub(suite.mollifier_target).Trigger(request)
    assert not reply.buffered
    return reply.run


async def buffered_run(suite: Suite, env: Seeded) -> common_pb2.Run:
    """A keyed run waiting in the mollifier's buffer: a burst past the gate (the suite's: 20
    per second) of keyed triggers; the last buffered one."""
    triggers = mollifier_stub(suite.mollifier_target)
    for _ in range(5):
        tag = secrets.token_hex(3)
        replies = await asyncio.gather(
            *(
                triggers.Trigger(
                    trigger_request(
                        env.env_id,
                        options=common_pb2.TriggerOptions(idempotency_key=f"burst-{tag}-{i}"),
                    )
                )
                for i in range(60)
            )
        )
        buffered = [r.run for r in replies if r.buffered]
        if buffered:
            return buffered[-1]
    raise AssertionError("the gate never tripped")


async def drain(mollifier: Mollifier, env: str) -> None:
    """Everything of `env` out of the buffer through a real drainer and the run store."""
    drainer = drainer_of(mollifier.buffer, mollifier.run_store, mollifier.settings)
    for _ in range(200):
        if not (await mollifier.buffer.stats(env)).depth:
            return
        await drainer.tick()
    raise AssertionError("the buffer did not drain")


async def execute(db: PostgresDatabase, statement: str, *args: object) -> None:
    conn = await asyncpg.connect(db.admin_writer_dsn)
    try:
        await conn.execute(statement, *args)
    finally:
        await conn.close()


async def test_two_items_with_one_key_in_one_chunk(suite: Suite, api: Stub, seeded: Seeded) -> None:
    env = seeded.env_id
    batch = await batch_and_wait(api, 2)
    await stream(api, batch, [keyed(0, "k-one-chunk"), keyed(1, "k-one-chunk")])
    found = await outcomes(suite, api, batch)
    assert found[1].outcome == ing.ITEM_OUTCOME_LINKED
    assert found[0].run_id == found[1].run_id
    assert await pending(suite, env, batch)
    await complete(suite, env, found[0].run_id)
    await assert_completed(suite, env, api, batch)


@pytest.mark.parametrize("mollifier_flag", [True, False], ids=["flag-on", "flag-off"])
async def test_two_items_with_one_key_in_different_chunks(
    suite: Suite, ingest: Ingest, mollifier_flag: bool
) -> None:
    env = await seeded_env(suite.controlplane_target, enabled=mollifier_flag)
    api = stub(ingest.app.target, env.api_key)
    batch = await batch_and_wait(api, 3)
    # One item per unit, one unit at a time: the key is written by the first, found by the next.
    async with ingest_in_process(suite, max_chunk_items=1, ingest_concurrency=1) as small:
        chunks = [[keyed(0, "k-chunks")], [item(1, task=TASK)], [keyed(2, "k-chunks")]]
        await stream(stub(small.app.target, env.api_key), batch, *chunks)
    found = await outcomes(suite, api, batch)
    assert found[2].outcome == ing.ITEM_OUTCOME_LINKED
    assert found[2].run_id == found[0].run_id
    await complete(suite, env.env_id, found[0].run_id)
    assert await pending(suite, env.env_id, batch)
    await complete(suite, env.env_id, found[1].run_id)
    await assert_completed(suite, env.env_id, api, batch)


async def test_items_linked_to_runs_already_completed(suite: Suite, ingest: Ingest) -> None:
    env = await flagged(suite)
    earlier = await triggered(suite, env, "k-done")
    await complete(suite, env.env_id, earlier.friendly_id)
    api = stub(ingest.app.target, env.api_key)
    batch = await batch_and_wait(api, 3)
    await stream(api, batch, [keyed(0, "k-done"), keyed(1, "k-done"), item(2, task=TASK)])
    found = await outcomes(suite, api, batch)
    assert found[0].run_id == found[1].run_id == earlier.friendly_id
    assert await pending(suite, env.env_id, batch)
    await complete(suite, env.env_id, found[2].run_id)
    await assert_completed(suite, env.env_id, api, batch)


async def test_every_item_linked(suite: Suite, ingest: Ingest) -> None:
    env = await flagged(suite)
    runs = [await triggered(suite, env, f"k-all-{i}") for i in range(2)]
    await complete(suite, env.env_id, runs[0].friendly_id)
    api = stub(ingest.app.target, env.api_key)
    batch = await batch_and_wait(api, 3)
    await stream(api, batch, [keyed(0, "k-all-0"), keyed(1, "k-all-1"), keyed(2, "k-all-1")])
    found = await outcomes(suite, api, batch)
    assert all(o.outcome == ing.ITEM_OUTCOME_LINKED for o in found.values())
    assert await pending(suite, env.env_id, batch)
    await complete(suite, env.env_id, runs[1].friendly_id)
    await assert_completed(suite, env.env_id, api, batch)


async def test_every_item_pre_failed(suite: Suite, api: Stub, seeded: Seeded) -> None:
    batch = await batch_and_wait(api, 2)
    too_big = b"x" * 20000  # above the suite's item maximum (16 KiB): pre-failed
    # The seal aborts the batch; the stream that sealed it answers as a retry would (spec §5).
    exc = await expect_error(
        api.StreamBatchItems(
            requests(batch.friendly_id, [item(0, payload=too_big), item(1, payload=too_big)])
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details_of(exc).reason == "BATCH_ABORTED"
    found = await resumed(suite, seeded.env_id, batch)
    assert found.output_is_error
    assert json.loads(found.output)["code"] == "BATCH_ABORTED"
    done = await replayed(suite, api, batch)
    assert done.status == common_pb2.BATCH_STATUS_ABORTED


@dataclasses.dataclass(frozen=True)
class LinkedToBuffered:
    env: Seeded
    api: Stub
    target: common_pb2.Run  # buffered in the mollifier
    batch: common_pb2.Batch


async def linked_to_buffered(suite: Suite, ingest: Ingest, links: int) -> LinkedToBuffered:
    """A flagged environment, a run waiting in its mollifier's buffer, and a sealed
    batch-and-wait whose first `links` items link to that run (by its key) and whose last
    item's own run is completed: the batch waits on the buffered run only."""
    env = await flagged(suite)
    target = await buffered_run(suite, env)
    api = stub(ingest.app.target, env.api_key)
    batch = await batch_and_wait(api, links + 1)
    chunk = [keyed(i, target.idempotency_key) for i in range(links)] + [item(links, task=TASK)]
    await stream(api, batch, chunk)
    found = await outcomes(suite, api, batch)
    assert all(found[i].run_id == target.friendly_id for i in range(links))
    await complete(suite, env.env_id, found[links].run_id)
    assert await pending(suite, env.env_id, batch)
    return LinkedToBuffered(env, api, target, batch)


async def test_items_linked_to_a_buffered_run_then_cancelled(
    suite: Suite, ingest: Ingest, mollifier: Mollifier
) -> None:
    case = await linked_to_buffered(suite, ingest, links=2)
    env = case.env.env_id
    await mollifier_stub(suite.mollifier_target).CancelRun(
        m.CancelRunRequest(environment_id=env, run_id=case.target.friendly_id, reason="no")
    )
    await drain(mollifier, env)
    await assert_completed(suite, env, case.api, case.batch)


async def test_items_linked_to_a_buffered_run_that_fails_three_drains(
    suite: Suite, ingest: Ingest, mollifier: Mollifier
) -> None:
    case = await linked_to_buffered(suite, ingest, links=1)
    env = case.env.env_id
    # Three drains that could not write the run: taken from the buffer and handed back with an
    # attempt counted, as the drainer does for a refused write.
    buffer = mollifier.buffer
    for attempt in range(mollifier.settings.drain_max_attempts):
        owner = f"failing-drain-{attempt}"
        taken = [e.run_id for e in await buffer.pop(env, 1000, owner)]
        assert case.target.friendly_id in taken
        await buffer.requeue(env, taken, owner, error="refused")
    await drain(mollifier, env)
    request = rs.GetRunRequest(run_id=case.target.friendly_id, environment_id=env, consistency=RYW)
    run = (await runstore_stub(suite.runstore_target).GetRun(request)).run
    assert run.status == common_pb2.RUN_STATUS_SYSTEM_FAILURE
    assert run.error.code == DRAIN_FAILED_CODE
    await assert_completed(suite, env, case.api, case.batch)


async def test_a_buffered_run_resolved_to_another_run_at_drain_time(
    suite: Suite, ingest: Ingest, mollifier: Mollifier
) -> None:
    case = await linked_to_buffered(suite, ingest, links=1)
    env = case.env
    # Meanwhile another run takes the key in the run store (a writer that does not go through
    # the mollifier's claim): the drain answers that run, and the buffered id is never written.
    holder = (
        await runstore_stub(suite.runstore_target).CreateRun(
            rs.CreateRunRequest(
                run=rs.RunInput(
                    environment_id=env.env_id,
                    organization_id=env.org_id,
                    project_id=env.project.id,
                    task_identifier=TASK,
                    payload=b"{}",
                    payload_type="application/json",
                    options=common_pb2.TriggerOptions(idempotency_key=case.target.idempotency_key),
                )
            )
        )
    ).run
    assert holder.friendly_id != case.target.friendly_id
    await drain(mollifier, env.env_id)
    found = await outcomes(suite, case.api, case.batch)
    assert found[0].run_id == holder.friendly_id
    assert await pending(suite, env.env_id, case.batch)
    await complete(suite, env.env_id, holder.friendly_id)
    await assert_completed(suite, env.env_id, case.api, case.batch)


async def test_a_stream_that_never_finishes_ends_in_the_reaper(
    suite: Suite, api: Stub, seeded: Seeded
) -> None:
    batch = await batch_and_wait(api, 5)
    reply = await api.StreamBatchItems(requests(batch.friendly_id, [item(0), item(1)]))
    assert not reply.sealed
    # Created longer ago than the seal timeout (30 minutes).
    await execute(
        database_of(suite, batch),
        "UPDATE batches SET created_at = now() - interval '31 minutes' WHERE id = $1",
        batch.id,
    )
    found = await resumed(suite, seeded.env_id, batch)
    assert found.output_is_error
    error = json.loads(found.output)
    assert error["code"] == "BATCH_SEAL_TIMEOUT"
    assert "expected 5 items, 2 accepted" in error["message"]


async def test_the_recheck_repairs_a_lost_count(suite: Suite, api: Stub, seeded: Seeded) -> None:
    """A run finalized without its batch counting it (a lost count): the reaper's re-check of
    PROCESSING batches counts it from the run's real state."""
    batch = await batch_and_wait(api, 1)
    await stream(api, batch, [item(0)])
    run_id = (await outcomes(suite, api, batch))[0].run_id
    db = database_of(suite, batch)
    await execute(
        db,
        "UPDATE runs SET status = 'COMPLETED_SUCCESSFULLY', completed_at = now() WHERE id = $1",
        body(run_id),
    )
    await asyncio.sleep(1)  # several reaper steps: not due yet, nothing counted
    assert await pending(suite, seeded.env_id, batch)
    # Sealed longer ago than the re-check threshold (5 minutes).
    await execute(
        db, "UPDATE batches SET sealed_at = now() - interval '2 hours' WHERE id = $1", batch.id
    )
    await assert_completed(suite, seeded.env_id, api, batch)


async def test_the_recheck_names_items_whose_runs_were_never_written(
    suite: Suite, ingest: Ingest
) -> None:
    """An item linked to a buffered run that never drains: past the re-check threshold the
    waitpoint completes with an error naming its index."""
    case = await linked_to_buffered(suite, ingest, links=1)
    await execute(
        database_of(suite, case.batch),
        "UPDATE batches SET sealed_at = now() - interval '2 hours' WHERE id = $1",
        case.batch.id,
    )
    done = await resumed(suite, case.env.env_id, case.batch)
    assert done.output_is_error
    error = json.loads(done.output)
    assert error["code"] == "BATCH_RUNS_MISSING"
    assert "1 item(s) wait on runs that were never written: indexes 0" in error["message"]
