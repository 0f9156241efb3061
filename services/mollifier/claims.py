"""Idempotency claims (spec §4), the protocol: claim -> wait -> publish or release, in the
vocabulary of `runops.mollifier.claims` (KeyToClaim, ClaimAnswer, ClaimOutcome).

The first caller claims a key (`claim_store.py`); others find it PENDING and poll it (the poll
interval doubling to 8 times itself, through the kit's `Retry`) until it names a run
(EXISTING_RUN) or is released (then one of them claims it), for at most the wait; still held
then, it stays PENDING. The owner publishes the run it made, or releases on failure. The trigger
(`trigger.py`) claims through `acquire`; callers that write runs themselves (batch ingest) through
the RPCs, single and batched, which also answer SKIPPED for an organization without the
mollifier flag.

A claim only serializes callers; the key may also name a run still waiting in the buffer (its
claim expired before the drain). So a key the RPCs claim is checked against the buffer's lookups
(one MGET per 1,000 keys: an environment's keys share one Cluster slot) and answers EXISTING_RUN
when a live buffered run holds it; the claim is then published with that run's id.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from runops.kit.backoff import ExponentialBackoff, Retry
from runops.kit.errors import Aborted
from runops.kit.redis import RedisClient
from runops.mollifier.claims import ClaimAnswer, ClaimOutcome, KeyToClaim
from services.mollifier.buffer import MollifierBuffer
from services.mollifier.claim_store import ClaimStore
from services.mollifier.policy import EnvPolicy
from services.mollifier.runs import BufferedRuns

CLAIM_TIMEOUT = "CLAIM_TIMEOUT"


class _StillPending(Exception):
    """Another caller still holds some of the keys (what the poll retries)."""


class IdempotencyClaims:
    def __init__(
        self,
        store: ClaimStore,
        buffer: MollifierBuffer,
        runs: BufferedRuns,
        *,
        wait_seconds: float = 5.0,
        poll_interval_seconds: float = 0.05,
        lookup_chunk: int = 1000,
    ) -> None:
        self._store = store
        self._buffer = buffer
        self._runs = runs
        self._client: RedisClient = buffer.client
        self.wait_seconds = wait_seconds
        self._poll = ExponentialBackoff(base=poll_interval_seconds, cap=poll_interval_seconds * 8)
        self._chunk = lookup_chunk

    @property
    def default_wait(self) -> float:
        return self.wait_seconds

    async def acquire(
        self, environment_id: str, keys: Sequence[KeyToClaim], wait_seconds: float | None = None
    ) -> list[ClaimAnswer]:
        """CLAIMED, EXISTING_RUN or PENDING per key, in order: a key another caller holds is
        polled while the next poll still falls within `wait_seconds` (None: the default)."""
        answers = [ClaimAnswer(key, ClaimOutcome.PENDING) for key in keys]

        async def attempt() -> None:
            pending = [
                i for i, answer in enumerate(answers) if answer.outcome is ClaimOutcome.PENDING
            ]
            again = await self._store.try_claim_many(environment_id, [keys[i] for i in pending])
            for index, answer in zip(pending, again, strict=True):
                answers[index] = answer
            if any(answer.outcome is ClaimOutcome.PENDING for answer in again):
                raise _StillPending

        poll = Retry(
            self._poll,
            attempts=0,
            retry_on=(_StillPending,),
            budget=self.wait_seconds if wait_seconds is None else wait_seconds,
            log_retries=False,
        )
        with contextlib.suppress(_StillPending):  # the wait is over: those keys stay PENDING
            await poll.call(attempt, what="idempotency claim")
        return answers

    async def claim(self, policy: EnvPolicy, key: KeyToClaim) -> ClaimAnswer:
        """One key, with its existing run; still held after the wait: ABORTED `CLAIM_TIMEOUT`
        (retryable)."""
        answer = (await self.claim_many(policy, [key], self.wait_seconds))[0]
        if answer.outcome is ClaimOutcome.PENDING:
            raise Aborted(
                f"the idempotency key is still claimed by another trigger after "
                f"{self.wait_seconds:g}s; retry",
                reason=CLAIM_TIMEOUT,
                retry_after=1.0,
            )
        if answer.outcome is ClaimOutcome.EXISTING_RUN:
            run = await self._runs.get(
                policy.environment_id, answer.existing_run_id, read_your_writes=True
            )
            return ClaimAnswer(
                key, answer.outcome, existing_run_id=answer.existing_run_id, existing_run=run
            )
        return answer

    async def claim_many(
        self, policy: EnvPolicy, keys: Sequence[KeyToClaim], wait_seconds: float
    ) -> list[ClaimAnswer]:
        """One answer per key, in order. A key repeated in `keys` is claimed once (its first
        occurrence); later occurrences answer PENDING."""
        if not policy.enabled:
            return [ClaimAnswer(key, ClaimOutcome.SKIPPED) for key in keys]
        first: dict[tuple[str, str], int] = {}
        for index, key in enumerate(keys):
            first.setdefault((key.task_identifier, key.idempotency_key), index)
        unique = sorted(first.values())
        answers = [ClaimAnswer(key, ClaimOutcome.PENDING) for key in keys]
        acquired = await self.acquire(
            policy.environment_id, [keys[i] for i in unique], wait_seconds
        )
        claimed = [a.key for a in acquired if a.outcome is ClaimOutcome.CLAIMED]
        holders = await self._buffered_holders(policy, claimed)
        to_publish: list[tuple[KeyToClaim, str, str]] = []
        for index, answer in zip(unique, acquired, strict=True):
            holder = holders.get((answer.key.task_identifier, answer.key.idempotency_key))
            if answer.outcome is ClaimOutcome.CLAIMED and holder:
                to_publish.append((answer.key, answer.claim_token, holder))
                answer = ClaimAnswer(answer.key, ClaimOutcome.EXISTING_RUN, existing_run_id=holder)
            answers[index] = answer
        if to_publish:
            await self._store.publish_many(policy.environment_id, to_publish)
        return answers

    async def _buffered_holders(
        self, policy: EnvPolicy, keys: Sequence[KeyToClaim]
    ) -> dict[tuple[str, str], str]:
        """(task, key) -> run id of the buffered run whose lookup names it."""
        if not keys:
            return {}
        env_keys = self._buffer.keys(policy.environment_id)
        lookups = [env_keys.lookup(k.task_identifier, k.idempotency_key) for k in keys]
        chunks = [
            lookups[start : start + self._chunk] for start in range(0, len(lookups), self._chunk)
        ]
        replies = await asyncio.gather(*(self._client.mget(chunk) for chunk in chunks))
        found: dict[tuple[str, str], str] = {}
        values = [value for reply in replies for value in reply]
        for key, value in zip(keys, values, strict=True):
            if value:
                run_id = value.decode() if isinstance(value, bytes) else str(value)
                found[(key.task_identifier, key.idempotency_key)] = run_id
        return found

    async def publish_many(
        self, policy: EnvPolicy, published: Sequence[tuple[KeyToClaim, str, str]]
    ) -> list[bool]:
        """(key, token, run id) each: True where the token still owned the claim."""
        return await self._store.publish_many(policy.environment_id, published)

    async def release_many(
        self, policy: EnvPolicy, released: Sequence[tuple[KeyToClaim, str]]
    ) -> list[bool]:
        """(key, token) each: True where the token owned the claim and it is gone now."""
        return await self._store.release_many(policy.environment_id, released)
