"""The per-organization token bucket against real Redis (standalone and Cluster): refill
arithmetic, concurrent charges never over-spend, RetryInfo, refusals; a replayed CreateBatch is
not charged, through any ingest process."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2, status_pb2
from redis.asyncio.cluster import RedisCluster

from runops.ingest.v1 import ingest_pb2 as ing
from runops.kit.errors import (
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    details_of,
    rich_status,
)
from runops.kit.redis import connect_redis
from runops.kit.settings import load_settings
from runops.localstack import LocalStack
from runops.localstack.ports import HOST, free_port
from services.ingest.ratelimit import TokenBucket, bucket_from_settings
from services.ingest.settings import IngestSettings
from tests.controlplane.harness import Seeded
from tests.harness import expect_error
from tests.ingest.harness import Suite, ingest_in_process, stub

SECOND = 1_000_000  # microseconds


def org() -> str:
    return "org_" + secrets.token_hex(6)


async def test_refill_arithmetic(redis_client: aioredis.Redis) -> None:
    bucket = TokenBucket(redis_client, capacity=100, refill_per_second=10)
    o, t0 = org(), 1_700_000_000 * SECOND
    first = await bucket.try_charge(o, 60, now_us=t0)  # a new bucket starts full
    assert (first.allowed, first.remaining, first.retry_after) == (True, 40, 0)
    refused = await bucket.try_charge(o, 50, now_us=t0)
    assert (refused.allowed, refused.remaining) == (False, 40)
    assert refused.retry_after == pytest.approx(1.0)  # 10 missing at 10/s
    half = await bucket.try_charge(o, 50, now_us=t0 + SECOND // 2)  # 45 there: still short
    assert (half.allowed, half.remaining) == (False, 45)
    assert half.retry_after == pytest.approx(0.5)
    later = await bucket.try_charge(o, 50, now_us=t0 + SECOND)  # 50 there
    assert (later.allowed, later.remaining) == (True, 0)
    # Refill stops at capacity, however long the organization was idle.
    idle = await bucket.try_charge(o, 1, now_us=t0 + 3600 * SECOND)
    assert (idle.allowed, idle.remaining) == (True, 99)
    # A clock that goes back (a failover) refills nothing and never goes negative.
    back = await bucket.try_charge(o, 99, now_us=t0)
    assert (back.allowed, back.remaining) == (True, 0)
    assert not (await bucket.try_charge(o, 1, now_us=t0)).allowed


async def test_key_expires_once_it_would_be_full(redis_client: aioredis.Redis) -> None:
    bucket = TokenBucket(redis_client, capacity=100, refill_per_second=10)
    o = org()
    await bucket.try_charge(o, 30)
    ttl_ms = await redis_client.pttl(bucket.key(o))
    # 30 tokens at 10/s: full again in 3 s, plus a second of margin.
    assert 3000 < ttl_ms <= 4000


async def test_charge_refuses_with_retry_info_and_succeeds_after_it(
    redis_client: aioredis.Redis,
) -> None:
    bucket = TokenBucket(redis_client, capacity=100, refill_per_second=1000)
    o = org()
    await bucket.charge(o, 100)
    with pytest.raises(ResourceExhausted) as info:
        await bucket.charge(o, 50)
    err = info.value
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.reason == "BATCH_RATE_LIMITED"
    assert err.metadata["requested"] == "50"
    assert err.retry_after is not None
    assert 0 < err.retry_after <= 0.051
    # The status a client receives carries it as google.rpc.RetryInfo.
    trailers = dict(rich_status(err).trailing_metadata)
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    retry_infos = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(retry_infos) == 1
    retry = error_details_pb2.RetryInfo()
    retry_infos[0].Unpack(retry)
    assert retry.retry_delay.ToNanoseconds() == int(err.retry_after * 1e9)
    # Retrying at the hint succeeds (nobody else spends from this organization).
    await asyncio.sleep(err.retry_after)
    assert (await bucket.charge(o, 50)).allowed


async def test_more_than_capacity_is_refused_clearly(redis_client: aioredis.Redis) -> None:
    bucket = TokenBucket(redis_client, capacity=100, refill_per_second=1000)
    with pytest.raises(InvalidArgument) as info:
        await bucket.charge(org(), 101)
    assert info.value.reason == "RUN_COUNT_ABOVE_RATE_LIMIT_CAPACITY"
    assert [v.field for v in info.value.violations] == ["run_count"]
    assert "split the batch" in info.value.message


async def test_organizations_have_their_own_buckets(redis_client: aioredis.Redis) -> None:
    bucket = TokenBucket(redis_client, capacity=10, refill_per_second=0.001)
    a, b = org(), org()
    await bucket.charge(a, 10)
    assert (await bucket.charge(b, 10)).allowed
    with pytest.raises(ResourceExhausted):
        await bucket.charge(a, 1)


async def concurrent_charges(clients: list[Any], charges: int, cost: int, capacity: int) -> int:
    """`charges` concurrent charges of `cost` from buckets on several clients (as from several
    ingest processes); returns how many were allowed."""
    buckets = [TokenBucket(c, capacity=capacity, refill_per_second=1e-6) for c in clients]
    o = org()
    decisions = await asyncio.gather(
        *(buckets[i % len(buckets)].try_charge(o, cost) for i in range(charges))
    )
    return sum(d.allowed for d in decisions)


async def test_concurrent_charges_never_overspend(stack: LocalStack) -> None:
    clients = [aioredis.Redis.from_url(stack.redis_url) for _ in range(3)]
    try:
        allowed = await concurrent_charges(clients, charges=300, cost=7, capacity=1000)
    finally:
        for client in clients:
            await client.aclose()
    assert allowed == 1000 // 7  # exactly as many as fit, no more, no fewer


@pytest.mark.cluster
async def test_on_redis_cluster(redis_cluster_client: RedisCluster) -> None:
    # 90 at once: below the cluster client's 100 connections per node (a non-blocking pool: more
    # would fail MaxConnectionsError, not test the bucket), and more than the 83 that fit.
    allowed = await concurrent_charges([redis_cluster_client], charges=90, cost=12, capacity=1000)
    assert allowed == 1000 // 12
    bucket = TokenBucket(redis_cluster_client, capacity=100, refill_per_second=10)
    o, t0 = org(), 1_700_000_000 * SECOND
    assert (await bucket.try_charge(o, 60, now_us=t0)).remaining == 40
    refused = await bucket.try_charge(o, 50, now_us=t0)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(1.0)
    # Buckets of many organizations spread over the cluster's nodes.
    slots = {RedisCluster.keyslot(redis_cluster_client, TokenBucket.key(org())) for _ in range(50)}
    assert len(slots) > 1


async def test_redis_down_is_unavailable() -> None:
    client = aioredis.Redis(host=HOST, port=free_port(), socket_connect_timeout=1)
    try:
        with pytest.raises(Unavailable) as info:
            await TokenBucket(client, capacity=10, refill_per_second=1).charge(org(), 1)
    finally:
        await client.aclose()
    assert info.value.reason == "REDIS_UNAVAILABLE"
    assert info.value.retry_after is not None


async def test_client_and_bucket_from_settings(stack: LocalStack) -> None:
    settings = load_settings(
        IngestSettings,
        s3_bucket="runops-packets",
        redis={"url": stack.redis_url},
        controlplane_target="a:1",
        runstore_target="b:1",
        mollifier_target="c:1",
    )
    client = await connect_redis(settings.redis)
    try:
        bucket = bucket_from_settings(settings, client)
        assert bucket.capacity == settings.rate_limit_capacity
        assert (await bucket.charge(org(), settings.max_run_count)).allowed
    finally:
        await client.aclose()


# 100 tokens, and a refill slow enough to read "unchanged".
SMALL_SLOW_BUCKET: dict[str, Any] = {
    "rate_limit_capacity": 100,
    "max_run_count": 100,
    "rate_limit_refill_per_second": 0.001,
}


async def tokens_held(redis: Any, organization_id: str) -> float:
    return float(await redis.hget(TokenBucket.key(organization_id), "tokens"))


async def test_a_replayed_create_batch_is_not_charged_through_any_process(
    suite: Suite, seeded: Seeded
) -> None:
    # Two ingest processes on one Redis.
    async with (
        ingest_in_process(suite, **SMALL_SLOW_BUCKET) as one,
        ingest_in_process(suite, **SMALL_SLOW_BUCKET) as other,
    ):
        first, second = stub(one.app.target, seeded.api_key), stub(other.app.target, seeded.api_key)
        made = await first.CreateBatch(ing.CreateBatchRequest(run_count=60, idempotency_key="k"))
        assert not made.is_cached
        await first.CreateBatch(ing.CreateBatchRequest(run_count=40))  # the bucket is empty now
        exc = await expect_error(
            second.CreateBatch(ing.CreateBatchRequest(run_count=1)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        assert details_of(exc).reason == "BATCH_RATE_LIMITED"
        before = await tokens_held(one.redis, seeded.org_id)
        assert before < 1
        for api in (first, second, second):
            replay = await api.CreateBatch(
                ing.CreateBatchRequest(run_count=60, idempotency_key="k")
            )
            assert replay.is_cached
            assert replay.batch.friendly_id == made.batch.friendly_id
        assert await tokens_held(one.redis, seeded.org_id) == pytest.approx(before, abs=0.1)


async def test_a_replay_charged_before_its_key_was_known_is_refunded(
    suite: Suite, seeded: Seeded
) -> None:
    async with ingest_in_process(suite, **SMALL_SLOW_BUCKET) as one:
        api = stub(one.app.target, seeded.api_key)
        made = await api.CreateBatch(ing.CreateBatchRequest(run_count=30, idempotency_key="r"))
        before = await tokens_held(one.redis, seeded.org_id)
        assert before == pytest.approx(70, abs=0.1)
        # As if a concurrent create through another process had not left its marker yet.
        marker = TokenBucket.replay_key(seeded.org_id, seeded.env_id, "r")
        assert await one.redis.get(marker) == made.batch.id.encode()
        await one.redis.delete(marker)
        replay = await api.CreateBatch(ing.CreateBatchRequest(run_count=30, idempotency_key="r"))
        assert replay.is_cached
        assert replay.batch.friendly_id == made.batch.friendly_id
        assert await tokens_held(one.redis, seeded.org_id) == pytest.approx(before, abs=0.1)
        # Remembered again: with the bucket empty, the next replay is still answered.
        assert await one.redis.get(marker) == made.batch.id.encode()
        await api.CreateBatch(ing.CreateBatchRequest(run_count=70))
        replay = await api.CreateBatch(ing.CreateBatchRequest(run_count=30, idempotency_key="r"))
        assert replay.is_cached
