"""Load generators: the closed loop of timed callers every timed phase runs, and the process it
runs in (`python -m <module> --loadgen-worker`), so the client never competes with the server
for one event loop.

The protocol: the spec goes in as one JSON line on stdin; the worker prints JSON lines on stdout:
`{"event": "<mark>"}` when it reaches a mark (the driver samples counters there, then answers
"go"), and finally `{"event": "result", "result": {...}}`. Anything else it prints is passed on
to stderr.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Self, TypeVar

import asyncpg
import grpc

from runops.bench import profile
from runops.bench.proc import own_cpu_seconds
from runops.kit.errors import RunopsError

S = TypeVar("S")
Progress = Callable[[str], None]
Mark = Callable[[str], Awaitable[None]]
# One call of a closed loop: its number (0, 1, 2... across all callers) -> the rows it wrote
# (1 for a read). A wrong answer raises Mismatch.
Call = Callable[[int], Awaitable[int]]
Close = Callable[[], Awaitable[None]]
PROGRESS_EVERY_SECONDS = 2.0
# What a failed call raises besides grpc's errors: counted by class name.
FAILURES = (RunopsError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


class Mismatch(Exception):
    """An answer that is not what the call should have produced: a failed call, counted under
    `reason`."""

    def __init__(self, detail: str, reason: str = "Mismatch") -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Spec:
    """One closed-loop load-generator run (a benchmark adds its own fields); travels as JSON on
    the worker's stdin."""

    label: str
    seconds: float  # measured
    warmup: float
    concurrency: int  # callers

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Self:
        # JSON has no tuples: a spec's sequences are tuples (it is frozen and hashable).
        fields: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()
        }
        return cls(**fields)


@dataclass(frozen=True)
class LoadResult:
    rows: int  # rows written (reads: 1 a call) by calls that ended inside the measured window
    calls: int  # successful calls that ended inside the measured window
    seconds: float
    errors: dict[str, int]  # failed calls by kind, warm-up included
    p50_ms: float
    p99_ms: float
    cpu_seconds: float  # the load generator's CPU over the measured window
    pid: int
    figures: dict[str, float] = field(default_factory=dict)  # a benchmark's own


def warmup_for(seconds: float) -> float:
    """Warm-up before each measured window: a fifth of it, between 0.2 s and 2 s."""
    return min(2.0, max(0.2, seconds / 5))


def percentile(ordered: Sequence[float], q: float) -> float:
    """The `q` quantile of sorted values (0.0 for none)."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def closed_loop(
    spec: Spec, call: Call, close: Close, mark: Mark, progress: Progress, unit: str = "rows"
) -> LoadResult:
    """`spec.concurrency` callers, each calling again as soon as answered: `spec.warmup` seconds
    unmeasured, then `spec.seconds` measured, bracketed by `await mark("start")` / `await
    mark("end")` (the callers keep going meanwhile, so the servers are sampled under load).
    `close` runs at the end, whatever happens."""
    seconds = spec.seconds
    turn = itertools.count()
    latencies: list[int] = []
    rows = 0
    errors: Counter[str] = Counter()
    window = [sys.maxsize, sys.maxsize]  # perf_counter_ns bounds of the measured window
    stopped = False

    async def caller() -> None:
        nonlocal rows
        while not stopped:
            began = time.perf_counter_ns()
            try:
                written = await call(next(turn))
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                continue
            except Mismatch as exc:
                errors[exc.reason] += 1
                continue
            except FAILURES as exc:
                errors[type(exc).__name__] += 1
                continue
            ended = time.perf_counter_ns()
            if window[0] <= ended <= window[1]:
                latencies.append(ended - began)
                rows += written

    tasks = [asyncio.create_task(caller()) for _ in range(spec.concurrency)]
    try:
        await asyncio.sleep(spec.warmup)
        await mark("start")
        cpu_before = own_cpu_seconds()
        start = time.perf_counter_ns()
        window[:] = [start, start + int(seconds * 1e9)]
        while (left := (window[1] - time.perf_counter_ns()) / 1e9) > 0:
            await asyncio.sleep(min(PROGRESS_EVERY_SECONDS, left))
            elapsed = (time.perf_counter_ns() - start) / 1e9
            if elapsed < seconds - 0.01:
                progress(
                    f"{spec.label}: {rows:,} {unit} in {elapsed:.0f}s ({rows / elapsed:,.0f}/s),"
                    f" {sum(errors.values())} errors"
                )
        cpu_seconds = own_cpu_seconds() - cpu_before
        await mark("end")
        stopped = True
        await asyncio.gather(*tasks)
    finally:
        stopped = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close()
    latencies.sort()
    return LoadResult(
        rows=rows,
        calls=len(latencies),
        seconds=(window[1] - window[0]) / 1e9,
        errors=dict(errors),
        p50_ms=percentile(latencies, 0.50) / 1e6,
        p99_ms=percentile(latencies, 0.99) / 1e6,
        cpu_seconds=cpu_seconds,
        pid=os.getpid(),
    )


def own_connection_channel(target: str, token: str) -> grpc.aio.Channel:
    """A kit channel (`create_channel`'s options and interceptors) on a connection of its own:
    grpc shares one connection between channels of the same target and options, and
    SO_REUSEPORT spreads a service's connections, not its calls, over its RUNOPS_PROCESSES."""
    from runops.kit.channels import channel_options, propagating_interceptors

    return grpc.aio.insecure_channel(
        target,
        options=[*channel_options(), ("grpc.use_local_subchannel_pool", 1)],
        interceptors=propagating_interceptors(token),
    )


# -- the worker's side --------------------------------------------------------------------------


def worker(work: Callable[[str, Mark, Progress], Coroutine[Any, Any, dict[str, Any]]]) -> None:
    """`python -m <module> --loadgen-worker`: the spec line from stdin, `await work(spec_json,
    mark, progress)`; each mark prints its event and waits for the driver's "go" line (it has
    sampled the servers); progress goes to stderr; the result is the last line."""
    spec_json = sys.stdin.readline()

    async def mark(event: str) -> None:
        print(json.dumps({"event": event}), flush=True)
        await asyncio.to_thread(sys.stdin.readline)

    started = time.monotonic()

    def progress(line: str) -> None:
        elapsed = time.monotonic() - started
        print(f"[loadgen pid {os.getpid()} +{elapsed:4.1f}s] {line}", file=sys.stderr, flush=True)

    result = asyncio.run(work(spec_json, mark, progress))
    print(json.dumps({"event": "result", "result": result}), flush=True)


def worker_main(work: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> None:
    """A worker with no marks: the spec as a dict, `await work(spec)`, its result."""

    async def unmarked(spec_json: str, _mark: Mark, _progress: Progress) -> dict[str, Any]:
        return await work(json.loads(spec_json))

    worker(unmarked)


# -- the driver's side --------------------------------------------------------------------------


# A result line may be large (the mollifier's burst returns every run id it was given).
RESULT_LINE_LIMIT = 64 * 1024 * 1024


async def start_worker(module: str) -> asyncio.subprocess.Process:
    """`python -m <module> --loadgen-worker` on the same code as this process (an installed
    package or a checkout), stdin and stdout piped."""
    from runops.localstack.services import python_path

    env = {**os.environ, "PYTHONPATH": python_path()}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, "--loadgen-worker",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
        limit=RESULT_LINE_LIMIT,
    )  # fmt: skip


async def drive(
    module: str, spec_json: str, sample: Callable[[], S], label: str
) -> tuple[dict[str, Any], dict[str, S]]:
    """Run the worker with `spec_json`; returns its result and `sample()` taken at each mark
    (before the worker goes on: its connections may close right after "end")."""
    proc = await start_worker(module)
    assert proc.stdin is not None
    assert proc.stdout is not None
    marks: dict[str, S] = {}
    result: dict[str, Any] | None = None
    profiled = False  # `runops bench --profile`: this worker opened the phase
    try:
        await profile.join(profile.LOADGEN, proc.pid)  # a phase the benchmark opened
        proc.stdin.write(spec_json.encode() + b"\n")
        await proc.stdin.drain()
        async for line in proc.stdout:
            if not line.startswith(b"{"):
                sys.stderr.write(line.decode(errors="replace"))
                continue
            message = json.loads(line)
            if message["event"] == "result":
                result = message["result"]
            else:
                event = message["event"]
                marks[event] = sample()
                # The measured window (between the closed loop's marks) is a profiled phase.
                if event == "start":
                    profiled = await profile.begin(label, **{profile.LOADGEN: proc.pid})
                elif event == "end" and profiled:
                    profiled = False
                    await profile.end()
                proc.stdin.write(b"go\n")
                await proc.stdin.drain()
        proc.stdin.close()
        code = await proc.wait()
    finally:
        if profiled:
            await profile.end()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if code != 0 or result is None:
        raise RuntimeError(f"the load generator for {label!r} exited with status {code}")
    return result, marks


async def in_subprocess(module: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Run `worker_main`'s worker of `module` with `spec`: its result."""
    result, _ = await drive(module, json.dumps(spec), lambda: None, module)
    return result


async def run_worker(
    module: str, spec: Spec, sample: Callable[[], S]
) -> tuple[LoadResult, dict[str, S]]:
    """`drive` a closed-loop worker of `module`: its result and the samples at its marks."""
    result, marks = await drive(module, spec.to_json(), sample, spec.label)
    return LoadResult(**result), marks
