"""Idempotency keys stay unique across both databases under concurrency (spec §3): keyed creates
landing in LEGACY and in NEW at the same moment make one run, and every caller gets its id."""

from __future__ import annotations

import asyncio

from runops.common.v1 import common_pb2
from runops.kit.ids import Residency
from runops.localstack import LocalStack
from runops.runstore.v1 import runstore_pb2 as rs
from tests.runstore.harness import (
    Stub,
    batch_request,
    body,
    items,
    new_env,
    new_key,
    rows,
    run_input,
)


async def runs_of(stack: LocalStack, env: str) -> list[str]:
    """Every run of the environment, in both databases."""
    found = []
    for db in (stack.controlplane_db, stack.runops_db):
        found += [
            r["id"]
            for r in await rows(
                db.admin_writer_dsn, "SELECT id FROM runs WHERE environment_id = $1", env
            )
        ]
    return found


def pre_minted(count: int) -> list[str]:
    """Run ids of both residencies, alternating."""
    residencies = (Residency.LEGACY, Residency.NEW)
    return [f"run_{body(residencies[n % 2])}" for n in range(count)]


async def test_concurrent_creates_of_one_key_in_both_databases_make_one_run(
    client: Stub, stack: LocalStack
) -> None:
    env = new_env()
    options = common_pb2.TriggerOptions(idempotency_key=new_key())
    singles = [
        client.CreateRun(rs.CreateRunRequest(run=run_input(env, run_id=run_id, options=options)))
        for run_id in pre_minted(24)
    ]
    # CreateRuns too, each request with the key in both databases.
    batched = [
        client.CreateRuns(
            rs.CreateRunsRequest(
                runs=[run_input(env, run_id=run_id, options=options) for run_id in pre_minted(2)]
            )
        )
        for _ in range(8)
    ]
    single_replies, batched_replies = await asyncio.gather(
        asyncio.gather(*singles), asyncio.gather(*batched)
    )
    results = [(r.run.id, r.is_cached) for r in single_replies] + [
        (r.run.id, r.is_cached) for reply in batched_replies for r in reply.results
    ]
    assert len(results) == 24 + 16
    assert len({run_id for run_id, _ in results}) == 1
    assert [cached for _, cached in results].count(False) == 1
    assert await runs_of(stack, env) == [results[0][0]]


async def test_a_keyed_batch_item_and_concurrent_creates_share_one_run(
    client: Stub, stack: LocalStack
) -> None:
    env = new_env()
    key = new_key()
    options = common_pb2.TriggerOptions(idempotency_key=key)
    batches = [
        (await client.CreateBatch(batch_request(env, 1, batch_id=f"batch_{body(residency)}"))).batch
        for residency in (Residency.LEGACY, Residency.NEW)
    ]
    creates = [
        client.CreateRun(rs.CreateRunRequest(run=run_input(env, run_id=run_id, options=options)))
        for run_id in pre_minted(12)
    ]
    accepts = [
        client.AcceptBatchItems(
            rs.AcceptBatchItemsRequest(
                batch_id=batch.id,
                environment_id=env,
                items=items([0], options=common_pb2.TriggerOptions(idempotency_key=key)),
            )
        )
        for batch in batches
    ]
    created, accepted = await asyncio.gather(asyncio.gather(*creates), asyncio.gather(*accepts))
    run_ids = {r.run.friendly_id for r in created} | {
        item.run_id for reply in accepted for item in reply.items
    }
    assert len(run_ids) == 1
    assert await runs_of(stack, env) == [run_ids.pop().removeprefix("run_")]
