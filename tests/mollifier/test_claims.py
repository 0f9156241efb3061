"""Idempotency claims against real Redis and the 3-master Cluster: the Redis primitive
(`ClaimStore`) and the protocol's wait for a key another caller holds (`IdempotencyClaims`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from runops.kit.ids import Residency, mint
from runops.kit.redis import RedisClient
from runops.mollifier.claims import ClaimOutcome, KeyToClaim
from runops.runstore.client import RunStoreClient
from services.mollifier.buffer import MollifierBuffer
from services.mollifier.claim_store import ClaimStore
from services.mollifier.claims import IdempotencyClaims
from services.mollifier.keys import EnvKeys
from services.mollifier.runs import BufferedRuns

ENV = "env_a"


def store_of(buffer: MollifierBuffer, prefix: str, **kwargs: float) -> ClaimStore:
    return ClaimStore(buffer.scripts, prefix=prefix, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def run_store() -> AsyncIterator[RunStoreClient]:
    """Never called: these claims resolve in Redis alone."""
    async with RunStoreClient("127.0.0.1:9") as client:
        yield client


async def publish(store: ClaimStore, key: KeyToClaim, token: str, run_id: str) -> bool:
    return (await store.publish_many(ENV, [(key, token, run_id)]))[0]


async def release(store: ClaimStore, key: KeyToClaim, token: str) -> bool:
    return (await store.release_many(ENV, [(key, token)]))[0]


async def test_fifty_concurrent_claimers_of_one_key_get_one_owner_and_its_run(
    buffer: MollifierBuffer, prefix: str, run_store: RunStoreClient
) -> None:
    store = store_of(buffer, prefix)
    claims = IdempotencyClaims(
        store, buffer, BufferedRuns(buffer, run_store), poll_interval_seconds=0.01
    )
    key = KeyToClaim("task", "same-key")
    run_id = mint("run", Residency.NEW)
    created: list[str] = []

    async def trigger() -> str:
        answer = (await claims.acquire(ENV, [key]))[0]
        if answer.outcome is ClaimOutcome.CLAIMED:
            await asyncio.sleep(0.1)  # create the run
            created.append(run_id)
            assert await publish(store, key, answer.claim_token, run_id)
            return run_id
        assert answer.outcome is ClaimOutcome.EXISTING_RUN
        return answer.existing_run_id

    got = await asyncio.gather(*(trigger() for _ in range(50)))
    assert created == [run_id]
    assert set(got) == {run_id}


async def test_release_is_compare_and_delete_and_a_waiter_takes_over(
    buffer: MollifierBuffer, prefix: str, run_store: RunStoreClient
) -> None:
    store = store_of(buffer, prefix)
    claims = IdempotencyClaims(
        store, buffer, BufferedRuns(buffer, run_store), poll_interval_seconds=0.01
    )
    key = KeyToClaim("task", "k")
    [first] = await claims.acquire(ENV, [key])
    assert first.outcome is ClaimOutcome.CLAIMED
    assert not await release(store, key, "not-the-owner")
    assert not await publish(store, key, "not-the-owner", "run_x")
    waiter = asyncio.create_task(claims.acquire(ENV, [key]))
    await asyncio.sleep(0.05)
    assert not waiter.done()  # pending: it waits for the owner
    assert await release(store, key, first.claim_token)
    [second] = await asyncio.wait_for(waiter, 5)
    assert second.outcome is ClaimOutcome.CLAIMED
    assert second.claim_token != first.claim_token
    assert not await release(store, key, first.claim_token)  # no longer the owner


async def test_a_waiter_gives_up_after_the_wait(
    buffer: MollifierBuffer, prefix: str, run_store: RunStoreClient
) -> None:
    claims = IdempotencyClaims(
        store_of(buffer, prefix),
        buffer,
        BufferedRuns(buffer, run_store),
        wait_seconds=0.3,
        poll_interval_seconds=0.02,
    )
    key = KeyToClaim("task", "slow")
    assert (await claims.acquire(ENV, [key]))[0].outcome is ClaimOutcome.CLAIMED
    began = time.monotonic()
    [answer] = await claims.acquire(ENV, [key])
    assert answer.outcome is ClaimOutcome.PENDING
    # It polled (20 ms doubling to 160 ms) while the next poll still fell within the wait.
    assert 0.1 < time.monotonic() - began < 1.0
    # No wait: one attempt.
    assert (await claims.acquire(ENV, [key], 0))[0].outcome is ClaimOutcome.PENDING


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
    redis: RedisClient,
    buffer: MollifierBuffer,
    prefix: str,
    expires_in: timedelta | None,
    expected_ttl: float,
) -> None:
    store = store_of(buffer, prefix)
    expires = None if expires_in is None else datetime.now(UTC) + expires_in
    key = KeyToClaim("task", "ttl", expires)
    assert (await store.try_claim_many(ENV, [key]))[0].outcome is ClaimOutcome.CLAIMED
    ttl_ms = await redis.pttl(EnvKeys(prefix, ENV).claim("task", "ttl"))
    assert expected_ttl * 1000 - 500 < ttl_ms <= expected_ttl * 1000


async def test_after_the_keys_expiry_a_published_claim_is_claimed_anew(
    buffer: MollifierBuffer, prefix: str
) -> None:
    store = store_of(buffer, prefix)
    key = KeyToClaim("task", "exp", datetime.now(UTC) + timedelta(milliseconds=300))
    [first] = await store.try_claim_many(ENV, [key])
    await publish(store, key, first.claim_token, "run_old")
    assert (await store.try_claim_many(ENV, [key]))[0].existing_run_id == "run_old"
    await asyncio.sleep(0.4)  # the claim itself lives 5 s; the key expired
    assert (await store.try_claim_many(ENV, [key]))[0].outcome is ClaimOutcome.CLAIMED


async def test_batched_claims_are_chunked_and_answer_each_key(
    buffer: MollifierBuffer, prefix: str, run_store: RunStoreClient
) -> None:
    store = store_of(buffer, prefix, batch_size=7)
    keys = [KeyToClaim("task", f"key-{i}") for i in range(60)]
    published = await store.try_claim_many(ENV, keys[:20])
    assert all(r.outcome is ClaimOutcome.CLAIMED for r in published)
    assert [r.key for r in published] == keys[:20]
    assert all(
        await store.publish_many(
            ENV,
            [
                (k, r.claim_token, f"run_{i}")
                for i, (k, r) in enumerate(zip(keys[:20], published, strict=True))
            ],
        )
    )
    pending = await store.try_claim_many(ENV, keys[20:30])
    results = await store.try_claim_many(ENV, keys)
    assert [r.key for r in results] == keys
    assert [r.outcome for r in results[:20]] == [ClaimOutcome.EXISTING_RUN] * 20
    assert [r.existing_run_id for r in results[:20]] == [f"run_{i}" for i in range(20)]
    assert [r.outcome for r in results[20:30]] == [ClaimOutcome.PENDING] * 10
    assert [r.outcome for r in results[30:]] == [ClaimOutcome.CLAIMED] * 30
    # Another environment's keys of the same names are its own.
    assert {r.outcome for r in await store.try_claim_many("env_b", keys[:20])} == {
        ClaimOutcome.CLAIMED
    }
    released = await store.release_many(
        ENV, [(k, r.claim_token) for k, r in zip(keys[20:30], pending, strict=True)]
    )
    assert all(released)
    claims = IdempotencyClaims(store, buffer, BufferedRuns(buffer, run_store))
    acquired = await claims.acquire(ENV, keys[20:30])
    assert {r.outcome for r in acquired} == {ClaimOutcome.CLAIMED}


async def test_an_owner_gets_back_a_claim_it_holds_and_nobody_else_does(
    redis: RedisClient, buffer: MollifierBuffer, prefix: str
) -> None:
    store = store_of(buffer, prefix, max_ttl_seconds=10)
    key = KeyToClaim("task", "owned", owner="batch_a")
    claim_key = EnvKeys(prefix, ENV).claim("task", "owned")
    [first] = await store.try_claim_many(ENV, [key])
    assert first.outcome is ClaimOutcome.CLAIMED
    await redis.pexpire(claim_key, 2000)  # as if the claim had been held a while
    # Its owner gets it back: the token it holds, the TTL renewed as for a new claim.
    [again] = await store.try_claim_many(ENV, [key])
    assert again.outcome is ClaimOutcome.CLAIMED
    assert again.claim_token == first.claim_token
    assert 9500 < await redis.pttl(claim_key) <= 10_000
    # Another owner, and no owner, wait as before.
    others = [KeyToClaim("task", "owned", owner="batch_b"), KeyToClaim("task", "owned")]
    assert [a.outcome for a in await store.try_claim_many(ENV, others)] == [
        ClaimOutcome.PENDING
    ] * 2
    # A claim taken without an owner is nobody's to re-enter, the empty owner's included.
    unowned = KeyToClaim("task", "unowned")
    assert (await store.try_claim_many(ENV, [unowned]))[0].outcome is ClaimOutcome.CLAIMED
    assert (await store.try_claim_many(ENV, [unowned]))[0].outcome is ClaimOutcome.PENDING
    # Published, it names its run to its owner too; released by the token, it is free.
    assert await publish(store, key, again.claim_token, "run_owned")
    [published] = await store.try_claim_many(ENV, [key])
    assert published.outcome is ClaimOutcome.EXISTING_RUN
    assert published.existing_run_id == "run_owned"
    [held] = await store.try_claim_many(ENV, [KeyToClaim("task", "held", owner="batch_a")])
    assert await release(store, held.key, held.claim_token)
    [fresh] = await store.try_claim_many(ENV, [KeyToClaim("task", "held", owner="batch_b")])
    assert fresh.outcome is ClaimOutcome.CLAIMED
    assert fresh.claim_token != held.claim_token
