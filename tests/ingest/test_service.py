"""BatchIngestService end to end on the real suite (control plane, run store, Postgres with
replicas, Redis, moto S3): Phase 1, Phase 2, the retry rule, refusals, item outcomes, watch."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from runops.common.v1 import common_pb2
from runops.ingest.v1 import ingest_pb2 as ing
from runops.kit.errors import details_of
from runops.runstore.client import RunStoreClient
from services.ingest.app import Ingest
from services.ingest.offload import STORE_PAYLOAD_TYPE, packet_key
from tests.controlplane.harness import INTERNAL, Seeded, expect_error
from tests.ingest.harness import Stub, Suite, item, items, requests, stub


async def create(api: Stub, run_count: int, **fields: object) -> common_pb2.Batch:
    reply = await api.CreateBatch(ing.CreateBatchRequest(run_count=run_count, **fields))  # type: ignore[arg-type]
    return reply.batch


async def all_runs(suite: Suite, batch_id: str, env_id: str) -> list[common_pb2.Run]:
    async with RunStoreClient(suite.runstore_target, token=INTERNAL) as store:
        runs: list[common_pb2.Run] = []
        token = ""
        while True:
            page, token = await store.list_batch_runs(
                batch_id, env_id, page_size=1000, page_token=token, read_your_writes=True
            )
            runs += page
            if not token:
                return runs


async def test_ten_thousand_items_shuffled_with_duplicates_seal_once(
    api: Stub, seeded: Seeded, suite: Suite
) -> None:
    n = 10_000
    batch = await create(api, n, idempotency_key="big")
    indexes = list(range(n)) + random.sample(range(n), 500)
    random.shuffle(indexes)
    chunks = [items(indexes[i : i + 700]) for i in range(0, len(indexes), 700)]
    reply = await api.StreamBatchItems(requests(batch.friendly_id, *chunks))
    assert reply.sealed and reply.accepted_count == n == reply.run_count
    assert reply.status == common_pb2.BATCH_STATUS_PROCESSING
    runs = await all_runs(suite, batch.friendly_id, seeded.env_id)
    assert [r.batch_index for r in runs] == list(range(n))
    assert len({r.id for r in runs}) == n
    assert all(r.payload == item(r.batch_index).payload for r in runs[:50])

    again = await api.StreamBatchItems(requests(batch.friendly_id, items(range(10))))
    assert again.sealed and again.accepted_count == n
    assert again.pre_failed_count == again.linked_count == 0
    assert len(await all_runs(suite, batch.friendly_id, seeded.env_id)) == n
    # Phase 1 replay: the same batch, cached.
    replay = await api.CreateBatch(ing.CreateBatchRequest(run_count=n, idempotency_key="big"))
    assert replay.is_cached and replay.batch.id == batch.id and replay.batch.sealed
