"""Idempotency claims for callers that write runs themselves (batch ingest), single and batched,
each answer an explicit outcome: CLAIMED (with the ownership token), EXISTING (the run id the
key resolves to), SKIPPED (organization without the mollifier flag), PENDING (batched only:
still held by another caller after the wait).

A claim only serializes callers; the key may also name a run still waiting in the buffer (its
claim expired before the drain). So a CLAIMED key is checked against the buffer's lookups (one
MGET per 1,000 keys: an environment's keys share one Cluster slot) and answers EXISTING when a
live buffered run holds it; the claim is then published with that run's id.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from runops.common.v1 import common_pb2
from runops.kit.errors import Aborted
from runops.kit.redis import RedisClient
from services.mollifier.buffer import MollifierBuffer
from services.mollifier.claims import ClaimKey, ClaimOutcome, IdempotencyClaims
from services.mollifier.policy import EnvPolicy
from services.mollifier.runs import BufferedRuns

CLAIM_TIMEOUT = "CLAIM_TIMEOUT"


class KeyOutcome(enum.StrEnum):
    CLAIMED = "claimed"
    EXISTING = "existing"
    SKIPPED = "skipped"
    PENDING = "pending"


@dataclass(frozen=True)
class KeyClaim:
    task_identifier: str
    idempotency_key: str
    expires_at: datetime | None = None


@dataclass(frozen=True)
class KeyAnswer:
    outcome: KeyOutcome
    token: str = ""
    run_id: str = ""
    # Single claims only: the existing run, read from the run store or the buffer.
    run: common_pb2.Run | None = None


class KeyClaims:
    def __init__(
        self,
        claims: IdempotencyClaims,
        buffer: MollifierBuffer,
        runs: BufferedRuns,
        *,
        lookup_chunk: int = 1000,
    ) -> None:
        self._claims = claims
        self._buffer = buffer
        self._runs = runs
        self._client: RedisClient = buffer.client
        self._chunk = lookup_chunk

    @property
    def default_wait(self) -> float:
        return self._claims.wait_seconds

    def _key(self, policy: EnvPolicy, claim: KeyClaim) -> ClaimKey:
        return ClaimKey(
            policy.environment_id, claim.task_identifier, claim.idempotency_key, claim.expires_at
        )

    async def claim(self, policy: EnvPolicy, claim: KeyClaim) -> KeyAnswer:
        """Waits for another caller's claim (up to the claims' wait), then ABORTED
        `CLAIM_TIMEOUT` (retryable)."""
        if not policy.enabled:
            return KeyAnswer(KeyOutcome.SKIPPED)
        answers = await self.claim_many(policy, [claim], self._claims.wait_seconds)
        answer = answers[0]
        if answer.outcome is KeyOutcome.PENDING:
            raise Aborted(
                f"the idempotency key is still claimed by another trigger after "
                f"{self._claims.wait_seconds:g}s; retry",
                reason=CLAIM_TIMEOUT,
                retry_after=1.0,
            )
        if answer.outcome is KeyOutcome.EXISTING:
            run = await self._runs.get(policy.environment_id, answer.run_id, read_your_writes=True)
            return KeyAnswer(KeyOutcome.EXISTING, run_id=answer.run_id, run=run)
        return answer

    async def claim_many(
        self, policy: EnvPolicy, keys: Sequence[KeyClaim], wait_seconds: float
    ) -> list[KeyAnswer]:
        """One answer per key, in order. A key repeated in `keys` is claimed once (its first
        occurrence); later occurrences answer PENDING."""
        if not policy.enabled:
            return [KeyAnswer(KeyOutcome.SKIPPED)] * len(keys)
        first: dict[tuple[str, str], int] = {}
        for index, claim in enumerate(keys):
            first.setdefault((claim.task_identifier, claim.idempotency_key), index)
        unique = sorted(first.values())
        answers: list[KeyAnswer] = [KeyAnswer(KeyOutcome.PENDING)] * len(keys)
        claim_keys = [self._key(policy, keys[i]) for i in unique]
        results = await self._claims.try_claim_many(claim_keys)
        deadline = time.monotonic() + wait_seconds
        interval = 0.05
        while pending := [n for n, r in enumerate(results) if r.outcome is ClaimOutcome.PENDING]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await asyncio.sleep(min(interval, remaining))
            interval = min(interval * 2, 0.4)
            again = await self._claims.try_claim_many([claim_keys[n] for n in pending])
            for n, result in zip(pending, again, strict=True):
                results[n] = result
        claimed = [n for n, r in enumerate(results) if r.outcome is ClaimOutcome.CLAIMED]
        waiting = await self._buffered_holders(policy, [claim_keys[n] for n in claimed])
        to_publish: list[tuple[ClaimKey, str, str]] = []
        for n, result in enumerate(results):
            index = unique[n]
            if result.outcome is ClaimOutcome.EXISTING:
                answers[index] = KeyAnswer(KeyOutcome.EXISTING, run_id=result.run_id)
            elif result.outcome is ClaimOutcome.CLAIMED:
                holder = waiting.get(claim_keys[n].idempotency_key, {}).get(
                    claim_keys[n].task_identifier
                )
                if holder:
                    to_publish.append((claim_keys[n], result.token, holder))
                    answers[index] = KeyAnswer(KeyOutcome.EXISTING, run_id=holder)
                else:
                    answers[index] = KeyAnswer(KeyOutcome.CLAIMED, token=result.token)
        if to_publish:
            await self._claims.publish_many(to_publish)
        return answers

    async def _buffered_holders(
        self, policy: EnvPolicy, keys: Sequence[ClaimKey]
    ) -> dict[str, dict[str, str]]:
        """key -> task -> run id of the buffered run whose lookup names it."""
        if not keys:
            return {}
        env_keys = self._buffer.keys(policy.environment_id)
        lookups = [env_keys.lookup(k.task_identifier, k.idempotency_key) for k in keys]
        chunks = [
            lookups[start : start + self._chunk] for start in range(0, len(lookups), self._chunk)
        ]
        replies = await asyncio.gather(*(self._client.mget(chunk) for chunk in chunks))
        found: dict[str, dict[str, str]] = {}
        values = [value for reply in replies for value in reply]
        for claim, value in zip(keys, values, strict=True):
            if value:
                run_id = value.decode() if isinstance(value, bytes) else str(value)
                found.setdefault(claim.idempotency_key, {})[claim.task_identifier] = run_id
        return found

    async def publish_many(
        self, policy: EnvPolicy, published: Sequence[tuple[KeyClaim, str, str]]
    ) -> list[bool]:
        return await self._claims.publish_many(
            [(self._key(policy, claim), token, run_id) for claim, token, run_id in published]
        )

    async def release_many(
        self, policy: EnvPolicy, released: Sequence[tuple[KeyClaim, str]]
    ) -> list[bool]:
        return await self._claims.release_many(
            [(self._key(policy, claim), token) for claim, token in released]
        )
