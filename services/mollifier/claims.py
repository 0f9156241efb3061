"""Idempotency claims (spec §4): same-key triggers serialize through Redis.

The first caller claims the key with an ownership token (a UUID) for a TTL clamped to
[min, max] by the key's own expiry, then publishes the run id it made, or releases on failure
(compare-and-delete: only its token deletes). Others find the claim PENDING and poll it, up to
`wait` seconds, until it names a run (EXISTING) or is released (then one of them claims it).
A published claim whose key has expired is claimed anew: after the key's TTL a trigger makes a
new run.

The batched form takes many keys; their claims are grouped by Cluster slot (one script call per
slot, chunked) since keys of different environments live in different slots.
"""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from runops.kit.redis import RedisClient
from services.mollifier.entries import to_ms
from services.mollifier.keys import EnvKeys
from services.mollifier.scripts import Scripts


class ClaimOutcome(enum.StrEnum):
    # This caller owns the claim: create the run, then publish (or release on failure).
    CLAIMED = "claimed"
    # The key resolves to this run: use it, write nothing.
    EXISTING = "existing"
    # Another caller holds the claim and has not published yet.
    PENDING = "pending"


@dataclass(frozen=True)
class ClaimKey:
    environment_id: str
    task_identifier: str
    idempotency_key: str
    # The key's own expiry; clamps the claim's TTL.
    expires_at: datetime | None = None


@dataclass(frozen=True)
class ClaimResult:
    outcome: ClaimOutcome
    token: str = ""
    run_id: str = ""


class ClaimTimeout(Exception):
    """The winner neither published nor released within the wait (retry later)."""


@dataclass(frozen=True)
class _Call:
    key: str
    args: tuple[str, ...]


class IdempotencyClaims:
    def __init__(
        self,
        client: RedisClient,
        scripts: Scripts,
        *,
        prefix: str,
        min_ttl_seconds: float = 5.0,
        max_ttl_seconds: float = 30.0,
        wait_seconds: float = 5.0,
        poll_interval_seconds: float = 0.05,
        batch_size: int = 1000,
    ) -> None:
        self._cluster = isinstance(client, RedisCluster)
        self._scripts = scripts
        self._prefix = prefix
        self._min_ttl_ms = int(min_ttl_seconds * 1000)
        self._max_ttl_ms = int(max_ttl_seconds * 1000)
        self.wait_seconds = wait_seconds
        self._poll = poll_interval_seconds
        self._batch_size = batch_size

    def _key(self, claim: ClaimKey) -> str:
        return EnvKeys(self._prefix, claim.environment_id).claim(
            claim.task_identifier, claim.idempotency_key
        )

    async def _run(
        self, script: str, calls: Sequence[_Call], head: Sequence[object]
    ) -> list[object]:
        """One script call per slot and chunk; replies in the order of `calls`."""
        groups: dict[int, list[int]] = defaultdict(list)
        for index, call in enumerate(calls):
            groups[key_slot(call.key.encode()) if self._cluster else 0].append(index)
        chunks = [
            indexes[start : start + self._batch_size]
            for indexes in groups.values()
            for start in range(0, len(indexes), self._batch_size)
        ]

        async def one(chunk: list[int]) -> list[object]:
            args: list[object] = list(head)
            for index in chunk:
                args.extend(calls[index].args)
            return list(await self._scripts.call(script, [calls[i].key for i in chunk], args))

        replies = await asyncio.gather(*(one(chunk) for chunk in chunks))
        out: list[object] = [None] * len(calls)
        for chunk, reply in zip(chunks, replies, strict=True):
            for index, value in zip(chunk, reply, strict=True):
                out[index] = value
        return out

    async def try_claim_many(self, claims: Sequence[ClaimKey]) -> list[ClaimResult]:
        """One attempt per key, no waiting: CLAIMED, EXISTING or PENDING each."""
        calls = [
            _Call(
                self._key(claim),
                (
                    uuid.uuid4().hex,
                    "" if claim.expires_at is None else str(to_ms(claim.expires_at)),
                ),
            )
            for claim in claims
        ]
        replies = await self._run("claim", calls, [self._min_ttl_ms, self._max_ttl_ms])
        results = []
        for reply in replies:
            pair: list[bytes] = reply  # type: ignore[assignment]
            outcome = ClaimOutcome(pair[0].decode())
            value = pair[1].decode()
            if outcome is ClaimOutcome.CLAIMED:
                results.append(ClaimResult(outcome, token=value))
            elif outcome is ClaimOutcome.EXISTING:
                results.append(ClaimResult(outcome, run_id=value))
            else:
                results.append(ClaimResult(outcome))
        return results

    async def claim_many(self, claims: Sequence[ClaimKey]) -> list[ClaimResult]:
        """Every key ends CLAIMED or EXISTING: pending ones are polled (doubling interval) until
        their winner publishes or releases, for at most `wait_seconds`; then ClaimTimeout."""
        results = await self.try_claim_many(claims)
        deadline = time.monotonic() + self.wait_seconds
        interval = self._poll
        while pending := [i for i, r in enumerate(results) if r.outcome is ClaimOutcome.PENDING]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClaimTimeout(
                    f"{len(pending)} idempotency key(s) still claimed by another trigger after "
                    f"{self.wait_seconds:g}s"
                )
            await asyncio.sleep(min(interval, remaining))
            interval = min(interval * 2, self._poll * 8)
            again = await self.try_claim_many([claims[i] for i in pending])
            for index, result in zip(pending, again, strict=True):
                results[index] = result
        return results

    async def claim(self, claim: ClaimKey) -> ClaimResult:
        return (await self.claim_many([claim]))[0]

    async def publish_many(self, published: Sequence[tuple[ClaimKey, str, str]]) -> list[bool]:
        """(key, token, run id) each: True where the token still owned the claim."""
        calls = [_Call(self._key(claim), (token, run_id)) for claim, token, run_id in published]
        return [bool(int(r)) for r in await self._run("publish", calls, [])]  # type: ignore[call-overload]

    async def publish(self, claim: ClaimKey, token: str, run_id: str) -> bool:
        return (await self.publish_many([(claim, token, run_id)]))[0]

    async def release_many(self, released: Sequence[tuple[ClaimKey, str]]) -> list[bool]:
        """(key, token) each: True where the token owned the claim and it is gone now."""
        calls = [_Call(self._key(claim), (token,)) for claim, token in released]
        return [bool(int(r)) for r in await self._run("release", calls, [])]  # type: ignore[call-overload]

    async def release(self, claim: ClaimKey, token: str) -> bool:
        return (await self.release_many([(claim, token)]))[0]
