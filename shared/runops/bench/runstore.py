"""Run store (spec §7, issue 8): routed `GetRun`, `CreateRuns` and `AcceptBatchItems` through
gRPC, each beside its raw asyncpg floor measured in the same run on the same servers, and a
100,000-item batch with the service's RSS sampled along the way.

    python -m runops.bench.runstore [--seconds N] [--concurrency C] [--write-concurrency W]
                                        [--chunk K] [--runs R] [--batch-items N] [--batch-chunk K]

The run store runs as its own OS process (`python -m services.runstore`, split on, on a local
stack this benchmark starts, or the one given by --target). Every client side runs in a fresh
load-generator subprocess (`--loadgen-worker`), so neither the gRPC client nor a floor's asyncpg
client shares a process (or an event loop) with the server. Phases, in order, each with a
warm-up first, then N measured seconds of closed-loop callers:

  raw PK read        the service's own SELECT_RUN by primary key, asyncpg pool of C on the run-ops
                     replica, round-robin over R seeded runs
  GetRun             RunStoreClient.get_run (default consistency: the owning store's replica), C
                     callers, the same R runs by friendly id
  raw unnest runs    INSERT INTO runs ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING, K rows a
                     statement, W in flight, on the run-ops writer
  raw COPY runs      copy_records_to_table('runs'), the same rows
  CreateRuns         RunStoreClient.create_runs, K pre-minted runs with created_at (as the
                     mollifier drainer sends them), W in flight
  raw unnest items   one statement: batch_items rows ON CONFLICT DO NOTHING, then their runs
  raw COPY items     copy_records_to_table('batch_items') + ('runs') in one transaction
  AcceptBatchItems   RunStoreClient.accept_batch_items, K small items a chunk, W in flight
  100,000-item batch accept in chunks (with holes and duplicates), missing ranges midway and at
                     the end, resend the holes, seal, list every run by pages of 1,000; the
                     service's VmRSS at 10% and 100% of the items

See shared/runops/bench/README.md for the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import asyncpg
from google.protobuf import timestamp_pb2

from runops.bench import bare, loadgen, proc, profile, program
from runops.bench.floors import (
    MAX_ATTEMPTS,
    ORG,
    PAYLOAD_TYPE,
    PROJECT,
    QUEUE,
    TASK,
    Method,
    write_items,
    write_runs,
)
from runops.bench.report import cores, durability, settings
from runops.kit.ids import Residency, mint_body
from runops.runstore.client import RunStoreClient
from runops.runstore.v1 import runstore_pb2 as rs

if TYPE_CHECKING:
    from runops.localstack import LocalStack

Progress = Callable[[str], None]
Kind = Literal[
    "get_run",
    "pg_get_run",
    "create_runs",
    "pg_insert_runs",
    "pg_copy_runs",
    "accept",
    "pg_insert_items",
    "pg_copy_items",
    "large_batch",
]

MODULE = "runops.bench.runstore"
# Batches the timed accept phases write into (indexes never collide across chunks).
BIG_RUN_COUNT = 1_000_000
# The command line's sizes, as `run` takes them.
SIZES = (
    "seconds", "concurrency", "write_concurrency", "chunk", "runs", "batch_items", "batch_chunk",
)  # fmt: skip
# The 100,000-item batch: a hole every HOLE_EVERY indexes, each chunk resends DUPLICATES indexes
# of the chunk before it, pages of PAGE_SIZE runs.
HOLE_EVERY = 997
DUPLICATES = 10
PAGE_SIZE = 1000
# The load generator's connections to a run store of 2 processes.
TWO_PROCESS_CHANNELS = 8


def payload(i: int) -> bytes:
    """A small item's payload (spec §7: <= 1 KiB, no offload), what the routed and the raw paths
    both write (with the floors' organization, project, task, queue and payload type)."""
    return b'{"to":"user-%d@example.com","template":"welcome","locale":"en"}' % i


# -- the load generator (a subprocess) ------------------------------------------------------------


@dataclass(frozen=True)
class LoadSpec(loadgen.Spec):
    """One run of this benchmark's load generator."""

    kind: Kind
    environment_id: str
    chunk: int = 1  # rows a call (writes)
    target: str = ""  # grpc
    token: str = ""  # grpc
    dsn: str = ""  # the floors
    run_ids: tuple[str, ...] = ()  # bodies (reads)
    batch_id: str = ""  # body (accept phases)
    items: int = 0  # the large batch's run_count
    channels: int = 1  # gRPC connections the callers share (reads and CreateRuns)


def _timestamp(when: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp


def _clients(spec: LoadSpec) -> tuple[list[RunStoreClient], loadgen.Close]:
    """`spec.channels` clients; more than one: each on a connection of its own
    (`loadgen.own_connection_channel`), so a service's processes all get calls."""
    if spec.channels == 1:
        clients = [RunStoreClient(spec.target, token=spec.token)]
        channels = []
    else:
        channels = [
            loadgen.own_connection_channel(spec.target, spec.token) for _ in range(spec.channels)
        ]
        clients = [RunStoreClient(spec.target, channel=channel) for channel in channels]

    async def close() -> None:
        for client in clients:
            await client.close()
        for channel in channels:
            await channel.close()

    return clients, close


async def _get_run_caller(spec: LoadSpec) -> tuple[loadgen.Call, loadgen.Close]:
    clients, close = _clients(spec)
    friendly = [f"run_{body}" for body in spec.run_ids]

    async def call(n: int) -> int:
        k = n % len(friendly)
        client = clients[n % len(clients)]
        run = await client.get_run(environment_id=spec.environment_id, run_id=friendly[k])
        if run is None or run.id != spec.run_ids[k]:
            raise loadgen.Mismatch("wrong or missing run")
        return 1

    return call, close


async def _pool(spec: LoadSpec) -> asyncpg.Pool:
    return await asyncpg.create_pool(spec.dsn, min_size=spec.concurrency, max_size=spec.concurrency)


async def _pg_get_run_caller(spec: LoadSpec) -> tuple[loadgen.Call, loadgen.Close]:
    from services.runstore.sql import SELECT_RUN

    pool = await _pool(spec)

    async def call(n: int) -> int:
        body = spec.run_ids[n % len(spec.run_ids)]
        row = await pool.fetchrow(SELECT_RUN, body, spec.environment_id)
        if row is None or row["id"] != body:
            raise loadgen.Mismatch("wrong or missing run")
        return 1

    return call, pool.close


def _count(status: str, expected: int) -> int:
    """Rows in an "INSERT 0 N" / "COPY N" status, which must be `expected`."""
    written = int(status.rsplit(" ", 1)[-1])
    if written != expected:
        raise loadgen.Mismatch(f"wrote {written} rows, not {expected}")
    return written


async def _create_runs_caller(spec: LoadSpec) -> tuple[loadgen.Call, loadgen.Close]:
    clients, close = _clients(spec)

    async def call(n: int) -> int:
        client = clients[n % len(clients)]
        created_at = _timestamp(datetime.now(UTC))
        runs = [
            rs.RunInput(
                run_id="run_" + mint_body(Residency.NEW),
                environment_id=spec.environment_id,
                organization_id=ORG,
                project_id=PROJECT,
                task_identifier=TASK,
                payload=payload(n * spec.chunk + i),
                payload_type=PAYLOAD_TYPE,
                default_queue=QUEUE,
                default_max_attempts=MAX_ATTEMPTS,
                created_at=created_at,
            )
            for i in range(spec.chunk)
        ]
        created = await client.create_runs_ids(runs)
        fresh = len(created.friendly_id) - sum(created.is_cached) - len(created.errors)
        if fresh != spec.chunk:
            raise loadgen.Mismatch(f"created {fresh} runs of {spec.chunk}")
        return fresh

    return call, close


async def _pg_runs_caller(spec: LoadSpec, method: Method) -> tuple[loadgen.Call, loadgen.Close]:
    pool = await _pool(spec)

    async def call(n: int) -> int:
        created_at = [datetime.now(UTC)] * spec.chunk if method == "unnest" else None
        ids = [mint_body(Residency.NEW) for _ in range(spec.chunk)]
        payloads = [payload(n * spec.chunk + i) for i in range(spec.chunk)]
        status = await write_runs(
            pool, method, spec.environment_id, ids, payloads, created_at=created_at
        )
        return _count(status, spec.chunk)

    return call, pool.close


async def _accept_caller(spec: LoadSpec) -> tuple[loadgen.Call, loadgen.Close]:
    client = RunStoreClient(spec.target, token=spec.token)
    batch = f"batch_{spec.batch_id}"

    async def call(n: int) -> int:
        first = n * spec.chunk
        reply = await client.accept_batch_items_ids(
            environment_id=spec.environment_id,
            batch_id=batch,
            items=_items(range(first, first + spec.chunk)),
        )
        fresh = len(reply.accepted.duplicate) - sum(reply.accepted.duplicate)
        if fresh != spec.chunk:
            raise loadgen.Mismatch(f"accepted {fresh} new items of {spec.chunk}")
        return fresh

    return call, client.close


def _items(indexes: range | list[int]) -> list[rs.BatchItemInput]:
    return [
        rs.BatchItemInput(
            index=i,
            run=rs.RunInput(
                task_identifier=TASK,
                payload=payload(i),
                payload_type=PAYLOAD_TYPE,
                default_queue=QUEUE,
                default_max_attempts=MAX_ATTEMPTS,
            ),
        )
        for i in indexes
    ]


async def _pg_items_caller(spec: LoadSpec, method: Method) -> tuple[loadgen.Call, loadgen.Close]:
    pool = await _pool(spec)

    async def call(n: int) -> int:
        indexes = list(range(n * spec.chunk, (n + 1) * spec.chunk))
        ids = [mint_body(Residency.NEW) for _ in indexes]
        payloads = [payload(i) for i in indexes]
        status = await write_items(
            pool, method, spec.batch_id, spec.environment_id, indexes, ids, payloads
        )
        return _count(status, spec.chunk)

    return call, pool.close


async def _make_caller(spec: LoadSpec) -> tuple[loadgen.Call, loadgen.Close]:
    match spec.kind:
        case "get_run":
            return await _get_run_caller(spec)
        case "pg_get_run":
            return await _pg_get_run_caller(spec)
        case "create_runs":
            return await _create_runs_caller(spec)
        case "pg_insert_runs" | "pg_copy_runs":
            return await _pg_runs_caller(spec, "copy" if spec.kind == "pg_copy_runs" else "unnest")
        case "accept":
            return await _accept_caller(spec)
        case "pg_insert_items" | "pg_copy_items":
            return await _pg_items_caller(
                spec, "copy" if spec.kind == "pg_copy_items" else "unnest"
            )
    raise ValueError(f"no caller for {spec.kind}")


async def generate(spec: LoadSpec, mark: loadgen.Mark, progress: Progress) -> loadgen.LoadResult:
    """C closed-loop callers (`loadgen.closed_loop`), each call taking the next number (a run
    round-robin, or a fresh chunk of indexes)."""
    call, close = await _make_caller(spec)
    return await loadgen.closed_loop(spec, call, close, mark, progress)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted half-open ranges with touching ones joined."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and merged[-1][1] >= start:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


async def large_batch(spec: LoadSpec, mark: loadgen.Mark, progress: Progress) -> loadgen.LoadResult:
    """One batch of `spec.items` through gRPC (see the module's docstring); every answer is
    checked, and any mismatch fails the run. `mark("tenth")` / `mark("all")` / `mark("listed")`
    let the bench sample the service's RSS."""
    n, chunk, env = spec.items, spec.chunk, spec.environment_id
    figures: dict[str, float] = {}
    client = RunStoreClient(spec.target, token=spec.token)
    try:
        created = await client.create_batch(
            rs.CreateBatchRequest(
                environment_id=env, organization_id=ORG, project_id=PROJECT, run_count=n
            )
        )
        batch = created.batch.friendly_id
        holes = list(range(HOLE_EVERY // 2, n, HOLE_EVERY))
        absent = set(holes)
        limit = asyncio.Semaphore(spec.concurrency)
        sent = Counter[str]()

        async def send(indexes: list[int]) -> None:
            async with limit:
                reply = await client.accept_batch_items(
                    environment_id=env, batch_id=batch, items=_items(indexes)
                )
            if len(reply.items) != len(indexes):
                raise loadgen.Mismatch(f"{len(reply.items)} answers for {len(indexes)} items")
            sent["new"] += sum(1 for item in reply.items if not item.duplicate)
            sent["duplicate"] += sum(1 for item in reply.items if item.duplicate)

        async def stream(low: int, high: int) -> float:
            """Chunks of [low, high) without the holes, each also resending the last
            DUPLICATES indexes of the chunk before; `spec.concurrency` in flight."""
            began = time.perf_counter()
            chunks = []
            for first in range(low, high, chunk):
                again = range(max(low, first - DUPLICATES), first) if first > low else range(0)
                fresh = range(first, min(first + chunk, high))
                chunks.append([i for i in (*again, *fresh) if i not in absent])
            await asyncio.gather(*(send(c) for c in chunks))
            return time.perf_counter() - began

        async def check_missing(expected: list[tuple[int, int]], accepted: int) -> float:
            began = time.perf_counter()
            missing = await client.missing_ranges(environment_id=env, batch_id=batch)
            took = time.perf_counter() - began
            if missing.ranges != expected or missing.truncated:
                raise loadgen.Mismatch(
                    f"missing ranges {missing.ranges[:5]}... ({len(missing.ranges)}, truncated"
                    f" {missing.truncated}), expected {expected[:5]}... ({len(expected)})"
                )
            if missing.accepted_count != accepted or missing.run_count != n:
                raise loadgen.Mismatch(f"accepted {missing.accepted_count}, expected {accepted}")
            return took

        tenth, half = n // 10, n // 2
        accepting = await stream(0, tenth)
        progress(f"{spec.label}: {sent['new']:,} items accepted")
        await mark("tenth")
        accepting += await stream(tenth, half)
        progress(f"{spec.label}: {sent['new']:,} items accepted")
        holes_before_half = [(h, h + 1) for h in holes if h < half]
        figures["missing_mid_ms"] = 1e3 * await check_missing(
            _merge([*holes_before_half, (half, n)]), half - len(holes_before_half)
        )
        figures["missing_mid_ranges"] = len(_merge([*holes_before_half, (half, n)]))
        accepting += await stream(half, n)
        progress(f"{spec.label}: {sent['new']:,} items accepted")
        all_holes = _merge([(h, h + 1) for h in holes])
        figures["missing_end_ms"] = 1e3 * await check_missing(all_holes, n - len(holes))
        figures["missing_end_ranges"] = len(all_holes)
        figures["accept_seconds"] = accepting
        figures["accepted_in_stream"] = sent["new"]
        # The holes, resent with one index either side (present already: duplicates).
        absent.clear()
        refill = sorted({i for h in holes for i in (h - 1, h, h + 1) if 0 <= i < n})
        for first in range(0, len(refill), chunk):
            await send(refill[first : first + chunk])
        figures["missing_after_refill_ms"] = 1e3 * await check_missing([], n)
        figures["duplicates"] = sent["duplicate"]
        if sent["new"] != n:
            raise loadgen.Mismatch(f"{sent['new']} items accepted as new, expected {n}")
        await mark("all")

        began = time.perf_counter()
        sealed = await client.seal_batch(environment_id=env, batch_id=batch)
        figures["seal_ms"] = 1e3 * (time.perf_counter() - began)
        if sealed.outcome != rs.SEAL_BATCH_OUTCOME_SEALED:
            raise loadgen.Mismatch(f"seal answered {rs.SealBatchOutcome.Name(sealed.outcome)}")

        began = time.perf_counter()
        seen = bytearray(n)
        pages, token = 0, ""
        while True:
            runs, token = await client.list_batch_runs(
                environment_id=env, batch_id=batch, page_size=PAGE_SIZE, page_token=token
            )
            pages += 1
            for run in runs:
                if run.batch_id != batch or seen[run.batch_index]:
                    raise loadgen.Mismatch(
                        f"index {run.batch_index} listed twice or of another batch"
                    )
                seen[run.batch_index] = 1
            if pages % 20 == 0:
                progress(f"{spec.label}: listed {pages} pages")
            if not token:
                break
        figures["list_seconds"] = time.perf_counter() - began
        figures["pages"] = pages
        figures["listed"] = sum(seen)
        if figures["listed"] != n:
            raise loadgen.Mismatch(f"listed {figures['listed']:,} runs, expected {n:,}")
        await mark("listed")
    finally:
        await client.close()
    return loadgen.LoadResult(
        rows=n,
        calls=0,
        seconds=figures.get("accept_seconds", 0.0),
        errors={},
        p50_ms=0.0,
        p99_ms=0.0,
        cpu_seconds=0.0,
        pid=os.getpid(),
        figures=figures,
    )


async def _work(spec_json: str, mark: loadgen.Mark, progress: Progress) -> dict[str, Any]:
    spec = LoadSpec.from_json(spec_json)
    run = large_batch if spec.kind == "large_batch" else generate
    return asdict(await run(spec, mark, progress))


# -- the bench process: servers, samples at each mark ---------------------------------------------


@dataclass(frozen=True)
class Processes:
    """What the bench samples: the service's pid (None: not on this machine) and the run-ops
    database's postmasters (None: not local)."""

    service: int | None
    writer: int | None
    replica: int | None


@dataclass(frozen=True)
class _Sample:
    at: float
    own_cpu: float
    machine: tuple[int, int] | None
    service_cpu: float | None
    writer_cpu: float | None
    replica_cpu: float | None
    rss_kib: int | None
    hwm_kib: int | None


def _sample(procs: Processes) -> _Sample:
    def cpu(pid: int | None) -> float | None:
        return None if pid is None else proc.process_tree_cpu(pid)

    return _Sample(
        at=time.monotonic(),
        own_cpu=proc.own_cpu_seconds(),
        machine=proc.machine_jiffies(),
        service_cpu=cpu(procs.service),
        writer_cpu=cpu(procs.writer),
        replica_cpu=cpu(procs.replica),
        rss_kib=proc.status_kib(procs.service, "VmRSS"),
        hwm_kib=proc.status_kib(procs.service, "VmHWM"),
    )


async def _in_subprocess(
    spec: LoadSpec, procs: Processes
) -> tuple[loadgen.LoadResult, dict[str, _Sample]]:
    return await loadgen.run_worker(MODULE, spec, lambda: _sample(procs))


@dataclass(frozen=True)
class Phase:
    name: str
    unit: str  # what `rows` counts: calls, runs, items (an item: a batch_items row + its run)
    rows: int
    calls: int
    seconds: float
    errors: dict[str, int]  # failed calls by kind (warm-up included); empty: all succeeded
    p50_ms: float
    p99_ms: float
    # CPU over the window, in cores (None: not measurable here).
    service_cores: float | None
    loadgen_cores: float
    writer_cores: float | None  # the run-ops writer's postgres processes
    replica_cores: float | None  # the run-ops replica's (it also replays the writes)
    machine_cores: float | None
    bench_cores: float

    @property
    def per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def rest_cores(self) -> float | None:
        """Everything else the machine ran meanwhile (the control-plane database, Redis, moto,
        other work)."""
        if self.machine_cores is None:
            return None
        own = [
            self.service_cores, self.loadgen_cores, self.writer_cores, self.replica_cores,
            self.bench_cores,
        ]  # fmt: skip
        return max(0.0, self.machine_cores - sum(c or 0.0 for c in own))


def _cores(start: float | None, end: float | None, seconds: float) -> float | None:
    return None if start is None or end is None else (end - start) / seconds


async def _phase(spec: LoadSpec, unit: str, procs: Processes, progress: Progress) -> Phase:
    progress(f"{spec.label}: {spec.warmup:.1f}s warm-up, then {spec.seconds:.1f}s measured")
    result, marks = await _in_subprocess(spec, procs)
    start, end = marks["start"], marks["end"]
    seconds = result.seconds
    phase = Phase(
        name=spec.label,
        unit=unit,
        rows=result.rows,
        calls=result.calls,
        seconds=seconds,
        errors=result.errors,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        service_cores=_cores(start.service_cpu, end.service_cpu, seconds),
        loadgen_cores=result.cpu_seconds / seconds,
        writer_cores=_cores(start.writer_cpu, end.writer_cpu, seconds),
        replica_cores=_cores(start.replica_cpu, end.replica_cpu, seconds),
        machine_cores=proc.machine_cores(start.machine, end.machine),
        bench_cores=(end.own_cpu - start.own_cpu) / seconds,
    )
    progress(f"{spec.label}: {phase.per_second:,.0f} {unit}/s, p50 {phase.p50_ms:.2f} ms")
    return phase


@dataclass(frozen=True)
class LargeBatch:
    items: int
    chunk: int
    concurrency: int
    figures: dict[str, float]
    rss_tenth_kib: int | None  # the service's VmRSS with 10% of the items accepted
    rss_all_kib: int | None  # ... with all of them accepted (before the seal)
    rss_listed_kib: int | None  # ... after every run was listed
    hwm_kib: int | None  # its peak RSS (VmHWM) at the end

    @property
    def rss_ratio(self) -> float | None:
        if self.rss_tenth_kib is None or self.rss_all_kib is None:
            return None
        return self.rss_all_kib / self.rss_tenth_kib

    @property
    def items_per_second(self) -> float:
        seconds = self.figures["accept_seconds"]
        return self.figures["accepted_in_stream"] / seconds if seconds > 0 else 0.0

    @property
    def listed_per_second(self) -> float:
        seconds = self.figures["list_seconds"]
        return self.figures["listed"] / seconds if seconds > 0 else 0.0


@dataclass(frozen=True)
class BenchResult:
    seconds: float
    warmup: float
    concurrency: int
    write_concurrency: int
    chunk: int
    runs: int
    cpus: int
    durability: dict[str, str]
    service_pid: int | None
    floor_read: Phase
    get_run: Phase
    bare_get_run: Phase  # the same read in a bare grpc.aio servicer (`bare.py`)
    get_run_2: Phase | None  # routed GetRun / CreateRuns on a run store of 2 processes
    create_runs_2: Phase | None
    floor_insert_runs: Phase
    floor_copy_runs: Phase
    create_runs: Phase
    floor_insert_items: Phase
    floor_copy_items: Phase
    accept: Phase
    batch: LargeBatch

    def phases(self) -> tuple[Phase, ...]:
        two = tuple(p for p in (self.get_run_2, self.create_runs_2) if p is not None)
        return (
            self.get_run, self.bare_get_run, self.floor_read,
            self.create_runs, self.floor_insert_runs, self.floor_copy_runs,
            self.accept, self.floor_insert_items, self.floor_copy_items, *two,
        )  # fmt: skip

    @property
    def get_run_share(self) -> float:
        """Routed GetRun/s over the bare servicer's (spec §7: at least 0.8)."""
        return self.get_run.per_second / self.bare_get_run.per_second

    @property
    def get_run_overhead(self) -> float:
        """Raw reads/s over routed GetRun/s (printed; the target is `get_run_share`)."""
        return self.floor_read.per_second / self.get_run.per_second

    @property
    def create_runs_share(self) -> float:
        """CreateRuns rows/s over the raw unnest insert's (target: at least 50%)."""
        return self.create_runs.per_second / self.floor_insert_runs.per_second

    @property
    def accept_share(self) -> float:
        return self.accept.per_second / self.floor_insert_items.per_second

    def report(self) -> str:
        def verdict(ok: bool) -> str:
            return "meets" if ok else "MISSES"

        lines = [
            f"run store vs raw asyncpg: {self.seconds:g}s measured per phase after"
            f" {self.warmup:g}s warm-up, {self.cpus} CPUs; reads: {self.concurrency} callers over"
            f" {self.runs:,} runs; writes: {self.write_concurrency} in flight, {self.chunk:,} rows"
            " a call; every client in its own load-generator process",
            "durability (run-ops writer): "
            + settings(self.durability)
            + " -- commits do not wait for a WAL flush; the writes' figures (and the floors')"
            " are higher than on a durable server",
            "",
            f"{'phase':<40}{'rate':>10} {'unit':<7}{'p50 ms':>8}{'p99 ms':>8}{'calls':>9}"
            f"{'errors':>7}   cores: {'service':>7}{'loadgen':>8}{'writer':>7}{'replica':>8}"
            f"{'rest':>6}",
        ]
        for phase in self.phases():
            lines.append(
                f"{phase.name:<40}{phase.per_second:>10,.0f} {phase.unit + '/s':<7}"
                f"{phase.p50_ms:>8.2f}{phase.p99_ms:>8.2f}{phase.calls:>9,}"
                f"{sum(phase.errors.values()):>7}          {cores(phase.service_cores):>7}"
                f"{cores(phase.loadgen_cores):>8}{cores(phase.writer_cores):>7}"
                f"{cores(phase.replica_cores):>8}{cores(phase.rest_cores):>6}"
            )
        copy_runs = self.create_runs.per_second / self.floor_copy_runs.per_second
        copy_items = self.accept.per_second / self.floor_copy_items.per_second
        lines += [
            "",
            f"GetRun: {self.get_run_share:.0%} of the bare servicer's"
            f" ({verdict(self.get_run_share >= 0.8)} the target >= 80%); raw / routed"
            f" {self.get_run_overhead:.2f}x",
            f"CreateRuns: {self.create_runs_share:.0%} of the unnest floor"
            f" ({verdict(self.create_runs_share >= 0.5)} the target >= 50%), {copy_runs:.0%} of"
            " COPY",
            f"AcceptBatchItems: {self.accept_share:.0%} of the unnest floor"
            f" ({verdict(self.accept_share >= 0.5)} the target >= 50%), {copy_items:.0%} of COPY",
        ]
        b, f = self.batch, self.batch.figures

        def mib(kib: int | None) -> str:
            return "-" if kib is None else f"{kib / 1024:.1f} MiB"

        ratio = b.rss_ratio
        flat = (
            "-" if ratio is None else f"{ratio:.3f}x, {verdict(abs(ratio - 1) <= 0.10)} within 10%"
        )
        lines += [
            "",
            f"{b.items:,}-item batch (gRPC, chunks of {b.chunk:,}, {b.concurrency} in flight, a"
            f" hole every {HOLE_EVERY}, {DUPLICATES} indexes of each chunk resent):",
            f"  accepted {f['accepted_in_stream']:,.0f} items in {f['accept_seconds']:.1f}s"
            f" ({b.items_per_second:,.0f} items/s); {f['duplicates']:,.0f} duplicates reported",
            f"  missing ranges: midway {f['missing_mid_ranges']:.0f} in"
            f" {f['missing_mid_ms']:.0f} ms, at the end {f['missing_end_ranges']:.0f} (the"
            f" holes) in {f['missing_end_ms']:.0f} ms, after resending them none"
            f" ({f['missing_after_refill_ms']:.0f} ms); sealed in {f['seal_ms']:.0f} ms",
            f"  listed {f['listed']:,.0f} runs (each index once) in {f['pages']:.0f} pages of"
            f" {PAGE_SIZE:,} in {f['list_seconds']:.1f}s ({b.listed_per_second:,.0f} runs/s)",
            f"  service RSS: at {b.items // 10:,} items {mib(b.rss_tenth_kib)}, at {b.items:,}"
            f" {mib(b.rss_all_kib)} ({flat}), after listing {mib(b.rss_listed_kib)}, peak"
            f" {mib(b.hwm_kib)}",
            "",
            f"service: pid {self.service_pid} (python -m services.runstore, split on, pools of"
            f" <= {max(self.concurrency, self.write_concurrency)} per database); cores = CPU over"
            " the window / its length: the service, the load generator, the run-ops writer's and"
            " replica's postgres processes, the rest of the machine",
        ]
        return "\n".join(lines)


@dataclass(frozen=True)
class Service:
    target: str
    token: str
    pid: int | None


async def _seed(client: RunStoreClient, env: str, runs: int) -> list[str]:
    bodies: list[str] = []
    for first in range(0, runs, 1000):
        inputs = [
            rs.RunInput(
                environment_id=env,
                organization_id=ORG,
                project_id=PROJECT,
                task_identifier=TASK,
                payload=payload(i),
                payload_type=PAYLOAD_TYPE,
                default_queue=QUEUE,
                default_max_attempts=MAX_ATTEMPTS,
            )
            for i in range(first, min(first + 1000, runs))
        ]
        bodies += [result.run.id for result in await client.create_runs(inputs)]
    return bodies


async def measure(
    stack: LocalStack,
    service: Service,
    *,
    seconds: float,
    concurrency: int,
    write_concurrency: int,
    chunk: int,
    runs: int,
    batch_items: int,
    batch_chunk: int,
    progress: Progress,
    service_2: Callable[[], contextlib.AbstractAsyncContextManager[Service]] | None = None,
) -> BenchResult:
    """The phases on `service`; routed GetRun and CreateRuns again on the run store
    `service_2()` starts (RUNOPS_PROCESSES=2 on the same stack) when given."""
    db = stack.runops_db
    warmup = loadgen.warmup_for(seconds)
    env = "env_" + mint_body(Residency.NEW)
    procs = Processes(
        service.pid,
        await proc.local_postmaster(db.writer_dsn),
        await proc.local_postmaster(db.replica_dsn),
    )
    async with RunStoreClient(service.target, token=service.token) as client:
        progress(f"seeding {runs:,} runs and 3 batches through the service")
        bodies = await _seed(client, env, runs)
        batches = []
        for _ in range(3):
            created = await client.create_batch(
                rs.CreateBatchRequest(
                    environment_id=env,
                    organization_id=ORG,
                    project_id=PROJECT,
                    run_count=BIG_RUN_COUNT,
                )
            )
            batches.append(created.batch.id)
    await db.wait_for_replica()
    settings = await durability(db.writer_dsn)

    def spec(kind: Kind, label: str, **fields: Any) -> LoadSpec:
        return LoadSpec(
            kind=kind, label=label, seconds=seconds, warmup=warmup, environment_id=env, **fields
        )

    grpc_at = {"target": service.target, "token": service.token}
    read = {"concurrency": concurrency, "run_ids": tuple(bodies)}
    write = {"concurrency": write_concurrency, "chunk": chunk}
    floor_read = await _phase(
        spec("pg_get_run", "raw PK read (asyncpg, replica)", dsn=db.replica_dsn, **read),
        "calls", procs, progress,
    )  # fmt: skip
    get_run = await _phase(
        spec("get_run", "GetRun (gRPC, routed, replica)", **grpc_at, **read),
        "calls", procs, progress,
    )  # fmt: skip
    pool = min(200, max(concurrency, write_concurrency))  # the service's pools' size
    async with bare.get_run_server(db.replica_dsn, pool) as bare_target:
        with profile.watching("bare servicer (bench process)", os.getpid()):
            bare_get_run = await _phase(
                spec("get_run", "bare servicer GetRun (grpc.aio, no interceptor)",
                     target=bare_target, token=service.token, **read),
                "calls", procs, progress,
            )  # fmt: skip
    # Issue 16's batched read (GetRuns, many runs by id in one call) goes here: its rows/s beside
    # raw asyncpg's read of the same ids (target >= 0.5), as a phase pair like the two above.
    floor_insert_runs = await _phase(
        spec("pg_insert_runs", "raw unnest INSERT runs", dsn=db.writer_dsn, **write),
        "runs", procs, progress,
    )  # fmt: skip
    floor_copy_runs = await _phase(
        spec("pg_copy_runs", "raw COPY runs", dsn=db.writer_dsn, **write),
        "runs", procs, progress,
    )  # fmt: skip
    create_runs = await _phase(
        spec("create_runs", "CreateRuns (gRPC)", **grpc_at, **write), "runs", procs, progress
    )
    get_run_2 = create_runs_2 = None
    if service_2 is not None:
        async with service_2() as two:
            # Several connections, so both processes get calls (one per process would do if
            # the kernel spread them evenly; it hashes them).
            at_2 = {"target": two.target, "token": two.token, "channels": TWO_PROCESS_CHANNELS}
            procs_2 = Processes(two.pid, procs.writer, procs.replica)
            get_run_2 = await _phase(
                spec("get_run", "GetRun (gRPC, routed, replica), 2 processes", **at_2, **read),
                "calls", procs_2, progress,
            )  # fmt: skip
            create_runs_2 = await _phase(
                spec("create_runs", "CreateRuns (gRPC), 2 processes", **at_2, **write),
                "runs", procs_2, progress,
            )  # fmt: skip
    floor_insert_items = await _phase(
        spec(
            "pg_insert_items", "raw unnest INSERT items + runs", dsn=db.writer_dsn,
            batch_id=batches[0], **write,
        ),
        "items", procs, progress,
    )  # fmt: skip
    floor_copy_items = await _phase(
        spec(
            "pg_copy_items", "raw COPY items + runs", dsn=db.writer_dsn, batch_id=batches[1],
            **write,
        ),
        "items", procs, progress,
    )  # fmt: skip
    accept = await _phase(
        spec("accept", "AcceptBatchItems (gRPC)", batch_id=batches[2], **grpc_at, **write),
        "items", procs, progress,
    )  # fmt: skip

    progress(
        f"{batch_items:,}-item batch: chunks of {batch_chunk:,}, {write_concurrency} in flight"
    )
    async with profile.phase(f"{batch_items:,}-item batch"):
        result, marks = await _in_subprocess(
            spec(
                "large_batch", f"{batch_items:,}-item batch", concurrency=write_concurrency,
                chunk=batch_chunk, items=batch_items, **grpc_at,
            ),
            procs,
        )  # fmt: skip
    batch = LargeBatch(
        items=batch_items,
        chunk=batch_chunk,
        concurrency=write_concurrency,
        figures=result.figures,
        rss_tenth_kib=marks["tenth"].rss_kib,
        rss_all_kib=marks["all"].rss_kib,
        rss_listed_kib=marks["listed"].rss_kib,
        hwm_kib=marks["listed"].hwm_kib,
    )
    return BenchResult(
        seconds=seconds,
        warmup=warmup,
        concurrency=concurrency,
        write_concurrency=write_concurrency,
        chunk=chunk,
        runs=runs,
        cpus=os.cpu_count() or 1,
        durability=settings,
        service_pid=service.pid,
        floor_read=floor_read,
        get_run=get_run,
        bare_get_run=bare_get_run,
        get_run_2=get_run_2,
        create_runs_2=create_runs_2,
        floor_insert_runs=floor_insert_runs,
        floor_copy_runs=floor_copy_runs,
        create_runs=create_runs,
        floor_insert_items=floor_insert_items,
        floor_copy_items=floor_copy_items,
        accept=accept,
        batch=batch,
    )


async def run(
    stack: LocalStack,
    *,
    seconds: float = 10.0,
    concurrency: int = 16,
    write_concurrency: int = 2,
    chunk: int = 1000,
    runs: int = 1000,
    batch_items: int = 100_000,
    batch_chunk: int = 5000,
    service: Service | None = None,
    progress: Progress | None = None,
) -> BenchResult:
    """Start the run store as a process on `stack` (unless `service` is given), then measure;
    a second one of 2 processes (RUNOPS_PROCESSES) for its phases."""
    say: Progress = progress or (lambda _line: None)
    options: dict[str, Any] = {
        "seconds": seconds,
        "concurrency": concurrency,
        "write_concurrency": write_concurrency,
        "chunk": chunk,
        "runs": runs,
        "batch_items": batch_items,
        "batch_chunk": batch_chunk,
        "progress": say,
    }
    if service is not None:
        return await measure(stack, service, **options)
    token = secrets.token_urlsafe(16)
    # The service's pools get as many connections as the floors' (the larger of C and W).
    pool = min(200, max(concurrency, write_concurrency))
    logs = Path(tempfile.mkdtemp(prefix="runstore-bench-"))

    def two_processes() -> contextlib.AbstractAsyncContextManager[Service]:
        return _service_process(stack, token, pool, logs, say, processes=2)

    async with _service_process(stack, token, pool, logs, say, processes=1) as one:
        return await measure(stack, one, service_2=two_processes, **options)


@contextlib.asynccontextmanager
async def _service_process(
    stack: LocalStack, token: str, pool: int, logs: Path, say: Progress, *, processes: int
) -> AsyncIterator[Service]:
    """`python -m services.runstore` on `stack` with RUNOPS_PROCESSES=`processes` (each with
    pools of `pool` per database), recorded by `--profile` while it runs."""
    from runops.localstack.ports import free_port
    from runops.localstack.services import ServiceProcess

    env = {
        **stack.service_env(),
        "RUNOPS_INTERNAL_TOKEN": token,
        "RUNOPS_LOG_FORMAT": "console",
        "RUNOPS_CONTROLPLANE_DB_POOL_MAX_SIZE": str(pool),
        "RUNOPS_RUNOPS_DB_POOL_MAX_SIZE": str(pool),
        "RUNOPS_PROCESSES": str(processes),
    }
    label = "runstore" if processes == 1 else f"runstore-{processes}-processes"
    process = ServiceProcess("runstore", free_port(), -1, logs / f"{label}.log", env=env)
    async with process:
        assert process.proc is not None
        say(f"run store ({processes} process{'es' if processes > 1 else ''}) serving on {process.target} (pid"
            f" {process.proc.pid}, log {logs})")  # fmt: skip
        with profile.watching(label, process.proc.pid, children=True):
            yield Service(process.target, token, process.proc.pid)


def main(argv: list[str] | None = None) -> None:
    parser = program.parser(MODULE, __doc__)
    add = parser.add_argument
    add("--seconds", type=float, default=10.0, help="measured seconds per phase (default 10)")
    add("--concurrency", type=int, default=16, help="concurrent readers (default 16)")
    add("--write-concurrency", type=int, default=2, help="write calls in flight (default 2)")
    add("--chunk", type=int, default=1000, help="rows a write call (default 1000)")
    add("--runs", type=int, default=1000, help="seeded runs the reads go over (default 1000)")
    add("--batch-items", type=int, default=100_000, help="the large batch (default 100000)")
    add("--batch-chunk", type=int, default=5000, help="its chunk size (default 5000)")
    add("--target", help="an already running run store (default: start one as a process)")
    add("--token", default="", help="its internal token (with --target)")
    add("--service-pid", type=int, help="its pid on this machine, for CPU and RSS (--target)")
    for name in ("controlplane-db", "runops-db"):
        for role in ("writer", "replica"):
            add(f"--{name}-{role}", help=f"use this {name.replace('-', ' ')} {role} (a DSN)")
    args = parser.parse_args(argv)
    if args.loadgen_worker:
        loadgen.worker(_work)
        return
    if min(args.seconds, args.concurrency, args.write_concurrency, args.chunk, args.runs) <= 0:
        parser.error("--seconds, --concurrency, --write-concurrency, --chunk, --runs must be > 0")
    if not 0 < args.chunk <= 10_000 or not 0 < args.batch_chunk <= 10_000:
        parser.error("--chunk and --batch-chunk must be 1 to 10000 (the service's limit)")
    if not 100 <= args.batch_items <= BIG_RUN_COUNT:
        parser.error(f"--batch-items must be 100 to {BIG_RUN_COUNT}")
    from runops.localstack import ExternalServers

    external = ExternalServers(
        controlplane_db_writer=args.controlplane_db_writer,
        controlplane_db_replica=args.controlplane_db_replica,
        runops_db_writer=args.runops_db_writer,
        runops_db_replica=args.runops_db_replica,
    )
    service = None if args.target is None else Service(args.target, args.token, args.service_pid)
    sizes = {name: getattr(args, name) for name in SIZES}
    result = program.on_local_stack(
        lambda stack, say: run(stack, **sizes, service=service, progress=say), external=external
    )
    print(result.report(), flush=True)


if __name__ == "__main__":
    main()
