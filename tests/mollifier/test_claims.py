"""Idempotency claims against real Redis and the 3-master Cluster."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from runops.kit.ids import Residency, mint
from runops.kit.redis import RedisClient
from services.mollifier.claims import (
    ClaimKey,
    ClaimOutcome,
    ClaimTimeout,
    IdempotencyClaims,
)
from services.mollifier.keys import EnvKeys
from services.mollifier.scripts import Scripts


def claims_of(redis: RedisClient, prefix: str, **kwargs: float) -> IdempotencyClaims:
    return IdempotencyClaims(redis, Scripts(redis), prefix=prefix, **kwargs)  # type: ignore[arg-type]


async def test_fifty_concurrent_claimers_of_one_key_get_one_owner_and_its_run(
    redis: RedisClient, prefix: str
) -> None:
    claims = claims_of(redis, prefix, poll_interval_seconds=0.01)
    key = ClaimKey("env_a", "task", "same-key")
    run_id = mint("run", Residency.NEW)
    created: list[str] = []

    async def trigger() -> str:
        result = await claims.claim(key)
        if result.outcome is ClaimOutcome.CLAIMED:
            await asyncio.sleep(0.1)  # create the run
            created.append(run_id)
            assert await claims.publish(key, result.token, run_id)
            return run_id
        assert result.outcome is ClaimOutcome.EXISTING
        return result.run_id

    got = await asyncio.gather(*(trigger() for _ in range(50)))
    assert created == [run_id]
    assert set(got) == {run_id}


async def test_release_is_compare_and_delete_and_a_waiter_takes_over(
    redis: RedisClient, prefix: str
) -> None:
    claims = claims_of(redis, prefix, poll_interval_seconds=0.01)
    key = ClaimKey("env_a", "task", "k")
    first = await claims.claim(key)
    assert first.outcome is ClaimOutcome.CLAIMED
    assert not await claims.release(key, "not-the-owner")
    assert not await claims.publish(key, "not-the-owner", "run_x")
    waiter = asyncio.create_task(claims.claim(key))
    await asyncio.sleep(0.05)
    assert not waiter.done()  # pending: it waits for the owner
    assert await claims.release(key, first.token)
    second = await asyncio.wait_for(waiter, 5)
    assert second.outcome is ClaimOutcome.CLAIMED
    assert second.token != first.token
    assert not await claims.release(key, first.token)  # no longer the owner


async def test_a_waiter_gives_up_after_the_wait(redis: RedisClient, prefix: str) -> None:
    claims = claims_of(redis, prefix, wait_seconds=0.3, poll_interval_seconds=0.02)
    key = ClaimKey("env_a", "task", "slow")
    assert (await claims.claim(key)).outcome is ClaimOutcome.CLAIMED
    with pytest.raises(ClaimTimeout):
        await claims.claim(key)


@pytest.mark.parametrize(
    ("expires_in", "expected_ttl"),
    [
        (None, 30.0),
        (timedelta(seconds=1), 5.0),
        (timedelta(seconds=12), 12.0),
        (timedelta(days=2), 30.0),
    ],
)
async def test_claim_ttl_is_clamped_by_the_keys_own_expiry(
    redis: RedisClient, prefix: str, expires_in: timedelta | None, expected_ttl: float
) -> None:
    claims = claims_of(redis, prefix)
    expires = None if expires_in is None else datetime.now(UTC) + expires_in
    key = ClaimKey("env_a", "task", "ttl", expires)
    assert (await claims.claim(key)).outcome is ClaimOutcome.CLAIMED
    ttl_ms = await redis.pttl(EnvKeys(prefix, "env_a").claim("task", "ttl"))
    assert expected_ttl * 1000 - 500 < ttl_ms <= expected_ttl * 1000


async def test_after_the_keys_expiry_a_published_claim_is_claimed_anew(
    redis: RedisClient, prefix: str
) -> None:
    claims = claims_of(redis, prefix)
    key = ClaimKey("env_a", "task", "exp", datetime.now(UTC) + timedelta(milliseconds=300))
    first = await claims.claim(key)
    await claims.publish(key, first.token, "run_old")
    assert (await claims.claim(key)).run_id == "run_old"
    await asyncio.sleep(0.4)  # the claim itself lives 5 s; the key expired
    assert (await claims.claim(key)).outcome is ClaimOutcome.CLAIMED


async def test_batched_claims_span_slots_and_answer_each_key(
    redis: RedisClient, prefix: str
) -> None:
    claims = claims_of(redis, prefix, batch_size=7)
    keys = [ClaimKey(f"env_{i % 5}", "task", f"key-{i}") for i in range(60)]
    published = await claims.try_claim_many(keys[:20])
    assert all(r.outcome is ClaimOutcome.CLAIMED for r in published)
    assert all(
        await claims.publish_many(
            [
                (k, r.token, f"run_{i}")
                for i, (k, r) in enumerate(zip(keys[:20], published, strict=True))
            ]
        )
    )
    pending = await claims.try_claim_many(keys[20:30])
    results = await claims.try_claim_many(keys)
    assert [r.outcome for r in results[:20]] == [ClaimOutcome.EXISTING] * 20
    assert [r.run_id for r in results[:20]] == [f"run_{i}" for i in range(20)]
    assert [r.outcome for r in results[20:30]] == [ClaimOutcome.PENDING] * 10
    assert [r.outcome for r in results[30:]] == [ClaimOutcome.CLAIMED] * 30
    released = await claims.release_many(
        [(k, r.token) for k, r in zip(keys[20:30], pending, strict=True)]
    )
    assert all(released)
    assert {r.outcome for r in await claims.claim_many(keys[20:30])} == {ClaimOutcome.CLAIMED}
