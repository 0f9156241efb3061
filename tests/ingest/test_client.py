"""The client library against the real service: an aborted batch is an error whether this call
sealed it or a replayed key found it cached, and an item too large for one gRPC message is
refused at once, naming its index."""

from __future__ import annotations

import time

import pytest

from runops.ingest.client import BatchAborted, BatchResult, IngestClient, ItemTooLarge
from runops.ingest.v1 import ingest_pb2 as ing
from runops.kit.channels import DEFAULT_MAX_MESSAGE_BYTES
from services.ingest.app import Ingest
from tests.controlplane.harness import Seeded
from tests.ingest.harness import FAST, items


async def test_an_aborted_batch_raises_fresh_and_cached(ingest: Ingest, seeded: Seeded) -> None:
    # Every payload above the item maximum (16 KiB here): each item pre-fails, the seal aborts.
    too_big = items(range(3), payload=b"z" * 20_000)
    async with IngestClient(ingest.app.target, seeded.api_key, backoff=FAST) as client:
        with pytest.raises(BatchAborted) as fresh:
            await client.run_batch(3, too_big, idempotency_key="aborted-once")
        assert fresh.value.batch_id.startswith("batch_")
        assert fresh.value.aborted_reason == "EVERY_ITEM_FAILED"
        assert "was aborted (every item failed); create a new batch" in str(fresh.value)

        # The replayed key answers the cached batch (sealed, ABORTED): an error too, not success.
        with pytest.raises(BatchAborted) as cached:
            await client.run_batch(3, too_big, idempotency_key="aborted-once")
        assert cached.value.batch_id == fresh.value.batch_id
        assert cached.value.aborted_reason == "EVERY_ITEM_FAILED"
        assert str(cached.value) == str(fresh.value)


@pytest.mark.parametrize("limit", [DEFAULT_MAX_MESSAGE_BYTES, 256 * 1024])
async def test_an_item_above_the_message_limit_is_refused_at_once(
    ingest: Ingest, seeded: Seeded, limit: int
) -> None:
    async with IngestClient(
        ingest.app.target,
        seeded.api_key,
        backoff=FAST,
        max_bytes=min(limit, 64 * 1024),
        max_message_bytes=limit,
    ) as client:
        created = await client.create_batch(4)
        batch_id = created.batch.friendly_id
        # Item 2 alone exceeds a message; the others are small.
        source = [*items([0, 1]), *items([2], payload=b"x" * (limit + 1)), *items([3])]
        tally = BatchResult(batch_id, created, ing.StreamBatchItemsResponse())
        started = time.monotonic()
        with pytest.raises(ItemTooLarge) as caught:
            await client.stream_items(batch_id, source, result=tally)
        assert time.monotonic() - started < 5  # no backoff: never retried
        assert (caught.value.index, caught.value.limit) == (2, limit)
        assert caught.value.size > limit
        assert f"item 2 needs a {caught.value.size}-byte message" in str(caught.value)
        assert (tally.streams, tally.retries) == (1, 0)

        # The same batch takes the items once item 2 is made to fit (the server pre-fails it).
        source[2] = items([2], payload=b"x" * 20_000)[0]
        reply = await client.stream_items(batch_id, source)
        assert reply.sealed
        assert reply.accepted_count == 4
        assert reply.pre_failed_count == 1


def test_a_chunk_larger_than_a_message_is_a_mistake() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        IngestClient("localhost:1", "key", max_bytes=2048, max_message_bytes=1024)
