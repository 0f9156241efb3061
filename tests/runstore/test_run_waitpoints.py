"""Run waitpoints (spec §3): a triggerAndWait child (parent run + resume on completion, outside
a batch) gets a waitpoint that completes with its output or error when it reaches a final
status; readable through GetWaitpoint in the run's own database."""

from __future__ import annotations

import json

from runops.common.v1 import common_pb2
from runops.kit.ids import Residency
from runops.runstore.v1 import runstore_pb2 as rs
from tests.runstore.harness import (
    RYW,
    Stub,
    batch_request,
    body,
    get_waitpoint,
    items,
    new_env,
    run_input,
)

PENDING = common_pb2.WAITPOINT_STATUS_PENDING
COMPLETED = common_pb2.WAITPOINT_STATUS_COMPLETED


def child(env: str, residency: Residency = Residency.NEW, **fields: object) -> rs.RunInput:
    return run_input(
        env,
        run_id=f"run_{body(residency)}",
        parent_run_id=f"run_{body(Residency.NEW)}",
        resume_parent_on_completion=True,
        **fields,
    )


async def waitpoint(client: Stub, run: common_pb2.Run) -> common_pb2.Waitpoint:
    return await get_waitpoint(client, run.waitpoint_id, run.environment_id)


async def assert_failed_with(client: Stub, run: common_pb2.Run, code: str, message: str) -> None:
    """The run's waitpoint completed with the run's error."""
    done = await waitpoint(client, run)
    assert done.status == COMPLETED
    assert done.output_is_error
    assert done.output_type == "application/json"
    assert json.loads(done.output) == {"code": code, "message": message}


async def test_a_child_waitpoint_completes_with_its_output(client: Stub) -> None:
    env = new_env()
    for residency in (Residency.NEW, Residency.LEGACY):
        run = (await client.CreateRun(rs.CreateRunRequest(run=child(env, residency)))).run
        assert run.waitpoint_id == "wp_" + run.id
        fetched = await client.GetRun(
            rs.GetRunRequest(run_id=run.friendly_id, environment_id=env, consistency=RYW)
        )
        assert fetched.run.waitpoint_id == run.waitpoint_id
        pending = await waitpoint(client, run)
        assert pending.status == PENDING
        assert pending.run_id == run.friendly_id
        assert pending.residency == run.residency
        await client.CompleteRun(
            rs.CompleteRunRequest(
                run_id=run.friendly_id,
                environment_id=env,
                success=rs.RunSuccess(output=b'{"sent":true}', output_type="application/json"),
            )
        )
        done = await waitpoint(client, run)
        assert done.status == COMPLETED
        assert not done.output_is_error
        assert done.output == b'{"sent":true}'
        assert done.output_type == "application/json"
        assert done.HasField("completed_at")


async def test_a_child_waitpoint_completes_with_its_error(client: Stub) -> None:
    env = new_env()
    failed = (await client.CreateRun(rs.CreateRunRequest(run=child(env)))).run
    await client.CompleteRun(
        rs.CompleteRunRequest(
            run_id=failed.friendly_id,
            environment_id=env,
            failure=common_pb2.RunError(code="TASK_FAILED", message="boom"),
        )
    )
    cancelled = (await client.CreateRun(rs.CreateRunRequest(run=child(env)))).run
    await client.CancelRun(
        rs.CancelRunRequest(run_id=cancelled.friendly_id, environment_id=env, reason="stop")
    )
    await assert_failed_with(client, failed, "TASK_FAILED", "boom")
    await assert_failed_with(client, cancelled, "TASK_RUN_CANCELLED", "stop")


async def test_a_child_created_final_has_its_waitpoint_completed(client: Stub) -> None:
    env = new_env()
    inputs = [
        child(env, failed=common_pb2.RunError(code="DRAIN_FAILED", message="gave up")),
        child(env, Residency.LEGACY, cancelled=rs.RunCancellation(reason="buffered")),
        child(env),
    ]
    reply = await client.CreateRuns(rs.CreateRunsRequest(runs=inputs))
    failed, cancelled, live = (r.run for r in reply.results)
    await assert_failed_with(client, failed, "DRAIN_FAILED", "gave up")
    await assert_failed_with(client, cancelled, "TASK_RUN_CANCELLED", "buffered")
    assert (await waitpoint(client, live)).status == PENDING
    # A replay (the drainer's retry) answers the same runs and waitpoints.
    again = await client.CreateRuns(rs.CreateRunsRequest(runs=inputs))
    assert all(r.is_cached for r in again.results)
    assert [r.run.waitpoint_id for r in again.results] == [
        r.run.waitpoint_id for r in reply.results
    ]


async def test_only_a_single_child_resuming_its_parent_gets_a_waitpoint(client: Stub) -> None:
    env = new_env()
    plain = (await client.CreateRun(rs.CreateRunRequest(run=run_input(env)))).run
    assert plain.waitpoint_id == ""
    # A batch's runs resume their parent through the batch's waitpoint, not their own.
    parent = f"run_{body(Residency.NEW)}"
    batch = (
        await client.CreateBatch(
            batch_request(env, 1, parent_run_id=parent, resume_parent_on_completion=True)
        )
    ).batch
    await client.AcceptBatchItems(
        rs.AcceptBatchItemsRequest(
            batch_id=batch.id,
            environment_id=env,
            items=items([0], parent_run_id=parent, resume_parent_on_completion=True),
        )
    )
    listed = await client.ListBatchRuns(
        rs.ListBatchRunsRequest(batch_id=batch.id, environment_id=env, consistency=RYW)
    )
    assert [run.waitpoint_id for run in listed.runs] == [""]
