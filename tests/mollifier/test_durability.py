"""Accepted entries survive a Redis restart: the local Redis logs every write to its
append-only file (`appendfsync everysec`). A clean restart (SIGTERM: Redis fsyncs and exits)
loses nothing; a crash (SIGKILL) loses at most what was acknowledged in the last moments
before it — measured and printed here, bounded generously (docs/mollifier.md)."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.exceptions

from runops.kit.redis import RedisSettings, connect_redis
from runops.localstack.redis import RedisServer
from services.mollifier.buffer import MollifierBuffer
from tests.mollifier.helpers import accept_all, now, snapshot

ENV = "env_durable"


async def _buffer(redis_server: RedisServer) -> MollifierBuffer:
    client = await connect_redis(RedisSettings(url=redis_server.url, retry_attempts=0))
    return MollifierBuffer(client, prefix="durable")


async def test_accepted_entries_survive_a_clean_restart(redis_server: RedisServer) -> None:
    buffer = await _buffer(redis_server)
    snaps = [snapshot(ENV, idempotency_key=f"k{i}") for i in range(500)]
    await accept_all(buffer, snaps)
    await buffer.client.aclose()

    redis_server.stop(keep_files=True)
    redis_server.start()

    buffer = await _buffer(redis_server)
    try:
        stats = await buffer.stats(ENV)
        assert stats.depth == 500
        popped = await buffer.pop(ENV, 500, "after-restart")
        assert [e.run_id for e in popped] == [s.run_id for s in snaps]
        found = await buffer.find_by_idempotency_key(ENV, "send-email", "k7")
        assert found is not None
        assert found.run_id == snaps[7].run_id
    finally:
        await buffer.client.aclose()


@pytest.mark.slow
async def test_a_crash_loses_at_most_the_last_moments_of_acknowledged_entries(
    redis_server: RedisServer,
) -> None:
    buffer = await _buffer(redis_server)
    acked: list[tuple[str, float]] = []
    stop_at = time.monotonic() + 3.0

    async def accept_until_killed() -> None:
        while True:
            snap = snapshot(ENV)
            try:
                await buffer.accept(snap, created_at=now())
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                return
            acked.append((snap.run_id, time.monotonic()))

    writers = [asyncio.create_task(accept_until_killed()) for _ in range(4)]
    await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
    killed_at = time.monotonic()
    redis_server.kill()
    await asyncio.wait_for(asyncio.gather(*writers), 30)
    await buffer.client.aclose()

    redis_server.start()
    buffer = await _buffer(redis_server)
    try:
        kept = {e.run_id for e in await buffer.pop(ENV, len(acked) + 10, "after-crash")}
    finally:
        await buffer.client.aclose()
    lost = [(run_id, at) for run_id, at in acked if run_id not in kept]
    window = killed_at - min((at for _, at in lost), default=killed_at)
    print(
        f"\nAOF everysec, redis-server SIGKILLed after {len(acked)} acknowledged accepts: "
        f"{len(lost)} lost, loss window {window * 1000:.0f} ms before the kill"
    )
    assert len(kept) > 0
    # Redis write()s the append-only file before it replies, so a process crash normally loses
    # nothing (the kernel still has the pages); everysec bounds the loss to the writes of the
    # last fsync interval (up to 2 s if an fsync is slow) — what a machine crash would cost.
    assert window <= 2.5
