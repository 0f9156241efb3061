"""Batch ingest (spec §7, issue 10): small items end to end beside the raw bulk-insert floors,
large items through a slow object store at concurrency 1 and 10 with the ingest process's RSS,
and a 100,000-item batch in one stream with its RSS at 10% and at the end.

    python -m runops.bench.ingest [--small N] [--large-c1 N] [--large-c10 N] [--big N]
                                  [--repetitions R]

Every service runs as its own OS process (control plane, run store, ingest: `python -m
services.<name>`); the client side of every phase (the ingest client library
`runops.ingest.client.IngestClient`, or a floor's asyncpg pool) runs in a fresh load-generator
subprocess, so it takes no CPU from a server's event loop. Phases, in order:

  large, c=1        N items of 256 KiB (all offloaded: RUNOPS_OFFLOAD_THRESHOLD_BYTES = 256 KiB)
                    one item a chunk, through an ingest process with RUNOPS_INGEST_CONCURRENCY=1
                    whose object store is moto behind runops.localstack.delay_proxy (50 ms each
                    way); RSS: idle (after a warm-up batch of 2 x concurrency items) and peak
                    (VmHWM, reset to the idle RSS before the measured batch) of that process
  large, c=10       the same on a fresh ingest process with concurrency 10
                    -> speedup = items/s at 10 / items/s at 1 (target >= 8x); peak <= idle +
                       2 x concurrency x RUNOPS_MAX_CHUNK_BYTES (512 KiB here) + 8 MiB
  floor unnest      N batch_items + runs rows of <= 1 KiB, asyncpg, unnest INSERT ... ON CONFLICT,
                    1000 rows a statement, 2 in flight, on the run-ops writer
  floor COPY        the same rows with copy_records_to_table (both tables, one transaction)
  small items       IngestClient.run_batch of N items (~256 B payloads, chunks of 1000) through
                    the c=10 ingest process -> run store -> Postgres, timed from CreateBatch to
                    the sealed answer; the runs are counted in Postgres afterwards
                    -> items/s / floor (target >= 50% of unnest; aim 50% of COPY)
  small, 2 procs    the same through a fresh c=10 ingest of RUNOPS_PROCESSES=2
                    (the floors and both small-items figures: R repetitions, the median printed
                    with its spread)
  big batch         one 100,000-item batch in one stream on a fresh c=10 ingest process (after a
                    1,000-item warm-up); its RSS when 10,000 items were sent and when the stream
                    sealed (target within 10%)

See shared/runops/bench/README.md and docs/benchmarks.md for the figures.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg

from runops.bench import floors, profile, program
from runops.bench.loadgen import in_subprocess, worker_main
from runops.bench.proc import cpu_seconds, reset_peak, status_kib
from runops.bench.report import REPETITIONS, Repeated, Row, durability, settings, table
from runops.bench.services import Suite, pid_of, running_suite

if TYPE_CHECKING:
    from runops.localstack import LocalStack
    from runops.localstack.services import ServiceProcess

Progress = Callable[[str], None]
MODULE = "runops.bench.ingest"
KIB, MIB = 1024, 1024 * 1024
SMALL_PAYLOAD = 256
LARGE_PAYLOAD = 256 * KIB
# The service's declared largest chunk message: one 256 KiB item (and its envelope) fits, two do
# not, so the client library's chunker sends one item a message.
MAX_CHUNK_BYTES = 512 * KIB
DELAY_SECONDS = 0.05
RSS_SLACK_BYTES = 8 * MIB  # spec §7's peak RSS allowance beyond the chunks in flight
RSS_MARK_FRACTION = 10  # the big batch's first RSS sample: at a tenth of its items
BENCHMARK = "ingest"


# -- the load generator ------------------------------------------------------------------------


async def _ingest_work(spec: dict[str, Any]) -> dict[str, Any]:
    from runops.ingest.client import IngestClient
    from runops.ingest.v1 import ingest_pb2 as ing

    n, size = int(spec["items"]), int(spec["payload_bytes"])
    pid, mark = int(spec["rss_pid"]), int(spec.get("rss_mark", 0))

    def items() -> Any:
        for i in range(n):
            yield ing.BatchItem(
                index=i, task=floors.TASK, payload=floors.payload(i, size),
                payload_type=floors.PAYLOAD_TYPE,
            )  # fmt: skip

    sent = 0
    rss_at_mark: int | None = None

    def progress(count: int) -> None:
        nonlocal sent, rss_at_mark
        sent += count
        if mark and rss_at_mark is None and sent >= mark:
            rss_at_mark = status_kib(pid, "VmRSS")

    async with IngestClient(
        spec["target"], spec["api_key"], max_items=int(spec["max_items"]),
        max_bytes=int(spec["max_bytes"]),
    ) as client:  # fmt: skip
        began = time.perf_counter()
        result = await client.run_batch(n, items, progress=progress)
        seconds = time.perf_counter() - began
    return {
        "seconds": seconds,
        "batch_id": result.batch_id,
        "sealed": result.response.sealed,
        "accepted": result.response.accepted_count,
        "rss_mark_kib": rss_at_mark,
        "rss_end_kib": status_kib(pid, "VmRSS"),
    }


# -- the bench side ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Large:
    concurrency: int
    items: int
    seconds: float
    idle_kib: int
    peak_kib: int

    @property
    def per_second(self) -> float:
        return self.items / self.seconds

    @property
    def allowance_kib(self) -> int:
        """Spec §7: peak <= idle + 2 x concurrency x the largest chunk + 8 MiB."""
        return 2 * self.concurrency * MAX_CHUNK_BYTES // KIB + RSS_SLACK_BYTES // KIB


@dataclass(frozen=True)
class IngestResult:
    cpus: int
    durability: dict[str, str]
    small_items: int
    # Each small-items figure once per repetition (spec §7: a phase shorter than 10 s is
    # repeated, the median printed with its spread).
    small_seconds: tuple[float, ...]
    small_ingest_cores: float  # CPU of the ingest process over the last small-items batch
    small_runstore_cores: float  # ... of the run store process
    small_2_seconds: tuple[float, ...]  # the same through an ingest of 2 processes
    floor_unnest_seconds: tuple[float, ...]
    floor_copy_seconds: tuple[float, ...]
    large_c1: Large
    large_c10: Large
    big_items: int
    big_seconds: float
    rss_at_mark_kib: int
    rss_at_end_kib: int

    def _rates(self, seconds: tuple[float, ...]) -> Repeated:
        return Repeated(tuple(self.small_items / s for s in seconds))

    @property
    def small(self) -> Repeated:
        return self._rates(self.small_seconds)

    @property
    def small_2(self) -> Repeated:
        return self._rates(self.small_2_seconds)

    @property
    def unnest(self) -> Repeated:
        return self._rates(self.floor_unnest_seconds)

    @property
    def copy(self) -> Repeated:
        return self._rates(self.floor_copy_seconds)

    @property
    def small_rate(self) -> float:
        return self.small.median

    @property
    def unnest_rate(self) -> float:
        return self.unnest.median

    @property
    def copy_rate(self) -> float:
        return self.copy.median

    @property
    def speedup(self) -> float:
        return self.large_c10.per_second / self.large_c1.per_second

    @property
    def rss_growth(self) -> float:
        return self.rss_at_end_kib / self.rss_at_mark_kib

    def rows(self) -> list[Row]:
        b = BENCHMARK
        mark = self.big_items // RSS_MARK_FRACTION
        rows = [
            Row.repeated(
                b, "small items end to end", self.small, "items/s", self.unnest,
                "unnest INSERT", target=">= 0.5 of unnest", at_least=0.5,
            ),
            Row.repeated(
                b, "small items end to end", self.small, "items/s", self.copy,
                "COPY", target="aim 0.5 of COPY", at_least=0.5,
            ),
            Row.repeated(
                b, "small items end to end, 2 processes", self.small_2, "items/s", self.unnest,
                "unnest INSERT", target=">= 0.5 of unnest", at_least=0.5,
            ),
            Row(
                b, "256 KiB offloaded, c=10 vs c=1", self.large_c10.per_second, "items/s",
                self.large_c1.per_second, "c=1", self.speedup, ">= 8x", self.speedup >= 8,
            ),
        ]  # fmt: skip
        for large in (self.large_c10, self.large_c1):
            bound = (large.idle_kib + large.allowance_kib) / KIB
            rows.append(
                Row(
                    b, f"peak RSS, c={large.concurrency}", large.peak_kib / KIB, "MiB",
                    large.idle_kib / KIB, "idle RSS", large.peak_kib / large.idle_kib,
                    f"<= idle + 2 x {large.concurrency} x chunk + 8 MiB = {bound:.0f} MiB",
                    large.peak_kib <= large.idle_kib + large.allowance_kib,
                )
            )  # fmt: skip
        rows.append(
            Row(
                b, f"RSS at {self.big_items:,} items", self.rss_at_end_kib / KIB, "MiB",
                self.rss_at_mark_kib / KIB, f"at {mark:,}", self.rss_growth, "within 10%",
                abs(self.rss_growth - 1) <= 0.10,
            )
        )  # fmt: skip
        return rows

    def report(self) -> str:
        lines = [
            f"batch ingest, {self.cpus} CPUs, Postgres: " + settings(self.durability),
            f"  small items, {self.small_items:,} a batch, items/s per repetition:"
            f" {_each(self.small)} (2 ingest processes: {_each(self.small_2)}); floors (same"
            f" rows, {floors.CHUNK} a statement, {floors.IN_FLIGHT} in flight): unnest"
            f" {_each(self.unnest)}, COPY {_each(self.copy)}; CPU over the last batch (cores):"
            f" ingest {self.small_ingest_cores:.2f}, run store {self.small_runstore_cores:.2f}",
        ]
        for large in (self.large_c1, self.large_c10):
            lines.append(
                f"  256 KiB items, c={large.concurrency}: {large.items} in {large.seconds:.2f}s ="
                f" {large.per_second:,.1f}/s; RSS idle {large.idle_kib / KIB:.1f} MiB, peak"
                f" {large.peak_kib / KIB:.1f} MiB (allowance {large.allowance_kib // KIB} MiB)"
            )
        lines.append(
            f"  {self.big_items:,}-item batch in one stream: {self.big_seconds:.1f}s"
            f" ({self.big_items / self.big_seconds:,.0f}/s); RSS at {self.big_items // 10:,}"
            f" items {self.rss_at_mark_kib / KIB:.1f} MiB, at the end"
            f" {self.rss_at_end_kib / KIB:.1f} MiB ({self.rss_growth - 1:+.1%})"
        )
        return "\n".join(lines)


def _each(figure: Repeated) -> str:
    return ", ".join(f"{v:,.0f}" for v in figure.values)


async def _count_runs(dsn: str, batch_friendly_id: str, *, offloaded: bool = False) -> int:
    batch_id = batch_friendly_id.removeprefix("batch_")
    conn = await asyncpg.connect(dsn)
    try:
        sql = "SELECT count(*) FROM runs WHERE batch_id = $1"
        if offloaded:
            sql += " AND payload_type = 'application/store'"
        return int(await conn.fetchval(sql, batch_id))
    finally:
        await conn.close()


def _ingest_spec(target: str, suite: Suite, pid: int, items: int, size: int) -> dict[str, Any]:
    large = size >= LARGE_PAYLOAD
    return {
        "target": target,
        "api_key": suite.api_key,
        "items": items,
        "payload_bytes": size,
        "max_items": 1 if large else 1000,
        "max_bytes": MAX_CHUNK_BYTES if large else 4 * MIB,
        "rss_pid": pid,
    }


async def _batch(
    suite: Suite, target: str, pid: int, items: int, size: int, *, offloaded: bool = False,
    rss_mark: int = 0,
) -> dict[str, Any]:  # fmt: skip
    spec = _ingest_spec(target, suite, pid, items, size) | {"rss_mark": rss_mark}
    result = await in_subprocess(MODULE, spec)
    if not result["sealed"] or result["accepted"] != items:
        raise RuntimeError(f"batch of {items} not sealed whole: {result}")
    runs = await _count_runs(suite.stack.runops_db.admin_writer_dsn, result["batch_id"],
                             offloaded=offloaded)  # fmt: skip
    if runs != items:
        raise RuntimeError(f"{result['batch_id']}: {runs} runs in Postgres, expected {items}")
    return result


async def _large(
    suite: Suite, process: ServiceProcess, concurrency: int, items: int, say: Progress
) -> Large:
    """On a fresh ingest process: a warm-up batch of 2 x concurrency items (connections to the
    control plane, run store, Redis and as many to the store as the concurrency uses are open),
    then its idle RSS; the peak (VmHWM) is reset to it, and read again after the measured
    batch."""
    pid, target = pid_of(process), process.target
    await _batch(suite, target, pid, 2 * concurrency, LARGE_PAYLOAD, offloaded=True)
    await asyncio.sleep(0.5)
    idle = status_kib(pid, "VmRSS") or 0
    if not reset_peak(pid):
        raise RuntimeError(f"cannot reset the peak RSS of pid {pid} (/proc/{pid}/clear_refs)")
    async with profile.phase(f"256 KiB items c={concurrency}"):
        result = await _batch(suite, target, pid, items, LARGE_PAYLOAD, offloaded=True)
    large = Large(concurrency, items, result["seconds"], idle, status_kib(pid, "VmHWM") or 0)
    say(
        f"256 KiB items, c={concurrency}: {large.per_second:,.1f}/s, RSS idle"
        f" {idle / KIB:.1f} MiB, peak {large.peak_kib / KIB:.1f} MiB"
    )
    return large


def _ingest_env(proxy_url: str, concurrency: int) -> dict[str, str]:
    return {
        "RUNOPS_INGEST_CONCURRENCY": str(concurrency),
        "RUNOPS_OFFLOAD_THRESHOLD_BYTES": str(LARGE_PAYLOAD),
        "RUNOPS_MAX_CHUNK_BYTES": str(MAX_CHUNK_BYTES),
        "RUNOPS_S3_ENDPOINT_URL": proxy_url,
        # Many batches back to back: the token bucket is not what is measured.
        "RUNOPS_RATE_LIMIT_ENABLED": "false",
    }


async def _floor(suite: Suite, method: floors.Method, rows: int) -> float:
    """Seconds for `rows` batch items (and their runs) of a batch of their own."""
    dsn = suite.stack.runops_db.writer_dsn
    batch_id = await floors.create_batch(dsn, suite.environment_id, rows)
    async with profile.phase(f"floor {method}"):
        return await floors.measure(
            dsn, method=method, rows=rows, payload_bytes=SMALL_PAYLOAD,
            environment_id=suite.environment_id, batch_id=batch_id,
        )  # fmt: skip


async def measure(
    suite: Suite, *, small: int, large_c1: int, large_c10: int, big: int, repetitions: int,
    progress: Progress,
) -> IngestResult:  # fmt: skip
    from urllib.parse import urlsplit

    from runops.localstack.delay_proxy import DelayProxy

    say = progress
    upstream = urlsplit(suite.stack.s3_endpoint_url)
    assert upstream.hostname is not None
    assert upstream.port is not None
    async with DelayProxy(upstream.hostname, upstream.port, delay=DELAY_SECONDS) as proxy:
        proxy_url = f"http://127.0.0.1:{proxy.port}"
        say(f"object store: moto behind a {DELAY_SECONDS * 1000:.0f} ms delay proxy ({proxy_url})")
        async with suite.service("ingest", "ingest-c1", **_ingest_env(proxy_url, 1)) as process:
            c1 = await _large(suite, process, 1, large_c1, say)
        async with suite.service("ingest", "ingest-c10", **_ingest_env(proxy_url, 10)) as process:
            c10 = await _large(suite, process, 10, large_c10, say)
            unnest, copy, small_seconds = [], [], []
            for _ in range(repetitions):
                unnest.append(await _floor(suite, "unnest", small))
                say(f"floor unnest INSERT: {small / unnest[-1]:,.0f} rows/s")
                copy.append(await _floor(suite, "copy", small))
                say(f"floor COPY: {small / copy[-1]:,.0f} rows/s")
            pid, target = pid_of(process), process.target
            store = pid_of(suite.base[1])
            for _ in range(repetitions):
                before = (cpu_seconds(pid), cpu_seconds(store))
                async with profile.phase("small items end to end"):
                    small_run = await _batch(suite, target, pid, small, SMALL_PAYLOAD)
                small_seconds.append(small_run["seconds"])
                # CPU of the two services over the batch (the run count check after it
                # included).
                cores = tuple(
                    (cpu_seconds(p) - b) / small_run["seconds"]
                    for p, b in zip((pid, store), before, strict=True)
                )
                say(
                    f"small items end to end: {small / small_run['seconds']:,.0f} items/s; CPU"
                    f" (cores) ingest {cores[0]:.2f}, run store {cores[1]:.2f}"
                )
        two = _ingest_env(proxy_url, 10) | {"RUNOPS_PROCESSES": "2"}
        small_2_seconds = []
        async with suite.service("ingest", "ingest-2-processes", **two) as process:
            pid, target = pid_of(process), process.target
            await _batch(suite, target, pid, min(small, 1000), SMALL_PAYLOAD)  # warm-up
            for _ in range(repetitions):
                async with profile.phase("small items end to end, 2 processes"):
                    run_2 = await _batch(suite, target, pid, small, SMALL_PAYLOAD)
                small_2_seconds.append(run_2["seconds"])
                say(f"small items, 2 ingest processes: {small / run_2['seconds']:,.0f} items/s")
        # A fresh process for the one-stream batch: its RSS is the stream's, not what the
        # phases before left in the allocator.
        async with suite.service("ingest", "ingest-big", **_ingest_env(proxy_url, 10)) as process:
            pid, target = pid_of(process), process.target
            await _batch(suite, target, pid, 1000, SMALL_PAYLOAD)
            say(f"{big:,}-item batch in one stream")
            mark = big // RSS_MARK_FRACTION
            async with profile.phase(f"{big:,}-item stream"):
                big_run = await _batch(suite, target, pid, big, SMALL_PAYLOAD, rss_mark=mark)
            say(f"{big:,} items in {big_run['seconds']:.1f}s")
    return IngestResult(
        cpus=os.cpu_count() or 1,
        durability=await durability(suite.stack.runops_db.admin_writer_dsn),
        small_items=small,
        small_seconds=tuple(small_seconds),
        small_ingest_cores=cores[0],
        small_runstore_cores=cores[1],
        small_2_seconds=tuple(small_2_seconds),
        floor_unnest_seconds=tuple(unnest),
        floor_copy_seconds=tuple(copy),
        large_c1=c1,
        large_c10=c10,
        big_items=big,
        big_seconds=big_run["seconds"],
        rss_at_mark_kib=big_run["rss_mark_kib"] or 0,
        rss_at_end_kib=big_run["rss_end_kib"] or 0,
    )


# Sizes: the defaults take about 4 minutes on 2 cores (stack start-up included). The 256 KiB
# phases run >= 10 s each (about 4 items/s at c=1 and 40 at c=10 behind the 50 ms proxy), the
# small-items batch and its floors (a few seconds) are repeated (spec §7).
DEFAULTS = {
    "small": 20_000, "large_c1": 45, "large_c10": 450, "big": 100_000,
    "repetitions": REPETITIONS,
}  # fmt: skip


async def run(
    stack: LocalStack,
    *,
    small: int = DEFAULTS["small"],
    large_c1: int = DEFAULTS["large_c1"],
    large_c10: int = DEFAULTS["large_c10"],
    big: int = DEFAULTS["big"],
    repetitions: int = DEFAULTS["repetitions"],
    progress: Progress | None = None,
) -> IngestResult:
    """Start a control plane and a run store as processes on `stack`, seed an environment, then
    the ingest processes each phase needs, and measure."""
    say: Progress = progress or (lambda _line: None)
    async with running_suite(stack, say) as suite:
        return await measure(
            suite, small=small, large_c1=large_c1, large_c10=large_c10, big=big,
            repetitions=repetitions, progress=say,
        )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = program.parser(MODULE, __doc__)
    add = parser.add_argument
    add("--small", type=int, default=DEFAULTS["small"], help="small items (and floor rows)")
    add("--large-c1", type=int, default=DEFAULTS["large_c1"], help="256 KiB items at c=1")
    add("--large-c10", type=int, default=DEFAULTS["large_c10"], help="256 KiB items at c=10")
    add("--big", type=int, default=DEFAULTS["big"], help="the one-stream batch (<= 100000)")
    add("--repetitions", type=int, default=REPETITIONS, help="of the small-items batch, floors")
    args = parser.parse_args(argv)
    if args.loadgen_worker:
        worker_main(_ingest_work)
        return
    if (
        min(args.small, args.large_c1, args.large_c10, args.repetitions) < 1
        or not 10 <= args.big <= 100_000
    ):
        parser.error("sizes must be >= 1, --big 10 to 100000")
    sizes = {name: getattr(args, name) for name in DEFAULTS}
    result = program.on_local_stack(lambda stack, say: run(stack, **sizes, progress=say))
    print(result.report(), "", table(result.rows()), sep="\n", flush=True)


if __name__ == "__main__":
    main()
