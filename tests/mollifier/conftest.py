"""The mollifier core against real Redis: every test here runs twice, against the standalone
server and against the 3-master Redis Cluster (fixture `redis`)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from runops.kit.redis import RedisClient
from services.mollifier.buffer import MollifierBuffer


@pytest.fixture(params=["standalone", "cluster"])
async def redis(request: pytest.FixtureRequest) -> AsyncIterator[RedisClient]:
    """A client of the standalone Redis or of the Cluster (keys must be unique per test)."""
    if request.param == "standalone":
        client: RedisClient = aioredis.Redis.from_url(request.getfixturevalue("stack").redis_url)
    else:
        nodes = request.getfixturevalue("redis_cluster")
        client = RedisCluster(
            startup_nodes=[ClusterNode(h, int(p)) for h, p in (n.rsplit(":", 1) for n in nodes)]
        )
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test alone (the servers are shared by the session)."""
    return f"mtest-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def buffer(redis: RedisClient, prefix: str) -> MollifierBuffer:
    return MollifierBuffer(redis, prefix=prefix, ack_grace_seconds=30)
