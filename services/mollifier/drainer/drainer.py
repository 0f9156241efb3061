"""The drainer (spec §4): moves buffered entries into the run store, fairly.

Each tick:
1. every `recovery_interval`, entries DRAINING past the visibility timeout (their drainer died)
   go back to the front of their queue;
2. a plan: round robin over organizations (the starting one rotates every tick), each
   contributing its next environment (a per-organization cursor), `env_batch_size` entries per
   turn, until `batch_size` is reached: one busy organization or environment cannot starve the
   others, and a tick is bounded;
3. each planned environment pops its share (one script call each, concurrently), marking it
   DRAINING with this tick's owner token;
4. one `RunWriter.create_runs` call for the whole tick, entries interleaved across
   environments: new runs, cancelled runs, and SYSTEM_FAILURE runs for entries out of attempts;
5. per result: written → ack (or fail, for a SYSTEM_FAILURE run); retryable → requeue to the
   front with attempts + 1; permanent → requeue at the last attempt, so the next tick writes it
   as a SYSTEM_FAILURE run.

A writer that raises (the run store is down) requeues everything held without counting an
attempt: an outage must not turn runs into failures. Any failed write backs off 100 ms doubling
to 5 s: the next write waits, even one whose batch was taken while the failure was settled. Several drainers are safe at once (pop is atomic; requeue acts only on the owner's
entries; ack finishes whoever holds it, and run ids make a repeated write a no-op in the run
store). `request_stop()` ends the loop once the ticks in flight are written and settled; a
cancelled tick requeues what it holds.

`run` keeps up to `pipeline_depth` ticks in flight: the next tick's steps 1-3 (`take`) run while
earlier ticks' writes (`write`, steps 4-5) are with the run store, so the drainer, the run store
and Postgres work at the same time instead of taking turns. Each tick keeps its own owner token
and settles its own entries; taking is sequential, so the plan's rotation and its per-tick bound
are unchanged. Ticks in flight may pop the same environment (pop is atomic: disjoint entries).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import redis.exceptions
import structlog

from runops.kit.background import Worker
from runops.kit.backoff import ExponentialBackoff
from runops.runstore.v1 import runstore_pb2
from services.mollifier.buffer import MollifierBuffer
from services.mollifier.entries import BufferedEntry, PoppedEntry, to_ms

log = structlog.get_logger("runops.mollifier.drainer")

# ErrorInfo-style code of the SYSTEM_FAILURE run written for an entry out of attempts.
DRAIN_FAILED_CODE = "MOLLIFIER_DRAIN_FAILED"


class DrainKind(enum.StrEnum):
    CREATE = "create"
    # Cancelled while buffered: written as a cancelled run.
    CANCELLED = "cancelled"
    # Out of attempts (or refused for good): written as a SYSTEM_FAILURE run.
    FAILED = "failed"


class DrainItem:
    """One entry of a tick as the writer sends it. `wire`: the serialized RunInput to write
    (the snapshot with its buffered changes, the run id and creation time its caller was
    shown, `failed` / `cancelled` by kind); an entry nothing changed is its snapshot bytes as
    accepted plus that creation time, never decoded. `entry` and `run` decode on first use."""

    __slots__ = ("_run", "error_code", "error_message", "kind", "popped", "wire")

    def __init__(
        self,
        popped: PoppedEntry,
        kind: DrainKind,
        wire: bytes,
        error_code: str = "",
        error_message: str = "",
    ) -> None:
        self.popped = popped
        self.kind = kind
        self.wire = wire
        # FAILED: the error code and message of the SYSTEM_FAILURE run; CANCELLED: the reason.
        self.error_code = error_code
        self.error_message = error_message
        self._run: runstore_pb2.RunInput | None = None

    @property
    def entry(self) -> BufferedEntry:
        entry = self.popped.entry
        if entry is None:
            raise ValueError(f"buffer entry {self.popped.run_id} does not decode")
        return entry

    @property
    def run(self) -> runstore_pb2.RunInput:
        """What is written, decoded (logs, tests)."""
        if self._run is None:
            self._run = runstore_pb2.RunInput.FromString(self.wire)
        return self._run

    @property
    def created_at(self) -> datetime | None:
        """The creation time the caller was shown (None if its stored value was unreadable)."""
        return self.popped.created_at


class WriteStatus(enum.StrEnum):
    OK = "ok"
    RETRYABLE = "retryable"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class WriteResult:
    status: WriteStatus
    message: str = ""


class RunWriter(Protocol):
    """Writes a tick's runs in one call (the run store's CreateRuns); one result per item, in
    order. A run id already written must answer OK (a drainer that died after writing, a slow
    drainer whose entries were recovered). Raising means nothing is known to be written."""

    async def create_runs(self, items: Sequence[DrainItem]) -> Sequence[WriteResult]: ...


@dataclass
class TickReport:
    recovered: int = 0
    popped: int = 0
    written: int = 0
    failed: int = 0
    requeued: int = 0
    # Environments in the order they were served (fairness tests, logs).
    environments: list[str] = field(default_factory=list)

    @property
    def retried(self) -> bool:
        return self.requeued > 0


@dataclass
class Batch:
    """A tick's popped entries (by environment, queue order), DRAINING under `owner`."""

    owner: str
    held: dict[str, list[PoppedEntry]]
    report: TickReport

    @property
    def empty(self) -> bool:
        return not self.held


class Drainer:
    def __init__(
        self,
        buffer: MollifierBuffer,
        writer: RunWriter,
        *,
        batch_size: int = 1000,
        env_batch_size: int = 50,
        max_attempts: int = 3,
        backoff: ExponentialBackoff | None = None,
        visibility_timeout_seconds: float = 30.0,
        recovery_interval_seconds: float = 5.0,
        idle_seconds: float = 0.05,
        pipeline_depth: int = 3,
        name: str = "drainer",
    ) -> None:
        if pipeline_depth < 1:
            raise ValueError("pipeline_depth must be at least 1")
        self.buffer = buffer
        self.writer = writer
        self.batch_size = batch_size
        self.env_batch_size = min(env_batch_size, batch_size)
        self.max_attempts = max_attempts
        self.backoff = backoff or ExponentialBackoff(base=0.1, cap=5.0)
        self.visibility_timeout = visibility_timeout_seconds
        self.recovery_interval = recovery_interval_seconds
        self.idle_seconds = idle_seconds
        self.pipeline_depth = pipeline_depth
        self.name = name
        self._instance = uuid.uuid4().hex[:12]
        self._ticks = itertools.count()
        self._org_turn = 0
        self._env_turn: dict[str, int] = defaultdict(int)
        self._next_recovery = 0.0
        # Failed ticks in a row (the backoff's input), and when the next write may start.
        self.failures = 0
        self._resume_at = 0.0
        self._stop = asyncio.Event()

    # -- one tick ---------------------------------------------------------------------------
    def plan(self, environments: dict[str, str]) -> list[tuple[str, int]]:
        """(environment, entries to pop) in serving order for this tick."""
        by_org: dict[str, list[str]] = defaultdict(list)
        for environment_id, organization_id in sorted(environments.items()):
            by_org[organization_id].append(environment_id)
        if not by_org:
            return []
        orgs = sorted(by_org)
        start = self._org_turn % len(orgs)
        self._org_turn += 1
        orgs = orgs[start:] + orgs[:start]
        counts: dict[str, int] = {}
        budget = self.batch_size
        for org in itertools.cycle(orgs):
            if budget <= 0:
                break
            envs = by_org[org]
            environment_id = envs[self._env_turn[org] % len(envs)]
            self._env_turn[org] += 1
            share = min(self.env_batch_size, budget)
            counts[environment_id] = counts.get(environment_id, 0) + share
            budget -= share
        return list(counts.items())

    async def recover_stuck(self, environments: Sequence[str]) -> int:
        counts = await asyncio.gather(
            *(self.buffer.recover(env, self.visibility_timeout) for env in environments)
        )
        recovered = sum(counts)
        if recovered:
            log.warning("requeued entries stuck in DRAINING", count=recovered, drainer=self.name)
        return recovered

    def _item(self, popped: PoppedEntry, now: datetime, now_ms: int) -> DrainItem | None:
        """None: the entry does not decode (it stays DRAINING; recovery requeues it)."""
        if popped.attempts < self.max_attempts:
            wire = popped.unchanged_wire(now_ms)
            if wire is not None:
                return DrainItem(popped, DrainKind.CREATE, wire)
        entry = popped.entry
        if entry is None:
            return None
        run = entry.run_input(now)
        if entry.created_at is not None:
            run.created_at.FromDatetime(entry.created_at)
        if entry.attempts >= self.max_attempts:
            message = entry.error or "the run could not be written"
            error = f"buffered run not written after {entry.attempts} attempts: {message}"
            run.failed.code, run.failed.message = DRAIN_FAILED_CODE, error
            return DrainItem(
                popped, DrainKind.FAILED, run.SerializeToString(), DRAIN_FAILED_CODE, error
            )
        if entry.cancelled:
            run.cancelled.reason = entry.cancel_reason
            return DrainItem(
                popped, DrainKind.CANCELLED, run.SerializeToString(), "", entry.cancel_reason
            )
        return DrainItem(popped, DrainKind.CREATE, run.SerializeToString())

    async def tick(self) -> TickReport:
        """One tick, start to end: take a batch, write it, settle it."""
        batch = await self.take()
        return batch.report if batch.empty else await self.write(batch)

    async def take(self) -> Batch:
        """Steps 1-3 of a tick: recovery when due, the plan, the pops (this tick's entries are
        DRAINING under its owner token from here on, until `write` settles them)."""
        report = TickReport()
        environments = await self.buffer.environments()
        if time.monotonic() >= self._next_recovery:
            self._next_recovery = time.monotonic() + self.recovery_interval
            report.recovered = await self.recover_stuck(list(environments))
        plan = self.plan(environments)
        owner = f"{self._instance}:{next(self._ticks)}"
        popped = await asyncio.gather(*(self.buffer.pop(env, count, owner) for env, count in plan))
        held = {env: entries for (env, _), entries in zip(plan, popped, strict=True) if entries}
        report.environments = list(held)
        report.popped = sum(len(entries) for entries in held.values())
        for env, _ in plan:
            if env not in held:
                await self.buffer.forget_if_empty(env, environments.get(env, ""))
        return Batch(owner, held, report)

    async def write(self, batch: Batch) -> TickReport:
        """Steps 4-5 of a tick: one `create_runs` for the batch, then per-entry settlement. A
        cancelled write requeues what the batch holds (attempts unchanged)."""
        held, owner, report = batch.held, batch.owner, batch.report
        now = datetime.now(UTC)
        now_ms = to_ms(now)
        # Interleaved across environments: each one's entries stay in queue order.
        ordered = [
            entry
            for group in itertools.zip_longest(*held.values())
            for entry in group
            if entry is not None
        ]
        items = [item for entry in ordered if (item := self._item(entry, now, now_ms))]
        if len(items) < len(ordered):
            log.error("undecodable buffer entries left DRAINING", count=len(ordered) - len(items))
            if not items:
                return report
        try:
            results = await self.writer.create_runs(items)
            if len(results) != len(items):
                raise RuntimeError(f"writer answered {len(results)} results for {len(items)} runs")
        except asyncio.CancelledError:
            await asyncio.shield(self._requeue_all(held, owner, "drainer stopped mid-write"))
            raise
        except Exception as exc:
            log.warning("run writer failed; requeued the tick", error=repr(exc), drainer=self.name)
            self._back_off()
            report.requeued = await self._requeue_all(held, owner, f"write failed: {exc!r}")
            return report
        await self._settle(items, results, owner, report)
        return report

    async def _requeue_all(self, held: dict[str, list[PoppedEntry]], owner: str, error: str) -> int:
        counts = await asyncio.gather(
            *(
                self.buffer.requeue(
                    env, [e.run_id for e in entries], owner, count_attempt=False, error=error
                )
                for env, entries in held.items()
            )
        )
        return sum(counts)

    async def _settle(
        self,
        items: Sequence[DrainItem],
        results: Sequence[WriteResult],
        owner: str,
        report: TickReport,
    ) -> None:
        done: dict[str, list[str]] = defaultdict(list)
        failed: dict[str, list[str]] = defaultdict(list)
        retry: dict[str, list[str]] = defaultdict(list)
        last_try: dict[str, list[str]] = defaultdict(list)
        errors: dict[str, str] = {}
        for item, result in zip(items, results, strict=True):
            env, run_id = item.popped.environment_id, item.popped.run_id
            if result.status is WriteStatus.OK:
                (failed if item.kind is DrainKind.FAILED else done)[env].append(run_id)
            elif result.status is WriteStatus.RETRYABLE:
                retry[env].append(run_id)
                errors[env] = result.message
            elif item.kind is DrainKind.FAILED:
                # Not even the SYSTEM_FAILURE run could be written: give up, loudly.
                log.error(
                    "buffered run dropped: its failure run was refused",
                    run_id=run_id,
                    environment_id=env,
                    error=result.message,
                )
                failed[env].append(run_id)
            else:
                last_try[env].append(run_id)
                errors[env] = result.message
        ops = [
            *(self.buffer.ack(env, ids) for env, ids in done.items()),
            *(
                self.buffer.fail(env, ids, "written as a SYSTEM_FAILURE run")
                for env, ids in failed.items()
            ),
        ]
        requeues = [
            *(
                self.buffer.requeue(env, ids, owner, error=errors.get(env, ""))
                for env, ids in retry.items()
            ),
            *(
                self.buffer.requeue(
                    env, ids, owner, attempts_floor=self.max_attempts, error=errors.get(env, "")
                )
                for env, ids in last_try.items()
            ),
        ]
        await asyncio.gather(*ops)
        if requeues:
            self._back_off()
        report.requeued = sum(await asyncio.gather(*requeues))
        report.written = sum(len(ids) for ids in done.values())
        report.failed = sum(len(ids) for ids in failed.values())

    # -- the loop ---------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Finish the ticks in flight (no new ones are taken), then return from `run`."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Tick until `request_stop`, up to `pipeline_depth` ticks in flight: the next batch is
        taken while earlier ones are being written. Sleeps when idle, backs off after failed
        writes. On stop, the writes in flight finish; if `run` is cancelled, they are cancelled
        and requeue what they hold."""
        writes: set[asyncio.Task[TickReport]] = set()
        try:
            while not self._stop.is_set():
                if len(writes) >= self.pipeline_depth:
                    delay = await self._absorb(writes)
                    if delay is not None:
                        await self._sleep(delay)
                    continue
                try:
                    batch = await self.take()
                except redis.exceptions.RedisError as exc:
                    # Entries popped before the failure come back through the visibility timeout.
                    self.failures += 1
                    delay = self.backoff.compute(self.failures)
                    log.warning("drainer tick failed", error=repr(exc), retry_in=round(delay, 3))
                    await self._sleep(delay)
                    continue
                if ready is not None:
                    ready.set()
                if not batch.empty:
                    # A write that failed while this batch was taken may have requeued what it
                    # popped: wait out the backoff, or a fast failure would retry at once.
                    await self._sleep(self._resume_at - time.monotonic())
                    writes.add(asyncio.create_task(self.write(batch)))
                    continue
                if writes:
                    # Nothing left to take: wait for a write (it may retry, or free its entries).
                    delay = await self._absorb(writes)
                    if delay is not None:
                        await self._sleep(delay)
                else:
                    self.failures = 0
                    await self._sleep(self.idle_seconds)
            while writes:
                await self._absorb(writes)
        except BaseException:
            for task in writes:
                task.cancel()
            await asyncio.gather(*writes, return_exceptions=True)
            raise

    async def _absorb(self, writes: set[asyncio.Task[TickReport]]) -> float | None:
        """Wait for at least one write in flight; the backoff to sleep if one retried."""
        done, _ = await asyncio.wait(writes, return_when=asyncio.FIRST_COMPLETED)
        writes.difference_update(done)
        retried = False
        unexpected: Exception | None = None
        for task in done:  # every result read, so no exception goes unretrieved
            try:
                report = task.result()
            except redis.exceptions.RedisError as exc:
                # Settling failed: what was not acked comes back through the visibility timeout.
                log.warning("drainer tick failed", error=repr(exc))
                self._back_off()
                retried = True
                continue
            except Exception as exc:
                unexpected = unexpected or exc
                continue
            retried = retried or report.retried
        if unexpected is not None:
            raise unexpected  # as a serial tick's would: `run` cancels the rest, they requeue
        if not retried:
            self.failures = 0
            return None
        return self._resume_at - time.monotonic()

    def _back_off(self) -> None:
        """A write failed: the next one waits out the backoff. Set before its entries are
        requeued, so a take in flight that pops them again already sees it."""
        self.failures += 1
        self._resume_at = time.monotonic() + self.backoff.compute(self.failures)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), max(seconds, 0.0))

    def worker(self, stop_timeout: float = 10.0) -> Worker:
        """A kit background Worker running this drainer (ready after its first tick)."""

        async def body() -> None:
            await self.run(worker.ready)
            # Stopped: stay parked (not returned) until the app stops the worker.
            await asyncio.Event().wait()

        worker = Worker(
            f"mollifier-{self.name}",
            body,
            backoff=self.backoff,
            on_stopping=self.request_stop,
            stop_timeout=stop_timeout,
        )
        return worker
