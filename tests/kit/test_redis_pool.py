"""The kit's Redis pool closes what a burst opened once it has been idle past the limit, against
the session's real Redis (counted by Redis itself, `CLIENT LIST`)."""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis

from runops.kit.redis import RedisSettings, create_redis
from runops.kit.redis_pool import IdleClosingPool
from runops.localstack import LocalStack

BURST = 20


async def _connected(observer: aioredis.Redis, name: str) -> int:
    clients = await observer.client_list()
    return sum(1 for client in clients if client.get("name") == name)


async def _burst(client: aioredis.Redis, name: str) -> None:
    """BURST commands at once, each holding its connection for a moment (a blocking pop)."""
    await asyncio.gather(*(client.blpop([f"{name}:nothing:{i}"], 0.3) for i in range(BURST)))


async def _pool_after_idle(stack: LocalStack, redis_client: aioredis.Redis, idle: float) -> int:
    name = f"pool-{uuid.uuid4().hex[:8]}"
    pool = IdleClosingPool.from_url(
        stack.redis_url, max_idle_seconds=idle, client_name=name, max_connections=100
    )
    client = aioredis.Redis.from_pool(pool)
    try:
        await _burst(client, name)
        assert await _connected(redis_client, name) == BURST
        await asyncio.sleep(0.6)  # past the limit
        for _ in range(3):  # traffic goes on: one connection at a time
            await client.ping()
        return await _connected(redis_client, name)
    finally:
        await client.aclose()


async def test_a_bursts_connections_close_once_idle_past_the_limit(
    stack: LocalStack, redis_client: aioredis.Redis
) -> None:
    # The one connection still in use stays; the burst's extras are closed.
    assert await _pool_after_idle(stack, redis_client, 0.4) == 1


async def test_without_a_limit_the_pool_keeps_every_connection(
    stack: LocalStack, redis_client: aioredis.Redis
) -> None:
    assert await _pool_after_idle(stack, redis_client, 0) == BURST


async def test_a_closed_connection_is_opened_again_by_the_next_burst(
    stack: LocalStack, redis_client: aioredis.Redis
) -> None:
    name = f"pool-{uuid.uuid4().hex[:8]}"
    pool = IdleClosingPool.from_url(stack.redis_url, max_idle_seconds=0.2, client_name=name)
    client = aioredis.Redis.from_pool(pool)
    try:
        for _ in range(2):
            await _burst(client, name)
            assert await _connected(redis_client, name) == BURST
            await asyncio.sleep(0.4)
            await client.set(f"{name}:k", "v")
            assert await client.get(f"{name}:k") == b"v"
            assert await _connected(redis_client, name) == 1
    finally:
        await client.aclose()


def test_services_get_the_idle_closing_pool_from_their_settings(stack: LocalStack) -> None:
    client = create_redis(RedisSettings(url=stack.redis_url, max_idle_seconds=12.5))
    assert isinstance(client, aioredis.Redis)
    pool = client.connection_pool
    assert isinstance(pool, IdleClosingPool)
    assert pool.max_idle_seconds == 12.5
    assert RedisSettings(url=stack.redis_url).max_idle_seconds == 60.0
