"""Items with an idempotency key: which of them link to an existing run (spec §5).

The contract the servicer uses is `KeyedItems.resolve(environment_id, items, owner=batch id)
-> UnitClaims`: for a unit's keyed items, which already resolve to a run (link to it:
`existing`), and a handle to settle the claims it took once the unit was written (`publish`) or
failed (`release`).

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

The batch owns its claims (`KeyToClaim.owner`, the batch's id): a key one of its units claimed
and has not published yet is handed back to the next of its units that asks (CLAIMED, the same
token) instead of PENDING, so a batch never waits on a claim it took itself. That matters when
the claim call timed out but Redis applied it later (a hung Redis resumed): the claim is held by
a token nobody has, and without an owner every later unit of the batch with the key would be
refused `IDEMPOTENCY_KEY_BUSY` until the claim's TTL (30 s). Two units of the batch with one key
may now both hold the claim and both write: the run store's unique (environment, task, key)
gives the second the first one's run (the concurrent-accept case of
`tests/runstore/test_key_lock.py::test_a_keyed_batch_item_and_concurrent_creates_share_one_run`,
what the fail-open below relies on too), and both publish that run. A release by either unit
deletes the shared claim while the other may still be writing: a trigger or another batch may
then claim the key and write too, and the same unique key still gives both one run; at worst
that caller misses a run still buffered in the mollifier, as with fail-open.

The claim fails open as `Trigger` does (spec §4, §5): when the mollifier or its Redis is
unavailable (UNAVAILABLE, DEADLINE_EXCEEDED), every key of the unit is taken as SKIPPED, logged
and counted (`runops_ingest_keyed_fail_open_total`): the run store's unique (environment, task,
key) still gives one run per key, though a run still buffered in the mollifier is not seen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

import grpc
import structlog
from prometheus_client import Counter

from runops.kit.backoff import ExponentialBackoff, Retry
from runops.kit.errors import Aborted
from runops.mollifier.claims import ClaimAnswer, ClaimOutcome, KeyToClaim
from runops.mollifier.client import MollifierClient

log = structlog.get_logger(__name__)

FAIL_OPEN = Counter(
    "runops_ingest_keyed_fail_open",
    "Keyed batch items written without the mollifier's claim (it or its Redis was unavailable): "
    "the run store's unique key dedups them.",
)
# The mollifier's answers that fail the claim open; anything else (a caller's mistake, our bug)
# fails the unit.
FAIL_OPEN_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

# How long the mollifier waits for keys another caller holds, per round (its maximum is 5 s):
# a trigger or another batch holding the key publishes as soon as its run is written (this
# batch's own claims never make it wait: they are handed back).
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


class UnitClaims(Protocol):
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
    async def resolve(
        self, environment_id: str, items: Sequence[KeyedItem], *, owner: str
    ) -> UnitClaims:
        """`owner`: the batch the unit belongs to (its claims' owner, module docstring)."""
        ...


Key = tuple[str, str]  # (task identifier, idempotency key)


@dataclass
class MollifierUnitClaims:
    """One unit's claims: the links found and the keys this unit must publish or release."""

    mollifier: MollifierClient
    environment_id: str
    existing: dict[int, str] = field(default_factory=dict)
    # Claimed key -> its claim and the unit's indexes carrying it (the first written one wins).
    claimed: dict[Key, tuple[ClaimAnswer, list[int]]] = field(default_factory=dict)

    async def publish(self, run_ids: Mapping[int, str]) -> None:
        published: list[tuple[ClaimAnswer, str]] = []
        unwritten: list[ClaimAnswer] = []
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

    async def _release(self, claims: Sequence[ClaimAnswer]) -> None:
        if not claims:
            return
        try:
            await self.mollifier.release_keys(environment_id=self.environment_id, claims=claims)
        except grpc.aio.AioRpcError as exc:
            # Best effort (the unit's own failure is what the caller must see): the claims
            # expire by their TTL (≤ 30 s).
            log.warning("releasing idempotency claims failed", keys=len(claims), error=exc)


class _KeysBusy(Exception):
    """Keys of the unit still claimed by another caller after a round (retried)."""

    def __init__(self, pending: int) -> None:
        super().__init__(f"{pending} idempotency key(s) still claimed elsewhere")
        self.pending = pending


def _keys_busy(exc: BaseException, rounds: int) -> Aborted:
    pending = exc.pending if isinstance(exc, _KeysBusy) else 0
    return Aborted(
        f"{pending} idempotency key(s) of this chunk are still being claimed by another "
        "caller; retry",
        reason=KEY_BUSY,
        metadata={"keys": str(pending)},
        retry_after=1.0,
    )


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
        # Between rounds a pause drawn from [pause, 2 pause], so competing units spread out.
        self._claim_rounds = Retry(
            ExponentialBackoff(base=2 * pause_seconds, cap=2 * pause_seconds, jitter=0.5),
            attempts=rounds,
            retry_on=(_KeysBusy,),
            exhausted=_keys_busy,
            log_retries=False,
        )

    async def resolve(
        self, environment_id: str, items: Sequence[KeyedItem], *, owner: str
    ) -> MollifierUnitClaims:
        indexes: dict[Key, list[int]] = {}
        expiry: dict[Key, datetime | None] = {}
        for item in items:
            key = (item.task_identifier, item.idempotency_key)
            indexes.setdefault(key, []).append(item.index)
            expiry.setdefault(key, item.expires_at)
        keys = list(indexes)
        to_claim = [KeyToClaim(task, key, expiry[(task, key)], owner) for task, key in keys]

        async def claim() -> MollifierUnitClaims:
            answers = await self._mollifier.claim_keys(
                environment_id=environment_id, keys=to_claim, wait=self._wait
            )
            claims = MollifierUnitClaims(self._mollifier, environment_id)
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
            log.info("idempotency keys still claimed elsewhere", pending=pending)
            raise _KeysBusy(pending)

        try:
            return await self._claim_rounds.call(claim, what="idempotency claims")
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in FAIL_OPEN_CODES:
                raise
            log.warning(
                "mollifier unavailable; keyed items fall back to the run store's unique key",
                environment_id=environment_id,
                items=len(items),
                error=exc.code().name,
            )
            FAIL_OPEN.inc(len(items))
            return MollifierUnitClaims(self._mollifier, environment_id)
