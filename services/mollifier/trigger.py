"""Trigger (spec §4): bypass, claim, gate, then the run store or the buffer.

Every trigger first takes its task's defaults from the environment's current worker
(`runops.controlplane.defaults`, cached; never fails the trigger).

Order of a trigger that may be buffered:
1. an idempotency key is claimed (`IdempotencyClaims.acquire`: waiters poll the winner up to 5 s
   and return its run); a claimed key whose live run still waits in the buffer returns that;
2. the gate decides, and a refused trigger is buffered, in one Redis round trip
   (`MollifierBuffer.gate_and_accept`): pass → the run store, through the group commit of
   `CreateBatcher` (concurrent pass-throughs share one `CreateRuns`); tripped → the snapshot
   (with its pre-minted run id and the creation time shown to the caller) is in the buffer and
   the caller gets the synthesized QUEUED run (`buffered`);
3. the claim is published with the run id (released if nothing was written).

Redis errors anywhere before the write fail open: the trigger goes to the run store, whose
unique idempotency index still guards the key. The run store is the only hard dependency.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import redis.exceptions
import structlog
from prometheus_client import Counter

from runops.common.v1 import common_pb2
from runops.controlplane.defaults import TaskDefaults
from runops.kit.ids import RUN, IdMinter
from runops.kit.limits import DEFAULT_IDEMPOTENCY_KEY_TTL
from runops.mollifier.claims import ClaimOutcome, KeyToClaim
from runops.runstore.client import RunStoreClient
from runops.runstore.v1 import runstore_pb2 as rs
from services.mollifier.buffer import AcceptOutcome, AcceptResult, MollifierBuffer
from services.mollifier.claims import IdempotencyClaims
from services.mollifier.create_batcher import CreateBatcher
from services.mollifier.entries import EntryStatus, queued_entry
from services.mollifier.gate import Gate
from services.mollifier.policy import EnvPolicy, Policies
from services.mollifier.runs import BufferedRuns

log = structlog.get_logger("runops.mollifier.trigger")

TRIGGERS = Counter(
    "mollifier_triggers_total",
    "Triggers by the path they took (passed, buffered, bypass_<reason>, fail_open, cached, "
    "shadow_would_buffer, shadow_passed).",
    ["path"],
)
_PASSED = TRIGGERS.labels("passed")
_BUFFERED = TRIGGERS.labels("buffered")
BUFFERED_NOTICE = (
    "This environment is triggering faster than {threshold} runs per {window:g}s: the run was "
    "accepted and is queued for creation (buffered); it keeps this id and creation time."
)


class Bypass(enum.StrEnum):
    DEBOUNCE = "debounce"
    ONE_TIME_USE_TOKEN = "one_time_use_token"
    RESUMES_PARENT = "resumes_parent"
    GLOBAL_SWITCH_OFF = "global_switch_off"
    ORG_FLAG_OFF = "org_flag_off"


@dataclass(frozen=True)
class Triggered:
    run: common_pb2.Run
    is_cached: bool = False
    buffered: bool = False
    notice: str = ""


def now_ms() -> datetime:
    """The clock at millisecond precision: what the buffer stores, so a buffered run's creation
    time reads back exactly as its caller was shown."""
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def bypass_of(request_options: common_pb2.TriggerOptions, resumes_parent: bool) -> Bypass | None:
    if request_options.HasField("debounce") and request_options.debounce.key:
        return Bypass.DEBOUNCE
    if request_options.one_time_use_token:
        return Bypass.ONE_TIME_USE_TOKEN
    if resumes_parent:
        return Bypass.RESUMES_PARENT
    return None


class TriggerFront:
    def __init__(
        self,
        *,
        policies: Policies,
        buffer: MollifierBuffer,
        gate: Gate,
        claims: IdempotencyClaims,
        runs: BufferedRuns,
        run_store: RunStoreClient,
        creates: CreateBatcher,
        minter: IdMinter,
        defaults: TaskDefaults,
    ) -> None:
        self._policies = policies
        self._buffer = buffer
        self._gate = gate
        self._claims = claims
        self._runs = runs
        self._run_store = run_store
        self._creates = creates
        self._minter = minter
        self._defaults = defaults
        self.notice = BUFFERED_NOTICE.format(
            threshold=gate.threshold, window=gate.window_us / 1_000_000
        )

    async def trigger(self, request: rs.RunInput, policy: EnvPolicy) -> Triggered:
        """`request`: the validated trigger as a RunInput (no run id: one is minted here unless
        the caller pre-minted it)."""
        snapshot = rs.RunInput()
        snapshot.CopyFrom(request)
        snapshot.organization_id = policy.organization_id
        snapshot.project_id = policy.project_id
        if not snapshot.run_id:
            snapshot.run_id = self._minter.mint(RUN)
        # Before any path: a buffered snapshot drains with the defaults it was shown with.
        await self._defaults.fill(snapshot.environment_id, [snapshot])
        bypass = bypass_of(snapshot.options, snapshot.resume_parent_on_completion)
        if bypass is None and not self._policies.enabled:
            bypass = Bypass.GLOBAL_SWITCH_OFF
        if bypass is None and not policy.enabled and not policy.shadow:
            bypass = Bypass.ORG_FLAG_OFF
        if bypass is not None:
            TRIGGERS.labels(f"bypass_{bypass}").inc()
            return await self._create(snapshot)
        if policy.shadow:
            return await self._shadow(snapshot)
        return await self._mollified(snapshot, policy)

    async def _create(self, snapshot: rs.RunInput) -> Triggered:
        created = await self._run_store.create_run(snapshot)
        return Triggered(created.run, is_cached=created.is_cached)

    async def _shadow(self, snapshot: rs.RunInput) -> Triggered:
        try:
            decision = await self._gate.check(snapshot.environment_id)
        except redis.exceptions.RedisError as exc:
            log.warning("shadow gate check failed", error=repr(exc))
        else:
            if not decision.passed:
                TRIGGERS.labels("shadow_would_buffer").inc()
                log.info(
                    "shadow mode: would have buffered",
                    environment_id=snapshot.environment_id,
                    run_id=snapshot.run_id,
                    tripped_now=decision.tripped_now,
                )
            else:
                TRIGGERS.labels("shadow_passed").inc()
        return await self._create(snapshot)

    async def _mollified(self, snapshot: rs.RunInput, policy: EnvPolicy) -> Triggered:
        created_at = now_ms()
        key = snapshot.options.idempotency_key
        claim: KeyToClaim | None = None
        token = ""
        expires: datetime | None = None
        try:
            if key:
                ttl = (
                    snapshot.options.idempotency_key_ttl.ToTimedelta()
                    if snapshot.options.HasField("idempotency_key_ttl")
                    else DEFAULT_IDEMPOTENCY_KEY_TTL
                )
                expires = created_at + max(ttl, timedelta(0))
                claim = KeyToClaim(snapshot.task_identifier, key, expires)
                claimed = (await self._claims.acquire(snapshot.environment_id, [claim]))[0]
                if claimed.outcome is ClaimOutcome.PENDING:
                    # The winner neither published nor released in time: the run store's
                    # unique key decides between us.
                    TRIGGERS.labels("claim_timeout").inc()
                    return await self._create(snapshot)
                if claimed.outcome is ClaimOutcome.EXISTING_RUN:
                    found = await self._runs.get(
                        snapshot.environment_id, claimed.existing_run_id, read_your_writes=True
                    )
                    if found is not None and found.idempotency_key == key:
                        TRIGGERS.labels("cached").inc()
                        return Triggered(found, is_cached=True, buffered=found.buffered)
                    # The published run is gone or no longer holds the key (reset): the run
                    # store decides.
                    claim = None
                    return await self._create(snapshot)
                token = claimed.claim_token
                # A claim lives 30 s at most: a key whose claim expired may still name a run
                # waiting in the buffer, which the run store cannot see yet.
                waiting = await self._buffer.find_by_idempotency_key(
                    snapshot.environment_id, snapshot.task_identifier, key
                )
                if (
                    waiting is not None
                    and waiting.status in (EntryStatus.QUEUED, EntryStatus.DRAINING)
                    and waiting.idempotency_key_live(created_at)
                ):
                    await self._publish(policy, claim, token, waiting.run_id)
                    TRIGGERS.labels("cached").inc()
                    return Triggered(waiting.to_run(created_at), True, True)
            gated = await self._buffer.gate_and_accept(
                self._gate, snapshot, created_at=created_at, idempotency_key_expires_at=expires
            )
            if gated.accepted is None:
                _PASSED.inc()
                created = await self._creates.create(snapshot)
                result = Triggered(created.run, is_cached=created.is_cached)
            else:
                if gated.decision.tripped_now:
                    log.info("gate tripped", environment_id=snapshot.environment_id)
                result = await self._buffered(snapshot, created_at, expires, gated.accepted)
        except redis.exceptions.RedisError as exc:
            log.warning(
                "redis failed; trigger goes straight to the run store",
                environment_id=snapshot.environment_id,
                error=repr(exc),
            )
            TRIGGERS.labels("fail_open").inc()
            try:
                result = await self._create(snapshot)
            except BaseException:
                if claim is not None and token:
                    await self._release(policy, claim, token)
                raise
        except BaseException:
            if claim is not None and token:
                await self._release(policy, claim, token)
            raise
        if claim is not None and token:
            await self._publish(policy, claim, token, result.run.friendly_id)
        return result

    async def _buffered(
        self,
        snapshot: rs.RunInput,
        created_at: datetime,
        expires: datetime | None,
        accepted: AcceptResult,
    ) -> Triggered:
        if accepted.outcome is AcceptOutcome.EXISTING:
            entry = await self._buffer.get(snapshot.environment_id, accepted.run_id)
            if entry is not None:
                TRIGGERS.labels("cached").inc()
                return Triggered(entry.to_run(created_at), True, True)
            # Drained meanwhile: the run store holds it (or the key) now.
            return await self._create(snapshot)
        _BUFFERED.inc()
        entry = queued_entry(snapshot, created_at, expires)
        return Triggered(entry.to_run(created_at), buffered=True, notice=self.notice)

    async def _publish(self, policy: EnvPolicy, claim: KeyToClaim, token: str, run_id: str) -> None:
        # Best effort: an unpublished claim expires by its TTL (waiters then claim it anew and
        # find the run through the run store's key).
        try:
            await self._claims.publish_many(policy, [(claim, token, run_id)])
        except redis.exceptions.RedisError as exc:
            log.warning("could not publish idempotency claim", error=repr(exc))

    async def _release(self, policy: EnvPolicy, claim: KeyToClaim, token: str) -> None:
        try:
            await self._claims.release_many(policy, [(claim, token)])
        except redis.exceptions.RedisError as exc:
            log.warning("could not release idempotency claim", error=repr(exc))
