"""Refusals: the same failure answers the same way from either database, another environment's
rows are NOT_FOUND, bad input names each field, and a stopped writer answers UNAVAILABLE with
RetryInfo and is served again when it returns, without a restart (on a run-ops database of
these tests' own: the session's stack stays untouched)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runops.common.v1 import common_pb2
from runops.kit.channels import create_channel
from runops.kit.errors import details_of
from runops.kit.ids import Residency
from runops.localstack import LocalStack, PostgresCluster
from runops.runstore.v1 import runstore_pb2 as rs
from services.runstore.app import RunStoreApp
from tests.harness import expect_error
from tests.runstore.harness import (
    RYW,
    Stub,
    batch_request,
    body,
    items,
    new_env,
    private_runops,
    run_input,
    run_store_on,
    stub,
)


@pytest.mark.parametrize("residency", [Residency.NEW, Residency.LEGACY], ids=lambda r: r.name)
async def test_a_unique_violation_answers_alike_from_either_database(
    client: Stub, residency: Residency
) -> None:
    env, other_env = new_env(), new_env()
    run_id = f"run_{body(residency)}"
    await client.CreateRun(rs.CreateRunRequest(run=run_input(env, run_id=run_id)))
    # Raised by Postgres: an item's run reuses an existing run id (runs_pkey).
    batch_id = f"batch_{body(residency)}"
    await client.CreateBatch(batch_request(env, 2, batch_id=batch_id))
    chunk = items([0])
    chunk[0].run.run_id = run_id
    raised = details_of(
        await expect_error(
            client.AcceptBatchItems(
                rs.AcceptBatchItemsRequest(batch_id=batch_id, environment_id=env, items=chunk)
            ),
            grpc.StatusCode.ALREADY_EXISTS,
        )
    )
    assert raised.reason == "UNIQUE_VIOLATION"
    assert dict(raised.metadata) == {"constraint": "runs_pkey", "table": "runs"}
    # Found by the statement that skipped the row: the id is another environment's run.
    skipped = details_of(
        await expect_error(
            client.CreateRun(rs.CreateRunRequest(run=run_input(other_env, run_id=run_id))),
            grpc.StatusCode.ALREADY_EXISTS,
        )
    )
    assert (skipped.reason, dict(skipped.metadata)) == (raised.reason, dict(raised.metadata))
    # The same refusal as one CreateRuns result (code, reason, message; no metadata there).
    reply = await client.CreateRuns(
        rs.CreateRunsRequest(runs=[run_input(other_env, run_id=run_id)])
    )
    [result] = reply.results
    assert (result.error.code, result.error.reason, result.error.message) == (
        grpc.StatusCode.ALREADY_EXISTS.value[0],
        raised.reason,
        skipped.message,
    )
    # Nothing of the refused chunk was written.
    batch = await client.GetBatch(
        rs.GetBatchRequest(batch_id=batch_id, environment_id=env, consistency=RYW)
    )
    assert batch.batch.accepted_count == 0


async def test_another_environments_rows_are_not_found(client: Stub) -> None:
    env, stranger = new_env(), new_env()
    run = (await client.CreateRun(rs.CreateRunRequest(run=run_input(env)))).run
    batch = (
        await client.CreateBatch(
            batch_request(env, 1, parent_run_id="run_parent1", resume_parent_on_completion=True)
        )
    ).batch
    calls = [
        client.GetRun(rs.GetRunRequest(run_id=run.id, environment_id=stranger, consistency=RYW)),
        client.CompleteRun(
            rs.CompleteRunRequest(run_id=run.id, environment_id=stranger, success=rs.RunSuccess())
        ),
        client.CancelRun(rs.CancelRunRequest(run_id=run.id, environment_id=stranger)),
        client.AddRunTags(rs.AddRunTagsRequest(run_id=run.id, environment_id=stranger, tags=["x"])),
        client.UpdateRunMetadata(
            rs.UpdateRunMetadataRequest(run_id=run.id, environment_id=stranger, metadata="{}")
        ),
        client.GetBatch(
            rs.GetBatchRequest(batch_id=batch.id, environment_id=stranger, consistency=RYW)
        ),
        client.AcceptBatchItems(
            rs.AcceptBatchItemsRequest(batch_id=batch.id, environment_id=stranger, items=items([0]))
        ),
        client.GetBatchMissingRanges(
            rs.GetBatchMissingRangesRequest(
                batch_id=batch.id, environment_id=stranger, consistency=RYW
            )
        ),
        client.SealBatch(rs.SealBatchRequest(batch_id=batch.id, environment_id=stranger)),
        client.ListBatchRuns(
            rs.ListBatchRunsRequest(batch_id=batch.id, environment_id=stranger, consistency=RYW)
        ),
        client.GetWaitpoint(
            rs.GetWaitpointRequest(
                waitpoint_id=batch.waitpoint_id, environment_id=stranger, consistency=RYW
            )
        ),
    ]
    for call in calls:
        await expect_error(call, grpc.StatusCode.NOT_FOUND)
    found = await client.FindRunByIdempotencyKey(
        rs.FindRunByIdempotencyKeyRequest(
            environment_id=stranger, task_identifier="email/send", idempotency_key="k"
        )
    )
    assert not found.HasField("run")
    # Nothing changed for the owner.
    mine = await client.GetRun(rs.GetRunRequest(run_id=run.id, environment_id=env, consistency=RYW))
    assert mine.run.status == common_pb2.RUN_STATUS_PENDING
    assert list(mine.run.tags) == []


async def test_bad_input_names_every_field(client: Stub) -> None:
    bad_run = rs.RunInput(
        run_id="job_123",
        environment_id="env-1",
        organization_id="",
        project_id="proj_1",
        task_identifier="",
        options=common_pb2.TriggerOptions(tags=["ok"] * 11, max_attempts=1000),
        failed=common_pb2.RunError(code="lower case"),
    )
    exc = await expect_error(
        client.CreateRuns(rs.CreateRunsRequest(runs=[run_input(new_env()), bad_run])),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(details_of(exc).fields) == {
        "runs[1].run_id",
        "runs[1].environment_id",
        "runs[1].organization_id",
        "runs[1].task_identifier",
        "runs[1].options.tags",
        "runs[1].options.max_attempts",
        "runs[1].failed.code",
    }
    exc = await expect_error(
        client.GetRun(rs.GetRunRequest(run_id="", consistency=7)),  # type: ignore[arg-type]
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details_of(exc).fields == ["run_id", "environment_id", "consistency"]
    exc = await expect_error(
        client.CreateBatch(
            rs.CreateBatchRequest(
                environment_id=new_env(), run_count=0, resume_parent_on_completion=True
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details_of(exc).fields == [
        "organization_id", "project_id", "run_count", "parent_run_id",
    ]  # fmt: skip
    exc = await expect_error(
        client.AcceptBatchItems(
            rs.AcceptBatchItemsRequest(
                batch_id="batch_x1",
                environment_id=new_env(),
                items=[
                    rs.BatchItemInput(index=0, run=rs.RunInput(task_identifier="ok")),
                    rs.BatchItemInput(index=1, run=rs.RunInput()),
                    rs.BatchItemInput(index=2, existing_run_id="nope"),
                ],
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details_of(exc).fields == ["items[1].run.task_identifier", "items[2].existing_run_id"]
    exc = await expect_error(
        client.ListBatchRuns(
            rs.ListBatchRunsRequest(
                batch_id="batch_x1", environment_id=new_env(), page_size=5000, page_token="abc"
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details_of(exc).fields == ["page_size", "page_token"]


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PostgresCluster]:
    async with private_runops(tmp_path_factory, "runstore-faults") as pg:
        yield pg


@pytest.fixture(scope="module")
async def faulty(stack: LocalStack, cluster: PostgresCluster) -> AsyncIterator[RunStoreApp]:
    async with run_store_on(stack, cluster, statement_timeout_seconds=60) as started:
        yield started


async def test_a_stopped_writer_is_unavailable_then_served_again_without_a_restart(
    faulty: RunStoreApp, cluster: PostgresCluster
) -> None:
    client = stub(faulty.app.target)
    health: Any = health_pb2_grpc.HealthStub(create_channel(faulty.app.target))
    env = new_env()
    batch = (await client.CreateBatch(batch_request(env, 4), timeout=5)).batch

    def accept(indexes: list[int]) -> Any:
        return client.AcceptBatchItems(
            rs.AcceptBatchItemsRequest(batch_id=batch.id, environment_id=env, items=items(indexes)),
            timeout=5,
        )

    await accept([0])
    # Stopped while calls are in flight and after: every refusal is UNAVAILABLE + RetryInfo.
    inflight = [asyncio.ensure_future(accept([1])) for _ in range(3)]
    await asyncio.to_thread(cluster.stop_server, "writer")
    try:
        outcomes = await asyncio.gather(*inflight, return_exceptions=True)
        refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert all(o.code() == grpc.StatusCode.UNAVAILABLE for o in refused)
        assert all(details_of(o).retry_after is not None for o in refused)
        assert len(refused) + sum(isinstance(o, rs.AcceptBatchItemsResponse) for o in outcomes) == 3
        exc = await expect_error(accept([2]), grpc.StatusCode.UNAVAILABLE)
        assert details_of(exc).retry_after is not None
        # LEGACY rows are another database: still served.
        legacy = f"run_{body(Residency.LEGACY)}"
        await client.CreateRun(rs.CreateRunRequest(run=run_input(env, run_id=legacy)), timeout=5)
    finally:
        await asyncio.to_thread(cluster.start_server, "writer")

    async def serving() -> bool:
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    for _ in range(200):
        if await serving():
            break
        await asyncio.sleep(0.1)
    reply = await accept([1, 2, 3])
    assert reply.accepted_count == 4
    sealed = await client.SealBatch(rs.SealBatchRequest(batch_id=batch.id, environment_id=env))
    assert sealed.sealed_now
