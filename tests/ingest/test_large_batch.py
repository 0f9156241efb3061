"""A 100,000-item batch (spec §5's maximum run_count) through the ingest service in one stream:
small items in client-sized chunks, cut into units of RUNOPS_MAX_CHUNK_ITEMS, each one
AcceptBatchItems; sealed once, one run per index in Postgres. Correctness only (on 2 shared
cores it takes well under a minute); runops.bench.ingest times the same flow."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from runops.common.v1 import common_pb2
from runops.ingest.v1 import ingest_pb2 as ing
from services.ingest.app import Ingest
from tests.controlplane.harness import Seeded
from tests.ingest.harness import Stub, Suite, item

pytestmark = pytest.mark.slow

N = 100_000
CHUNK = 1000  # the client library's default chunk, the service's default unit


async def chunks(batch_id: str) -> AsyncIterator[ing.StreamBatchItemsRequest]:
    """The header, then every index once, built as gRPC asks for them (never all in memory)."""
    yield ing.StreamBatchItemsRequest(header=ing.StreamHeader(batch_id=batch_id))
    for start in range(0, N, CHUNK):
        chunk = [item(i, size=8) for i in range(start, start + CHUNK)]
        yield ing.StreamBatchItemsRequest(chunk=ing.ItemChunk(items=chunk))


async def test_hundred_thousand_items_in_one_stream(
    api: Stub, ingest: Ingest, seeded: Seeded, suite: Suite
) -> None:
    # The bucket's default capacity (200,000) holds it; a fresh organization's bucket is full.
    batch = (await api.CreateBatch(ing.CreateBatchRequest(run_count=N))).batch
    started = time.monotonic()
    reply = await api.StreamBatchItems(chunks(batch.friendly_id), timeout=240)
    elapsed = time.monotonic() - started
    assert reply.sealed
    assert reply.accepted_count == reply.run_count == N
    assert reply.status == common_pb2.BATCH_STATUS_PROCESSING
    assert reply.pre_failed_count == reply.linked_count == 0
    phase2 = ingest.servicer.ended[-1]
    assert phase2.batch.id == batch.id
    assert phase2.pipeline.completed == N // CHUNK  # one AcceptBatchItems per unit
    assert elapsed < 120, f"{N:,} items took {elapsed:.1f}s"

    # Every index has exactly one run, in the batch's database.
    found = None
    for db in (suite.stack.controlplane_db, suite.stack.runops_db):
        conn = await asyncpg.connect(db.admin_writer_dsn)
        try:
            row = await conn.fetchrow(
                "SELECT count(*) AS runs, count(DISTINCT batch_index) AS indexes, "
                "min(batch_index) AS low, max(batch_index) AS high FROM runs WHERE batch_id = $1",
                batch.id,
            )
        finally:
            await conn.close()
        assert row is not None
        if row["runs"]:
            assert found is None, "runs of one batch in both databases"
            found = (row["runs"], row["indexes"], row["low"], row["high"])
    assert found == (N, N, 0, N - 1)
