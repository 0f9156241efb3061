"""`runops soak`: minutes of mixed load at about half the measured capacity, watching for leaks.

    runops soak [--minutes 10] [--warmup 2] [--every 60] [--fraction 0.5] [--durable]

On a local stack it starts (as `runops bench` does), with every service as its own process
(control plane, run store, mollifier, its drainer, ingest):

  calibrate   each kind of call alone, as fast as answered, for a few seconds: Trigger (32
              callers), the mollifier's GetRun of those runs (32 callers), and one batch
              streamed through ingest -> capacity per kind
  soak        the three kinds at once, each paced at fraction / 3 of its capacity (so the
              whole is about `fraction` of the machine): triggers, reads of runs triggered
              earlier, and batches of ~5 s of items back to back; every `every` seconds the
              environment's API key is rotated (the old one must be refused at once, the next
              batch uses the new one) and the organization's flags change (mollifier on and off
              in turn, an extra flag set)
  sample      every few seconds: each process's RSS and open file descriptors, client
              connections on each Postgres server, Redis's connected clients
  check       the buffer drains; Postgres then holds exactly the runs the triggers were answered
              with plus every batch's items (nothing lost, nothing duplicated); every call was
              answered OK; every read found its run

A series is flat when the median of its last minute is within 10% of the median of its first
minute after warm-up (counts of connections and descriptors may also move by 2). The exit
status is 0 only when every series is flat and every answer was correct.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg

from runops.bench import floors
from runops.bench.proc import status_kib
from runops.bench.services import Suite, pid_of, running_suite
from runops.cli.grid import aligned

if TYPE_CHECKING:
    from runops.ingest.v1 import ingest_pb2 as ing
    from runops.localstack import LocalStack
    from runops.localstack.services import ServiceProcess

Progress = Callable[[str], None]
PAYLOAD_BYTES = 256
CALLERS = 32
# A series may drift this much between its first minute after warm-up and its last one.
FLAT_SHARE = 0.10
# ... or, for counts (connections, descriptors), by this many.
FLAT_COUNT_SLACK = 2
BATCH_SECONDS = 5.0  # each batch carries about this many seconds of its paced item rate
DRAIN_LIMIT_SECONDS = 180.0
# A rotated key is refused everywhere within a second (spec §2: consumers' caches drop stale
# entries within a second; measured 5-50 ms). Checking at once raced the invalidation: a flake.
ROTATION_BOUND_SECONDS = 1.0


@dataclass
class Series:
    name: str
    unit: str  # "MiB" or "" (a count)
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds, value)

    def minute_medians(self, minutes: int) -> list[float | None]:
        by_minute: list[list[float]] = [[] for _ in range(minutes)]
        for at, value in self.samples:
            by_minute[min(int(at // 60), minutes - 1)].append(value)
        return [statistics.median(v) if v else None for v in by_minute]

    def verdict(self, warmup: float) -> tuple[float | None, float | None, bool]:
        """(median of the first minute after warm-up, median of the last minute, flat?)."""
        end = self.samples[-1][0] if self.samples else 0.0
        first = [v for at, v in self.samples if warmup <= at < warmup + 60]
        last = [v for at, v in self.samples if at >= max(end - 60, warmup)]
        if not first or not last:
            return None, None, True
        base, final = statistics.median(first), statistics.median(last)
        slack = max(abs(base) * FLAT_SHARE, 0 if self.unit else FLAT_COUNT_SLACK)
        return base, final, abs(final - base) <= slack


@dataclass
class Tally:
    """What the soak sent and what came back."""

    trigger_ids: list[str] = field(default_factory=list)
    reads: int = 0
    reads_missing: int = 0
    batches: int = 0
    batch_items: int = 0
    batches_wrong: int = 0
    rotations: int = 0
    # Rotations whose old key was still accepted ROTATION_BOUND_SECONDS after the rotation, and
    # the longest the old key took to be refused where it was.
    old_key_still_worked: int = 0
    old_key_refused_after: float = 0.0
    flag_changes: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, kind: str, exc: BaseException) -> None:
        key = f"{kind}: {_code_name(exc)}"
        self.errors[key] = self.errors.get(key, 0) + 1


def _code_name(exc: BaseException) -> str:
    """The gRPC status of a failed call (a grpc error's method, a runops client error's
    property), else the exception's type."""
    code = getattr(exc, "code", None)
    code = code() if callable(code) else code
    return str(getattr(code, "name", type(exc).__name__))


@dataclass
class SoakResult:
    minutes: float
    warmup: float
    capacity: dict[str, float]
    paced: dict[str, float]
    series: list[Series]
    tally: Tally
    runs_expected: int
    runs_found: int
    drained: bool

    @property
    def correct(self) -> bool:
        t = self.tally
        return (
            not t.errors
            and t.reads_missing == 0
            and t.batches_wrong == 0
            and t.old_key_still_worked == 0
            and len(set(t.trigger_ids)) == len(t.trigger_ids)
            and self.drained
            and self.runs_found == self.runs_expected
        )

    @property
    def flat(self) -> bool:
        return all(s.verdict(self.warmup * 60)[2] for s in self.series)

    def report(self) -> str:
        t = self.tally
        lines = [
            f"soak: {self.minutes:g} min of mixed load, warm-up {self.warmup:g} min",
            "  capacity alone: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in self.capacity.items()),
            "  paced at: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in self.paced.items()),
            f"  sent: {len(t.trigger_ids):,} triggers, {t.reads:,} reads, {t.batches:,} batches"
            f" ({t.batch_items:,} items), {t.rotations} key rotations, {t.flag_changes} flag"
            " changes",
            f"  checked: Postgres holds {self.runs_found:,} of {self.runs_expected:,} expected"
            f" runs; buffer drained: {'yes' if self.drained else 'NO'}; reads not found:"
            f" {t.reads_missing}; wrong batches: {t.batches_wrong}; old key refused within"
            f" {t.old_key_refused_after * 1000:.0f} ms of its rotation (bound"
            f" {ROTATION_BOUND_SECONDS:g} s), accepted after that: {t.old_key_still_worked};"
            f" errors: {t.errors or 'none'}",
            "",
            _curves(self.series, self.minutes, self.warmup),
            "",
            f"answers {'correct' if self.correct else 'WRONG'};"
            f" {'every series flat' if self.flat else 'NOT flat'}"
            f" (last minute within {FLAT_SHARE:.0%} of the first after warm-up)",
        ]
        return "\n".join(lines)


def _curves(series: list[Series], minutes: float, warmup: float) -> str:
    """One row per series: its per-minute medians, then the verdict."""
    count = max(1, int(-(-minutes // 1)))
    header = ["series", *(f"m{i + 1}" for i in range(count)), "drift", "flat"]
    rows = [header]
    for s in series:
        base, final, flat = s.verdict(warmup * 60)
        drift = f"{(final - base) / base:+.1%}" if base and final is not None else "-"
        cells = [f"{v:,.1f}" if v is not None else "-" for v in s.minute_medians(count)]
        name = f"{s.name} ({s.unit})" if s.unit else s.name
        rows.append([name, *cells, drift, "yes" if flat else "NO"])
    return aligned(rows)


# -- load --------------------------------------------------------------------------------------


async def _as_fast_as_answered(seconds: float, call: Callable[[], Awaitable[None]]) -> float:
    """Calls per second CALLERS concurrent callers complete in `seconds`."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await call()
            done += 1

    began = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(CALLERS)))
    return done / (time.perf_counter() - began)


async def _paced(rate: float, until: float, call: Callable[[], Awaitable[None]]) -> None:
    """`rate` calls per second until `until` (perf_counter), at most 4 x CALLERS in flight."""
    limit = asyncio.Semaphore(4 * CALLERS)
    tasks: set[asyncio.Task[None]] = set()
    began = time.perf_counter()
    sent = 0

    async def one() -> None:
        try:
            await call()
        finally:
            limit.release()

    while (now := time.perf_counter()) < until:
        while sent < (now - began) * rate:
            await limit.acquire()
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)


def _items(n: int) -> Callable[[], Iterator[ing.BatchItem]]:
    from runops.ingest.v1 import ingest_pb2 as ing

    def items() -> Iterator[ing.BatchItem]:
        for i in range(n):
            yield ing.BatchItem(
                index=i, task=floors.TASK, payload=floors.payload(i, PAYLOAD_BYTES),
                payload_type=floors.PAYLOAD_TYPE,
            )  # fmt: skip

    return items


class Load:
    """The soak's clients and what they saw."""

    def __init__(self, suite: Suite, mollifier: str, ingest: str) -> None:
        from runops.controlplane.v1 import controlplane_pb2_grpc as cp_grpc
        from runops.kit.channels import create_channel
        from runops.mollifier.client import MollifierClient

        self.suite, self.ingest_target = suite, ingest
        self.api_key = suite.api_key
        self.tally = Tally()
        self.mollifier = MollifierClient(mollifier, token=suite.internal_token)
        self._admin_channel = create_channel(suite.base[0].target, token=suite.admin_token)
        self.admin = cp_grpc.ControlPlaneServiceStub(self._admin_channel)
        self.key_lock = asyncio.Lock()  # a batch holds it: a rotation waits for it
        self._count = 0

    async def close(self) -> None:
        await self.mollifier.close()
        await self._admin_channel.close()

    async def trigger(self) -> None:
        from runops.mollifier.v1 import mollifier_pb2 as m

        self._count += 1
        request = m.TriggerRequest(
            environment_id=self.suite.environment_id, task_identifier=floors.TASK,
            payload=floors.payload(self._count, PAYLOAD_BYTES), payload_type=floors.PAYLOAD_TYPE,
        )  # fmt: skip
        try:
            reply = await self.mollifier.trigger(request)
        except Exception as exc:  # counted: the soak injects no fault, so any is wrong
            self.tally.error("Trigger", exc)
            return
        self.tally.trigger_ids.append(reply.run.id)

    async def read(self) -> None:
        ids = self.tally.trigger_ids
        if not ids:
            return
        run_id = random.choice(ids)
        try:
            run = await self.mollifier.get_run(
                environment_id=self.suite.environment_id, run_id=run_id
            )
        except Exception as exc:
            self.tally.error("GetRun", exc)
            return
        self.tally.reads += 1
        if run is None or run.id != run_id:
            self.tally.reads_missing += 1

    async def batch(self, n: int) -> float:
        """Streams one batch of `n` items with the current key; its items per second."""
        from runops.ingest.client import IngestClient

        async with self.key_lock:
            began = time.perf_counter()
            try:
                async with IngestClient(self.ingest_target, self.api_key) as client:
                    result = await client.run_batch(n, _items(n))
            except Exception as exc:
                self.tally.error("StreamBatchItems", exc)
                return 0.0
            seconds = time.perf_counter() - began
        self.tally.batches += 1
        self.tally.batch_items += n
        answer = result.response
        if not answer.sealed or answer.accepted_count != n:
            self.tally.batches_wrong += 1
        return n / seconds

    async def rotate_and_flip(self, turn: int) -> None:
        """A new API key (the old one must be refused within ROTATION_BOUND_SECONDS) and a
        flag change."""
        import grpc

        from runops.controlplane.v1 import controlplane_pb2 as cp
        from runops.ingest.client import IngestClient

        async with self.key_lock:
            old = self.api_key
            try:
                reply = await self.admin.RotateApiKey(
                    cp.RotateApiKeyRequest(environment_id=self.suite.environment_id), timeout=10
                )
            except grpc.aio.AioRpcError as exc:
                self.tally.error("RotateApiKey", exc)
                return
            self.api_key = reply.api_key
            self.tally.rotations += 1
            rotated = time.monotonic()
            async with IngestClient(self.ingest_target, old, attempts=1) as client:
                while True:
                    try:
                        # One key per turn: an accepted retry makes no second batch.
                        await client.create_batch(1, idempotency_key=f"soak-old-key-{turn}")
                    except Exception as exc:
                        if _code_name(exc) != "UNAUTHENTICATED":
                            self.tally.error("old key", exc)
                            break
                        refused = time.monotonic() - rotated
                        tally = self.tally
                        tally.old_key_refused_after = max(tally.old_key_refused_after, refused)
                        break
                    if time.monotonic() - rotated > ROTATION_BOUND_SECONDS:
                        self.tally.old_key_still_worked += 1
                        break
                    await asyncio.sleep(0.02)
        try:
            await self.admin.SetOrganizationFlags(
                cp.SetOrganizationFlagsRequest(
                    organization_id=self.suite.organization_id,
                    mollifier_enabled=turn % 2 == 0,
                    set_extra={"soak_turn": str(turn)},
                ),
                timeout=10,
            )
        except grpc.aio.AioRpcError as exc:
            self.tally.error("SetOrganizationFlags", exc)
            return
        self.tally.flag_changes += 1


# -- samples -----------------------------------------------------------------------------------


class Sampler:
    def __init__(self, processes: list[ServiceProcess], suite: Suite) -> None:
        self.processes = processes
        self.suite = suite
        self.series: dict[str, Series] = {}
        self._pg: list[tuple[str, asyncpg.Connection]] = []
        self._redis: Any = None

    async def open(self) -> None:
        import redis.asyncio as redis

        stack = self.suite.stack
        for name, db in (("controlplane", stack.controlplane_db), ("runops", stack.runops_db)):
            for role, dsn in (("writer", db.admin_writer_dsn), ("replica", db.admin_replica_dsn)):
                self._pg.append((f"postgres {name} {role} connections", await asyncpg.connect(dsn)))
        self._redis = redis.Redis.from_url(stack.redis_url)

    async def close(self) -> None:
        for _, conn in self._pg:
            await conn.close()
        if self._redis is not None:
            await self._redis.aclose()

    def _add(self, name: str, unit: str, at: float, value: float) -> None:
        self.series.setdefault(name, Series(name, unit)).samples.append((at, value))

    async def sample(self, at: float) -> None:
        for process in self.processes:
            pid = pid_of(process)
            rss = status_kib(pid, "VmRSS")
            if rss is not None:
                self._add(f"{process.label} RSS", "MiB", at, rss / 1024)
            with contextlib.suppress(OSError):
                self._add(f"{process.label} open fds", "", at, len(os.listdir(f"/proc/{pid}/fd")))
        sql = (
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        for name, conn in self._pg:
            self._add(name, "", at, float(await conn.fetchval(sql)))
        clients = (await self._redis.info("clients"))["connected_clients"]
        self._add("redis connected clients", "", at, float(clients) - 1)  # less our own


# -- the run -----------------------------------------------------------------------------------


async def _drained(load: Load, limit: float) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        stats = await load.mollifier.buffer_stats(load.suite.environment_id)
        if stats.total_depth == 0 and stats.total_draining == 0:
            return True
        await asyncio.sleep(0.5)
    return False


async def _runs_in_postgres(suite: Suite) -> int:
    found = 0
    for db in (suite.stack.controlplane_db, suite.stack.runops_db):
        conn = await asyncpg.connect(db.admin_writer_dsn)
        try:
            sql = "SELECT count(*) FROM runs WHERE environment_id = $1"
            found += int(await conn.fetchval(sql, suite.environment_id))
        finally:
            await conn.close()
    return found


async def soak(
    suite: Suite,
    *,
    minutes: float,
    warmup: float,
    every: float,
    fraction: float,
    calibrate: float,
    sample_every: float,
    progress: Progress,
) -> SoakResult:
    from runops.localstack.ports import free_port
    from runops.localstack.services import ServiceProcess

    say = progress
    async with contextlib.AsyncExitStack() as exits:
        ingest = await exits.enter_async_context(
            suite.service("ingest", "ingest", RUNOPS_RATE_LIMIT_ENABLED="false")
        )
        drainer = ServiceProcess(
            "mollifier", free_port(), -1, suite.logs / "mollifier-drainer.log",
            env=suite.env(), companion="mollifier-drainer",
        )  # fmt: skip
        await exits.enter_async_context(drainer)
        load = Load(suite, suite.base[2].target, ingest.target)
        exits.push_async_callback(load.close)
        await load.rotate_and_flip(0)  # the mollifier on, and the key is the soak's own

        say(f"calibrating: each kind of call alone for {calibrate:g}s")
        capacity = {
            "triggers": await _as_fast_as_answered(calibrate, load.trigger),
            "reads": await _as_fast_as_answered(calibrate, load.read),
        }
        capacity["batch items"] = await load.batch(max(100, int(capacity["triggers"] * calibrate)))
        paced = {kind: rate * fraction / 3 for kind, rate in capacity.items()}
        say(
            "capacity alone: "
            + ", ".join(f"{k} {v:,.0f}/s" for k, v in capacity.items())
            + f"; soaking {minutes:g} min at {fraction:.0%} of it, a third each"
        )

        sampler = Sampler([*suite.base, ingest, drainer], suite)
        await sampler.open()
        exits.push_async_callback(sampler.close)
        began = time.perf_counter()
        until = began + minutes * 60
        batch_size = max(10, int(paced["batch items"] * BATCH_SECONDS))

        async def batches() -> None:
            while time.perf_counter() < until:
                slot = time.perf_counter() + BATCH_SECONDS
                await load.batch(batch_size)
                await asyncio.sleep(max(0.0, slot - time.perf_counter()))

        async def turns() -> None:
            turn = 1
            while (next_turn := began + turn * every) < until:
                await asyncio.sleep(next_turn - time.perf_counter())
                await load.rotate_and_flip(turn)
                turn += 1

        async def samples() -> None:
            while (now := time.perf_counter()) < until:
                await sampler.sample(now - began)
                if int((now - began) // 60) != int((now - began - sample_every) // 60):
                    say(
                        f"minute {int((now - began) // 60) + 1}: {len(load.tally.trigger_ids):,}"
                        f" triggers, {load.tally.batch_items:,} batch items, {load.tally.reads:,}"
                        f" reads, {sum(load.tally.errors.values())} errors"
                    )
                await asyncio.sleep(sample_every)

        await asyncio.gather(
            _paced(paced["triggers"], until, load.trigger),
            _paced(paced["reads"], until, load.read),
            batches(),
            turns(),
            samples(),
        )
        say("soak over: waiting for the buffer to drain, then counting runs in Postgres")
        drained = await _drained(load, DRAIN_LIMIT_SECONDS)
        found = await _runs_in_postgres(suite)
        expected = len(set(load.tally.trigger_ids)) + load.tally.batch_items
        return SoakResult(
            minutes, warmup, capacity, paced, list(sampler.series.values()), load.tally,
            expected, found, drained,
        )  # fmt: skip


async def run(stack: LocalStack, progress: Progress, **options: Any) -> SoakResult:
    async with running_suite(stack, progress) as suite:
        return await soak(suite, progress=progress, **options)
