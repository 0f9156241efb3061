"""The mollifier core against real Redis: every test here runs twice, against the standalone
server and against the 3-master Redis Cluster (fixture `redis`)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from runops.kit.redis import RedisClient, RedisSettings, connect_redis
from services.mollifier.buffer import MollifierBuffer


@pytest.fixture(params=["standalone", "cluster"])
async def redis(request: pytest.FixtureRequest) -> AsyncIterator[RedisClient]:
    """The kit's client (runops.kit.redis) of the standalone Redis or of the Cluster (keys
    must be unique per test)."""
    if request.param == "standalone":
        settings = RedisSettings(url=request.getfixturevalue("stack").redis_url)
    else:
        settings = RedisSettings(cluster_nodes=tuple(request.getfixturevalue("redis_cluster")))
    client = await connect_redis(settings)
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
