"""Backpressure reaches the client (spec §5): while every slot of a stream's pipeline is busy,
the ingest server's transport holds at most about one chunk more of that stream (its bounded
read-ahead, `services.ingest.app.transport_options`), so the client's writes wait instead of
the server's memory growing: peak memory stays about concurrency x the largest chunk."""

from __future__ import annotations

import asyncio
from typing import Any

from runops.common.v1 import common_pb2
from runops.ingest.v1 import ingest_pb2 as ing
from services.ingest.app import transport_options
from services.ingest.offload import OffloadedPayload
from tests.controlplane.harness import Seeded
from tests.ingest.harness import Suite, ingest_in_process, item, settings_for, stub
from tests.ingest.test_service import create

CHUNK_BYTES = 64 * 1024  # the smallest RUNOPS_MAX_CHUNK_BYTES
ITEM_BYTES = 12 * 1024  # offloaded (the suite's threshold is 4 KiB), below the 16 KiB maximum
ITEMS_PER_CHUNK = 5  # about 60 KiB a message
CHUNKS = 40  # 2.4 MiB in all: far beyond the bound, well within an unbounded window


async def test_a_busy_stream_is_read_ahead_by_about_one_chunk(suite: Suite, seeded: Seeded) -> None:
    limits: dict[str, int] = {"ingest_concurrency": 1, "max_chunk_bytes": CHUNK_BYTES}
    async with ingest_in_process(suite, **limits) as svc:
        assert ("grpc.http2.bdp_probe", 0) in svc.app.transport_options
        assert svc.app.transport_options == transport_options(settings_for(suite, **limits))
        # Every upload waits until released: the one slot stays busy with the first unit.
        released, holding = asyncio.Event(), asyncio.Event()
        offloader = svc.servicer._offloader
        upload = offloader.offload

        async def held(**kwargs: Any) -> OffloadedPayload:
            holding.set()
            await released.wait()
            return await upload(**kwargs)

        offloader.offload = held  # type: ignore[method-assign]
        api = stub(svc.app.target, seeded.api_key)
        run_count = CHUNKS * ITEMS_PER_CHUNK
        batch = await create(api, run_count)
        call = api.StreamBatchItems()
        await call.write(ing.StreamBatchItemsRequest(header=ing.StreamHeader(batch_id=batch.id)))
        written = 0

        async def writer() -> None:
            nonlocal written
            for c in range(CHUNKS):
                first = c * ITEMS_PER_CHUNK
                chunk = [item(i, size=ITEM_BYTES) for i in range(first, first + ITEMS_PER_CHUNK)]
                await call.write(ing.StreamBatchItemsRequest(chunk=ing.ItemChunk(items=chunk)))
                written += 1
            await call.done_writing()

        writing = asyncio.create_task(writer())
        try:
            # Until the server holds the first unit, then long enough for an unbounded window
            # to take many more chunks.
            await asyncio.wait_for(holding.wait(), 10)
            await asyncio.sleep(1.0)
            # The unit in flight, about one chunk in the server's window, one in the client's
            # own send path.
            assert written <= 4, f"{written} chunks written while the only slot was busy"
        finally:
            released.set()
        async with asyncio.timeout(30):
            await writing
            reply = await call
        assert reply.sealed
        assert reply.accepted_count == run_count
        assert reply.status == common_pb2.BATCH_STATUS_PROCESSING
