"""Batches through the public entry: a 10,000-item batch with large payloads through the
client library, and a batch-and-wait whose parent's waitpoint completes with its runs."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from runops.common.v1 import common_pb2
from runops.ingest.client import IngestClient
from runops.ingest.v1 import ingest_pb2 as ing
from runops.mollifier.v1 import mollifier_pb2 as m
from runops.runstore.v1 import runstore_pb2 as rs
from tests.e2e.suite import Clients, eventually, new_tenant

KIB = 1024
ITEMS = 10_000
# The services' defaults: at or above 512 KiB a payload goes to the object store, above 3 MiB
# the item becomes a pre-failed run.
OFFLOADED = {7: 512 * KIB, 4_321: 600 * KIB, 9_999: 700 * KIB}
TOO_LARGE = {42: 3 * 1024 * KIB + 1, 5_000: 3 * 1024 * KIB + 4 * KIB}
STORE_PAYLOAD_TYPE = "application/store"


def payload(index: int) -> bytes:
    size = OFFLOADED.get(index) or TOO_LARGE.get(index)
    small = f'{{"index":{index}}}'.encode()
    return small if size is None else small.ljust(size, b" ")


def items() -> Iterator[ing.BatchItem]:
    for index in range(ITEMS):
        yield ing.BatchItem(
            index=index, task="e2e/batch", payload=payload(index), payload_type="application/json"
        )


@pytest.mark.slow
async def test_ten_thousand_items_with_large_payloads(clients: Clients) -> None:
    tenant = await new_tenant(clients.admin)
    async with IngestClient(clients.endpoints.ingest, tenant.api_key, timeout=120) as client:
        result = await client.run_batch(ITEMS, items, task_identifiers=["e2e/batch"])
        reply = result.response
        assert reply.sealed
        assert reply.accepted_count == reply.run_count == ITEMS
        if result.streams == 1:  # the reply counts its own stream's items (a retry resends some)
            assert reply.pre_failed_count == len(TOO_LARGE)
        assert reply.status == common_pb2.BATCH_STATUS_PARTIAL_FAILED

        every: list[ing.BatchItemOutcome] = []

        async def listed() -> bool:  # public reads go to the replica: wait out its lag
            every[:] = [o async for o in client.list_batch_items(result.batch_id, page_size=1000)]
            return len(every) == ITEMS

        await eventually(listed, limit=30, what="every item outcome listed")
        assert sorted(o.index for o in every) == list(range(ITEMS))
        assert len({o.run_id for o in every}) == ITEMS, "exactly one run per item"
        failed = [
            o
            async for o in client.list_batch_items(
                result.batch_id, filter=ing.ITEM_FILTER_PRE_FAILED_OR_LINKED
            )
        ]
        assert {o.index: (o.outcome, o.error_code) for o in failed} == {
            i: (ing.ITEM_OUTCOME_PRE_FAILED, "PAYLOAD_TOO_LARGE") for i in TOO_LARGE
        }
        batch = await client.get_batch(result.batch_id)
        assert batch.run_count == batch.accepted_count == ITEMS
        assert batch.sealed

    # The offloaded items' runs carry a reference to the object store instead of the payload.
    by_index = {o.index: o for o in every}
    for index in (*OFFLOADED, 0, ITEMS - 2):
        assert by_index[index].outcome == ing.ITEM_OUTCOME_CREATED
        run = (
            await clients.runstore.GetRun(
                rs.GetRunRequest(
                    run_id=by_index[index].run_id, environment_id=tenant.environment_id
                )
            )
        ).run
        assert run.batch_index == index
        if index in OFFLOADED:
            assert run.payload_type == STORE_PAYLOAD_TYPE
            assert run.payload.decode().endswith(f"item_{index}/payload")
        else:
            assert run.payload == payload(index)


async def test_batch_and_wait_completes_the_parents_waitpoint(clients: Clients) -> None:
    tenant = await new_tenant(clients.admin)
    env = tenant.environment_id
    parent = (
        await clients.mollifier.Trigger(
            m.TriggerRequest(
                environment_id=env,
                task_identifier="e2e/parent",
                payload=b"{}",
                payload_type="application/json",
            )
        )
    ).run
    async with IngestClient(clients.endpoints.ingest, tenant.api_key, timeout=30) as client:
        result = await client.run_batch(
            20,
            [ing.BatchItem(index=i, task="e2e/child", payload=b"{}") for i in range(20)],
            parent_run_id=parent.friendly_id,
            resume_parent_on_completion=True,
        )
        assert result.response.sealed
        runs: list[str] = []

        async def listed() -> bool:  # public reads go to the replica: wait out its lag
            runs[:] = [o.run_id async for o in client.list_batch_items(result.batch_id)]
            return len(runs) == 20

        await eventually(listed, limit=15, what="the batch's 20 runs listed")
        batch = await client.get_batch(result.batch_id)
        assert batch.waitpoint_id, "a batch-and-wait has its parent's waitpoint"
        assert batch.parent_run_id in (parent.friendly_id, parent.id)

    async def waitpoint() -> common_pb2.Waitpoint:
        reply = await clients.runstore.GetWaitpoint(
            rs.GetWaitpointRequest(
                waitpoint_id=batch.waitpoint_id,
                environment_id=env,
                consistency=common_pb2.CONSISTENCY_LEVEL_READ_YOUR_WRITES,
            )
        )
        return reply.waitpoint

    assert (await waitpoint()).status == common_pb2.WAITPOINT_STATUS_PENDING
    # The runs finish (what workers would report through the run store), one failing.
    await asyncio.gather(
        *(
            clients.runstore.CompleteRun(
                rs.CompleteRunRequest(
                    run_id=run_id,
                    environment_id=env,
                    success=rs.RunSuccess(output=b"{}", output_type="application/json"),
                )
                if i
                else rs.CompleteRunRequest(
                    run_id=run_id,
                    environment_id=env,
                    failure=common_pb2.RunError(code="TASK_FAILED", message="e2e"),
                )
            )
            for i, run_id in enumerate(runs)
        )
    )

    async def completed() -> bool:
        return (await waitpoint()).status == common_pb2.WAITPOINT_STATUS_COMPLETED

    await eventually(completed, limit=30, what="the parent's waitpoint completed")
    async with IngestClient(clients.endpoints.ingest, tenant.api_key) as client:

        async def batch_completed() -> bool:
            done = await client.get_batch(result.batch_id)
            return (
                done.status == common_pb2.BATCH_STATUS_COMPLETED and done.completed_run_count == 20
            )

        await eventually(batch_completed, limit=15, what="the batch COMPLETED")
