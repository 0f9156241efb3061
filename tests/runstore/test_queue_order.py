"""Batch order (spec §3): each run of a batch dequeues at the batch's created_at + index
milliseconds, however its items arrived; any other run at its creation time (a drained run's:
the time its caller was shown)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from google.protobuf import timestamp_pb2

from runops.common.v1 import common_pb2
from runops.runstore.v1 import runstore_pb2 as rs
from tests.runstore.harness import RYW, Stub, batch_request, items, new_env, run_input


async def test_a_shuffled_batch_dequeues_in_index_order(client: Stub) -> None:
    env = new_env()
    count = 300
    batch = (await client.CreateBatch(batch_request(env, count))).batch
    order = list(range(count))
    random.Random(15).shuffle(order)
    for start in range(0, count, 70):
        await client.AcceptBatchItems(
            rs.AcceptBatchItemsRequest(
                batch_id=batch.id, environment_id=env, items=items(order[start : start + 70])
            )
        )
    runs: list[common_pb2.Run] = []
    token = ""
    while True:
        page = await client.ListBatchRuns(
            rs.ListBatchRunsRequest(
                batch_id=batch.id, environment_id=env, consistency=RYW, page_token=token
            )
        )
        runs += page.runs
        token = page.next_page_token
        if not token:
            break
    assert [run.batch_index for run in runs] == list(range(count))
    created = batch.created_at.ToMicroseconds()
    assert [run.queue_timestamp.ToMicroseconds() - created for run in runs] == [
        1000 * i for i in range(count)
    ]
    by_queue = sorted(runs, key=lambda run: run.queue_timestamp.ToMicroseconds())
    assert [run.batch_index for run in by_queue] == list(range(count))


async def test_a_single_run_dequeues_at_its_creation_time(client: Stub) -> None:
    env = new_env()
    now = (await client.CreateRun(rs.CreateRunRequest(run=run_input(env)))).run
    assert now.queue_timestamp == now.created_at
    shown = timestamp_pb2.Timestamp()
    shown.FromDatetime(datetime.now(UTC) - timedelta(seconds=30))
    drained = (
        (await client.CreateRuns(rs.CreateRunsRequest(runs=[run_input(env, created_at=shown)])))
        .results[0]
        .run
    )
    assert drained.created_at == shown
    assert drained.queue_timestamp == shown
    fetched = await client.GetRun(
        rs.GetRunRequest(run_id=drained.friendly_id, environment_id=env, consistency=RYW)
    )
    assert fetched.run.queue_timestamp == shown
