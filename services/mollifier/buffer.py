"""The burst buffer in Redis: accept, pop-and-mark-draining, ack / fail / requeue, recovery of
stuck DRAINING entries, mutations, idempotency lookups, stats, and the index of environments
the drainer visits. Each operation is one Lua script on one environment's slot (`keys.py`).

The index (`{prefix}:envs`, environment -> organization) lives in its own slot, so it is kept
by separate single-key calls and tolerates staleness in both directions:
- accept writes the entry, *then* adds the environment: an environment is never missing from
  the index while it holds an entry, except after an index write that failed (the sweep's
  `reindex` repairs that). So a trigger's accept (`gate_and_accept`) into an environment that
  already held entries need not write the index again; it does at most once a second per
  environment all the same, which repairs a failed write within a burst;
- the drainer removes an environment only by `forget_if_empty`: only if it looks empty, remove,
  *then* read its size atomically, and add it back if it holds anything. Whatever accept did in
  between, the environment ends up indexed. A drainer that dies between the remove and the add
  leaves it out; `reindex` finds it by its queue or its draining set (recovery only visits
  indexed environments, so entries DRAINING there would otherwise never come back).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import redis.exceptions
import structlog

from runops.kit.limits import DEFAULT_IDEMPOTENCY_KEY_TTL
from runops.kit.redis import RedisClient
from runops.runstore.v1 import runstore_pb2
from services.mollifier.entries import (
    POP_FIELDS,
    BufferedEntry,
    EntryStatus,
    PoppedEntry,
    pairs,
    parse_ms,
    to_ms,
)
from services.mollifier.gate import Gate, GateDecision
from services.mollifier.keys import EnvKeys, GlobalKeys
from services.mollifier.scripts import Scripts

log = structlog.get_logger("runops.mollifier.buffer")


class AcceptOutcome(enum.StrEnum):
    ACCEPTED = "accepted"
    # The idempotency key names a live buffered run: nothing was written, return that run.
    EXISTING = "existing"
    # This run id is already buffered (a retried accept): nothing was written.
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class AcceptResult:
    outcome: AcceptOutcome
    run_id: str


@dataclass(frozen=True)
class GatedAccept:
    decision: GateDecision
    # None when the gate passed the trigger (nothing was written).
    accepted: AcceptResult | None


# `gate_and_accept` rewrites the index entry of a busy environment at least this often.
INDEX_REFRESH_SECONDS = 1.0


class MutationOutcome(enum.StrEnum):
    OK = "ok"
    # Draining started: the snapshot can no longer change (FAILED_PRECONDITION, reason busy).
    BUSY = "busy"
    # Already written to the run store: change it there.
    DRAINED = "drained"
    NOT_FOUND = "not_found"


@dataclass(frozen=True)
class MutationResult:
    outcome: MutationOutcome
    entry: BufferedEntry | None = None


@dataclass(frozen=True)
class ResetResult:
    cleared: bool
    # Status of the entry the key named; DRAINING means it may be written with the key right
    # now, so clear the run store after the buffer.
    status: EntryStatus | None


@dataclass(frozen=True)
class EnvironmentStats:
    environment_id: str
    depth: int
    draining: int
    oldest_created_at: datetime | None
    now: datetime

    @property
    def oldest_age(self) -> timedelta | None:
        if self.oldest_created_at is None:
            return None
        return max(self.now - self.oldest_created_at, timedelta(0))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class MollifierBuffer:
    def __init__(
        self, client: RedisClient, *, prefix: str = "mollifier", ack_grace_seconds: float = 30.0
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.ack_grace_ms = int(ack_grace_seconds * 1000)
        self.scripts = Scripts(client)
        self.global_keys = GlobalKeys(prefix)
        # Environment -> when `gate_and_accept` next rewrites its index entry (monotonic).
        self._indexed: dict[str, float] = {}

    def keys(self, environment_id: str) -> EnvKeys:
        return EnvKeys(self.prefix, environment_id)

    # -- accept -----------------------------------------------------------------------------
    async def accept(
        self,
        snapshot: runstore_pb2.RunInput,
        *,
        created_at: datetime,
        idempotency_key_expires_at: datetime | None = None,
    ) -> AcceptResult:
        """Buffer a trigger. `snapshot.run_id` is the real pre-minted friendly id and
        `created_at` the time shown to the caller. With an idempotency key, a live buffered run
        holding it wins (EXISTING); the key's lookup expires at `idempotency_key_expires_at`
        (default: created_at + the snapshot's key TTL, else 30 days)."""
        keys, lookup, args = self._accept_args(snapshot, created_at, idempotency_key_expires_at)
        outcome, run_id = await self.scripts.call(
            "accept", [keys.entry(snapshot.run_id), keys.queue, *lookup], args
        )
        result = AcceptResult(AcceptOutcome(_text(outcome)), _text(run_id))
        if result.outcome is AcceptOutcome.ACCEPTED:
            await self._index(snapshot.environment_id, snapshot.organization_id)
        return result

    async def gate_and_accept(
        self,
        gate: Gate,
        snapshot: runstore_pb2.RunInput,
        *,
        created_at: datetime,
        idempotency_key_expires_at: datetime | None = None,
    ) -> GatedAccept:
        """`gate.check`, then `accept` when the gate refuses, in one round trip. The index is
        written after an accept into an environment that held nothing (while it holds entries
        it is indexed: see the module doc), and at least every `INDEX_REFRESH_SECONDS` per
        environment, so an index write that failed is repaired by the next burst too."""
        keys, lookup, args = self._accept_args(snapshot, created_at, idempotency_key_expires_at)
        passed, tripped, outcome, run_id, held = await self.scripts.call(
            "trigger",
            [
                *gate.keys(snapshot.environment_id),
                keys.entry(snapshot.run_id),
                keys.queue,
                keys.draining,
                *lookup,
            ],
            [*gate.args(), *args],
        )
        decision = GateDecision(bool(int(passed)), bool(int(tripped)))
        if decision.passed:
            return GatedAccept(decision, None)
        result = AcceptResult(AcceptOutcome(_text(outcome)), _text(run_id))
        if result.outcome is AcceptOutcome.ACCEPTED:
            environment_id = snapshot.environment_id
            now = time.monotonic()
            if int(held) == 0 or self._indexed.get(environment_id, 0.0) < now:
                if len(self._indexed) > 10_000:
                    self._indexed.clear()
                self._indexed[environment_id] = now + INDEX_REFRESH_SECONDS
                await self._index(environment_id, snapshot.organization_id)
        return GatedAccept(decision, result)

    def _accept_args(
        self,
        snapshot: runstore_pb2.RunInput,
        created_at: datetime,
        idempotency_key_expires_at: datetime | None,
    ) -> tuple[EnvKeys, list[str], list[object]]:
        """accept.lua's keys and arguments: the environment's keys, the idempotency lookup
        (none without a key) and ARGV."""
        if not snapshot.run_id or not snapshot.environment_id:
            raise ValueError("a buffered snapshot needs its run_id and environment_id")
        keys = self.keys(snapshot.environment_id)
        lookup: list[str] = []
        expires = ""
        key = snapshot.options.idempotency_key
        if key:
            lookup.append(keys.lookup(snapshot.task_identifier, key))
            if idempotency_key_expires_at is None:
                ttl = (
                    snapshot.options.idempotency_key_ttl.ToTimedelta()
                    if snapshot.options.HasField("idempotency_key_ttl")
                    else DEFAULT_IDEMPOTENCY_KEY_TTL
                )
                idempotency_key_expires_at = created_at + ttl
            expires = str(to_ms(idempotency_key_expires_at))
        args: list[object] = [
            snapshot.run_id,
            snapshot.SerializeToString(),
            snapshot.organization_id,
            snapshot.environment_id,
            to_ms(created_at),
            expires,
            keys.entry_prefix,
        ]
        return keys, lookup, args

    async def _index(self, environment_id: str, organization_id: str) -> None:
        # The entry is safe already; a failed index write only delays its drain until the next
        # accept of this environment or the sweep's reindex. Not an error for the caller.
        try:
            await self.client.hset(self.global_keys.environments, environment_id, organization_id)
        except redis.exceptions.RedisError as exc:
            log.warning(
                "could not index environment", environment_id=environment_id, error=repr(exc)
            )

    # -- drain ------------------------------------------------------------------------------
    async def pop(self, environment_id: str, count: int, owner: str) -> list[PoppedEntry]:
        """Up to `count` entries from the front of the queue, now DRAINING and owned by
        `owner` (a drainer's token), read only as far as the drainer needs."""
        keys = self.keys(environment_id)
        taken = await self.scripts.call(
            "pop", [keys.queue, keys.draining], [count, keys.entry_prefix, owner, *POP_FIELDS]
        )
        entries = [PoppedEntry(values) for values in taken]
        readable = [entry for entry in entries if entry.readable]
        if len(readable) < len(entries):
            log.error(
                "unreadable buffer entries dropped",
                environment_id=environment_id,
                count=len(entries) - len(readable),
            )
        return readable

    async def ack(self, environment_id: str, run_ids: Sequence[str]) -> int:
        """The runs were written: DONE, lookup deleted, readable for the ack grace."""
        return await self._finish(environment_id, run_ids, EntryStatus.DONE, "")

    async def fail(self, environment_id: str, run_ids: Sequence[str], error: str) -> int:
        """Terminal: the runs were written as SYSTEM_FAILURE runs (or could not be written)."""
        return await self._finish(environment_id, run_ids, EntryStatus.FAILED, error)

    async def _finish(
        self, environment_id: str, run_ids: Sequence[str], status: EntryStatus, error: str
    ) -> int:
        if not run_ids:
            return 0
        keys = self.keys(environment_id)
        return int(
            await self.scripts.call(
                "finish",
                [keys.queue, keys.draining],
                [keys.entry_prefix, self.ack_grace_ms, status.value, error, *run_ids],
            )
        )

    async def requeue(
        self,
        environment_id: str,
        run_ids: Sequence[str],
        owner: str,
        *,
        count_attempt: bool = True,
        attempts_floor: int | None = None,
        error: str = "",
    ) -> int:
        """Back to the front of the queue in this order (only entries `owner` still holds),
        attempts + 1 unless `count_attempt` is False, raised to `attempts_floor` if given."""
        if not run_ids:
            return 0
        keys = self.keys(environment_id)
        floor = "" if attempts_floor is None else str(attempts_floor)
        return int(
            await self.scripts.call(
                "requeue",
                [keys.queue, keys.draining],
                [keys.entry_prefix, owner, 1 if count_attempt else 0, floor, error, *run_ids],
            )
        )

    async def recover(
        self, environment_id: str, visibility_timeout_seconds: float, limit: int = 1000
    ) -> int:
        """Requeue entries DRAINING for longer than the visibility timeout (attempts + 1)."""
        keys = self.keys(environment_id)
        return int(
            await self.scripts.call(
                "recover",
                [keys.queue, keys.draining],
                [keys.entry_prefix, int(visibility_timeout_seconds * 1000), limit],
            )
        )

    # -- reads ------------------------------------------------------------------------------
    async def get(self, environment_id: str, run_id: str) -> BufferedEntry | None:
        """The entry of `run_id` in this environment (never another's: the key says whose)."""
        fields: dict[bytes, bytes] = await self.client.hgetall(  # type: ignore[assignment]
            self.keys(environment_id).entry(run_id)
        )
        return BufferedEntry.from_fields(fields) if fields else None

    async def find_by_idempotency_key(
        self, environment_id: str, task_identifier: str, key: str
    ) -> BufferedEntry | None:
        keys = self.keys(environment_id)
        flat = await self.scripts.call(
            "lookup", [keys.lookup(task_identifier, key)], [keys.entry_prefix]
        )
        return BufferedEntry.from_fields(pairs(flat)) if flat else None

    # -- changes while buffered -------------------------------------------------------------
    async def add_tags(
        self, environment_id: str, run_id: str, tags: Sequence[str]
    ) -> MutationResult:
        return await self._mutate(environment_id, run_id, "tags", *tags)

    async def set_metadata(
        self, environment_id: str, run_id: str, metadata: str, metadata_type: str
    ) -> MutationResult:
        return await self._mutate(environment_id, run_id, "metadata", metadata, metadata_type)

    async def reschedule(
        self, environment_id: str, run_id: str, delay_until: datetime
    ) -> MutationResult:
        return await self._mutate(environment_id, run_id, "delay", to_ms(delay_until))

    async def cancel(self, environment_id: str, run_id: str, reason: str) -> MutationResult:
        """The entry stays queued and drains as a cancelled run; a second cancel changes
        nothing."""
        return await self._mutate(environment_id, run_id, "cancel", reason)

    async def _mutate(
        self, environment_id: str, run_id: str, op: str, *args: object
    ) -> MutationResult:
        reply = await self.scripts.call(
            "mutate", [self.keys(environment_id).entry(run_id)], [op, *args]
        )
        outcome = MutationOutcome(_text(reply[0]))
        if outcome is not MutationOutcome.OK:
            return MutationResult(outcome)
        return MutationResult(outcome, BufferedEntry.from_fields(pairs(reply[1:])))

    async def reset_idempotency_key(
        self, environment_id: str, task_identifier: str, key: str
    ) -> ResetResult:
        """Clears the lookup, any claim, and the key on the buffered snapshot."""
        keys = self.keys(environment_id)
        cleared, status = await self.scripts.call(
            "reset_key",
            [keys.lookup(task_identifier, key), keys.claim(task_identifier, key)],
            [keys.entry_prefix],
        )
        status_text = _text(status)
        return ResetResult(bool(int(cleared)), EntryStatus(status_text) if status_text else None)

    # -- index, stats -----------------------------------------------------------------------
    async def environments(self) -> dict[str, str]:
        """Indexed environments (id -> organization id)."""
        raw = await self.client.hgetall(self.global_keys.environments)
        return {_text(env): _text(org) for env, org in raw.items()}

    async def size(self, environment_id: str) -> int:
        keys = self.keys(environment_id)
        return int(await self.scripts.call("size", [keys.queue, keys.draining], []))

    async def forget_if_empty(self, environment_id: str, organization_id: str) -> bool:
        """Drop an environment from the index unless it holds entries (see the module doc)."""
        # Checked first so a drainer holding entries (its own write in flight) never takes
        # their environment out: dying between the HDEL and the HSET would orphan them.
        if await self.size(environment_id) > 0:
            return False
        await self.client.hdel(self.global_keys.environments, environment_id)
        if await self.size(environment_id) > 0:
            await self.client.hset(self.global_keys.environments, environment_id, organization_id)
            return False
        return True

    async def stats(self, environment_id: str) -> EnvironmentStats:
        keys = self.keys(environment_id)
        depth, draining, oldest, now = await self.scripts.call(
            "stats", [keys.queue, keys.draining], [keys.entry_prefix]
        )
        server_now = parse_ms(str(now))
        assert server_now is not None  # the server's own clock
        return EnvironmentStats(
            environment_id, int(depth), int(draining), parse_ms(oldest or None), server_now
        )

    async def count_older(self, environment_id: str, cutoff: datetime, limit: int = 10_000) -> int:
        """Queued entries created before `cutoff` among the first `limit`."""
        keys = self.keys(environment_id)
        return int(
            await self.scripts.call(
                "count_older", [keys.queue], [keys.entry_prefix, to_ms(cutoff), limit]
            )
        )

    async def reindex(self) -> int:
        """Add every environment that holds queued or DRAINING entries but is missing from the
        index (an index write that failed after its accept, a drainer that died inside
        `forget_if_empty`). Scans every node; run it rarely."""
        indexed = await self.environments()
        added = 0
        pattern = f"{{{self.prefix}:*}}:[qd]"
        async for raw_key in self.client.scan_iter(match=pattern, count=1000):
            key = _text(raw_key)
            environment_id = key[len(self.prefix) + 2 : -len("}:q")]
            # "}" only in another key whose user-given tail ends like a queue's (a lookup).
            if "}" in environment_id or environment_id in indexed:
                continue
            keys = self.keys(environment_id)
            if key == keys.queue:
                first = await self.client.lindex(key, 0)
            else:
                members = await self.client.zrange(key, 0, 0)
                first = members[0] if members and isinstance(members[0], bytes | str) else None
            if first is None:
                continue
            entry = await self.get(environment_id, _text(first))
            organization_id = entry.organization_id if entry is not None else ""
            await self.client.hset(self.global_keys.environments, environment_id, organization_id)
            indexed[environment_id] = organization_id
            added += 1
        return added
