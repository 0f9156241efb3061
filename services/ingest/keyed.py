"""Items with an idempotency key: which of them link to an existing run (spec §5).

The contract the servicer uses is `KeyedItems.resolve(environment_id, items)`: for a unit's
keyed items, which already resolve to a run (link to it: `existing`), and a handle to settle
the claims it took once the unit was written (`publish`) or failed (`release`).

`MollifierKeyedItems` resolves them through the mollifier's batched claim (spec §4: one call per
unit for its distinct keys), which serializes them with single triggers of the same key and sees
runs still waiting in the mollifier's buffer. Per key:

- EXISTING_RUN: every item with the key links to `existing_run_id` (persisted or buffered);
- CLAIMED: the items are written normally; the run store gives a unit's second item with the key
  the first one's run (it links), and `publish` tells the mollifier the run afterwards, so a
  later unit (or trigger) with the key gets EXISTING_RUN; `release` gives the claim up if the
  unit failed before its runs were written (nobody waits out the claim's TTL);
- SKIPPED (organization without the mollifier flag): written normally; the run store's unique
  (environment, task, key) still dedups against persisted runs;
- PENDING (another caller still holds the key after the wait): this unit's claims are released
  (two units each holding a key the other waits for must not wait each other out), and after a
  pause the unit claims again; still pending after `CLAIM_ROUNDS`, the unit fails ABORTED
  `IDEMPOTENCY_KEY_BUSY` with RetryInfo, and the client's retry resends it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

import grpc
import structlog

from runops.kit.errors import Aborted
from runops.mollifier.client import ClaimOutcome, KeyClaim, KeyToClaim, MollifierClient

log = structlog.get_logger(__name__)

# How long the mollifier waits for keys another caller holds, per round (its maximum is 5 s):
# a unit of this batch holding the key publishes as soon as its AcceptBatchItems returned.
CLAIM_WAIT = timedelta(seconds=2)
# Rounds of claiming before the unit fails retryably, and the pause between them (jittered).
CLAIM_ROUNDS = 3
CLAIM_PAUSE_SECONDS = 0.2
KEY_BUSY = "IDEMPOTENCY_KEY_BUSY"


@dataclass(frozen=True)
class KeyedItem:
    index: int
    task_identifier: str
    idempotency_key: str
    # The key's own expiry (now + the item's idempotency_key_ttl); None: the run store's default.
    expires_at: datetime | None = None


class KeyClaims(Protocol):
    """What `resolve` found for one unit's keyed items."""

    @property
    def existing(self) -> Mapping[int, str]:
        """Batch index -> id of the run the item links to (its key resolves to it)."""
        ...

    async def publish(self, run_ids: Mapping[int, str]) -> None:
        """After the unit was written: the runs its keyed items got (index -> run)."""
        ...

    async def release(self) -> None:
        """The unit failed: give up every claim taken, so another caller may create the run."""
        ...


class KeyedItems(Protocol):
    async def resolve(self, environment_id: str, items: Sequence[KeyedItem]) -> KeyClaims: ...


Key = tuple[str, str]  # (task identifier, idempotency key)


@dataclass
class MollifierKeyClaims:
    """One unit's claims: the links found and the keys this unit must publish or release."""

    mollifier: MollifierClient
    environment_id: str
    existing: dict[int, str] = field(default_factory=dict)
    # Claimed key -> its claim and the unit's indexes carrying it (the first written one wins).
    claimed: dict[Key, tuple[KeyClaim, list[int]]] = field(default_factory=dict)

    async def publish(self, run_ids: Mapping[int, str]) -> None:
        published: list[tuple[KeyClaim, str]] = []
        unwritten: list[KeyClaim] = []
        for claim, indexes in self.claimed.values():
            run_id = next((run_ids[i] for i in indexes if i in run_ids), None)
            if run_id is None:
                unwritten.append(claim)
            else:
                published.append((claim, run_id))
        self.claimed = {}
        if published:
            # The runs are written: a failed publish only makes the next claimant wait out the
            # claim's TTL, and the run store's unique key still stops a duplicate. Not an error.
            try:
                await self.mollifier.publish_keys(
                    environment_id=self.environment_id, published=published
                )
            except grpc.aio.AioRpcError as exc:
                log.warning("publishing idempotency claims failed", keys=len(published), error=exc)
        await self._release(unwritten)

    async def release(self) -> None:
        claims = [claim for claim, _ in self.claimed.values()]
        self.claimed = {}
        await self._release(claims)

    async def _release(self, claims: Sequence[KeyClaim]) -> None:
        if not claims:
            return
        try:
            await self.mollifier.release_keys(environment_id=self.environment_id, claims=claims)
        except grpc.aio.AioRpcError as exc:
            # Best effort (the unit's own failure is what the caller must see): the claims
            # expire by their TTL (≤ 30 s).
            log.warning("releasing idempotency claims failed", keys=len(claims), error=exc)


class MollifierKeyedItems:
    """Keyed items through the mollifier's batched claims (module docstring)."""

    def __init__(
        self,
        mollifier: MollifierClient,
        *,
        wait: timedelta = CLAIM_WAIT,
        rounds: int = CLAIM_ROUNDS,
        pause_seconds: float = CLAIM_PAUSE_SECONDS,
    ) -> None:
        self._mollifier = mollifier
        self._wait = wait
        self._rounds = rounds
        self._pause = pause_seconds

    async def resolve(self, environment_id: str, items: Sequence[KeyedItem]) -> MollifierKeyClaims:
        indexes: dict[Key, list[int]] = {}
        expiry: dict[Key, datetime | None] = {}
        for item in items:
            key = (item.task_identifier, item.idempotency_key)
            indexes.setdefault(key, []).append(item.index)
            expiry.setdefault(key, item.expires_at)
        keys = list(indexes)
        for round_ in range(1, self._rounds + 1):
            answers = await self._mollifier.claim_keys(
                environment_id=environment_id,
                keys=[KeyToClaim(task, key, expiry[(task, key)]) for task, key in keys],
                wait=self._wait,
            )
            claims = MollifierKeyClaims(self._mollifier, environment_id)
            pending = 0
            for key, answer in zip(keys, answers, strict=True):
                if answer.outcome is ClaimOutcome.EXISTING_RUN:
                    claims.existing.update(dict.fromkeys(indexes[key], answer.existing_run_id))
                elif answer.outcome is ClaimOutcome.CLAIMED:
                    claims.claimed[key] = (answer, indexes[key])
                elif answer.outcome is ClaimOutcome.PENDING:
                    pending += 1
                # SKIPPED: nothing to settle; the run store's unique key dedups.
            if not pending:
                return claims
            # Holding some keys while waiting for others could deadlock two units: give them up.
            await claims.release()
            log.info("idempotency keys still claimed elsewhere", pending=pending, round=round_)
            if round_ < self._rounds:
                await asyncio.sleep(self._pause * (1 + random.random()))
        raise Aborted(
            f"{pending} idempotency key(s) of this chunk are still being claimed by another "
            "caller; retry",
            reason=KEY_BUSY,
            metadata={"keys": str(pending)},
            retry_after=1.0,
        )
