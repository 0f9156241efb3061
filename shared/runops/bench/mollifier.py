"""Mollifier burst (spec §7): N triggers at one environment from many concurrent callers beside
an empty unary RPC on the same server, the drain of the buffer into Postgres beside the raw
bulk-insert floor of the same runs; with 1 and with 2 server processes (and drainers).

    python -m runops.bench.mollifier [--triggers N] [--callers C] [--channels K]
                                     [--repetitions R] [--processes 1 2] [--drainers D]

Every service runs as its own OS process: control plane, run store, the mollifier service
(`RUNOPS_DRAINER_ENABLED=false`, RUNOPS_PROCESSES=P) and its drainers (`python -m
services.mollifier.drainer`, the `mollifier-drainer` companion, as `runops up` runs it). Phases,
in order:

  floor         N `runs` rows (~256 B payloads), asyncpg, unnest INSERT ... ON CONFLICT, 1000 rows
                a statement, 2 in flight, on the run-ops writer (`floors.measure(batch_id=None)`),
                in a load-generator subprocess; R times
  then R cycles per configuration (P server processes, P drainers), each on a fresh
  environment (its organization gets `mollifier_enabled` through the admin
  `SetOrganizationFlags`) and a fresh mollifier with a Redis key prefix of its own:
  empty RPC     the floor of the burst: the same load generator (C callers, K kit channels,
                internal token) sends N grpc health `Check`s to the same server
  burst         N `Trigger`s at the environment as fast as answered; the gate (100 per 200 ms)
                passes some straight to the run store, the rest are buffered -> accepted/s
                (target >= 0.8 of the empty RPC's calls/s), p50/p99 latency (target p99 <=
                50 ms), how many were buffered. No drainer runs yet, so the burst and the
                drain do not share the CPU
  drain         the P drainer processes start; the bench polls count(*) of the environment's
                runs on both writers (a run lands in the database its id's residency names)
                every 20 ms until all N are there -> drain rate = runs written by the drainers
                / the time from the last poll before the first drained run to the last (their
                start-up excluded) -> drain / floor (target >= 50%)
Each row is the median of the R cycles (spread: min-max).

Correctness: every trigger answered OK with a distinct run id, and Postgres ends with exactly
those N ids (no loss, no duplicates). See shared/runops/bench/README.md and docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg

from runops.bench import floors, profile, program
from runops.bench.loadgen import in_subprocess, own_connection_channel, percentile, worker_main
from runops.bench.proc import cpu_seconds, process_tree_cpu
from runops.bench.report import REPETITIONS, Repeated, Row, durability, settings, table
from runops.bench.services import Suite, pid_of, running_suite

if TYPE_CHECKING:
    from runops.localstack import LocalStack

Progress = Callable[[str], None]
MODULE = "runops.bench.mollifier"
BENCHMARK = "mollifier"
PAYLOAD_BYTES = 256
POLL_SECONDS = 0.02
DRAIN_LIMIT_SECONDS = 300.0  # liveness: the whole backlog must land within this


# -- the load generator ------------------------------------------------------------------------


async def _burst_work(spec: dict[str, Any]) -> dict[str, Any]:
    """N calls from C callers on K kit channels, each caller calling again as soon as answered:
    `Trigger`s, or (`"empty": true`) grpc health `Check`s on the same server, the floor."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from runops.kit.channels import create_channel
    from runops.kit.ids import body_of
    from runops.mollifier.v1 import mollifier_pb2 as m
    from runops.mollifier.v1 import mollifier_pb2_grpc as m_grpc

    n, callers, empty = int(spec["triggers"]), int(spec["callers"]), bool(spec.get("empty"))
    # A server of several processes: a connection per channel, so each process gets calls.
    make: Callable[..., Any] = (
        own_connection_channel if spec.get("own_connections") else create_channel
    )
    channels = [make(spec["target"], token=spec["token"]) for _ in range(int(spec["channels"]))]
    stubs = [m_grpc.MollifierServiceStub(c) for c in channels]
    checks: list[Any] = [health_pb2_grpc.HealthStub(c) for c in channels]
    env = spec["environment_id"]
    indexes = iter(range(n))
    latencies: list[float] = []
    ids: list[str] = []
    buffered = errors = 0

    async def caller(number: int) -> None:
        nonlocal buffered, errors
        stub, check = stubs[number % len(stubs)], checks[number % len(checks)]
        for i in indexes:
            began = time.perf_counter()
            try:
                if empty:
                    await check.Check(health_pb2.HealthCheckRequest(service=""))
                else:
                    reply = await stub.Trigger(
                        m.TriggerRequest(
                            environment_id=env, task_identifier=floors.TASK,
                            payload=floors.payload(i, PAYLOAD_BYTES),
                            payload_type=floors.PAYLOAD_TYPE,
                        )
                    )  # fmt: skip
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - began)
            if not empty:
                ids.append(body_of(reply.run.id))
                buffered += reply.buffered

    for channel in channels:
        await channel.channel_ready()
    began, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(caller(c) for c in range(callers)))
    seconds = time.perf_counter() - began
    cores = (time.process_time() - cpu) / seconds
    for channel in channels:
        await channel.close()
    latencies.sort()
    return {
        "seconds": seconds,
        "cores": cores,
        "ids": ids,
        "calls": len(latencies),
        "buffered": buffered,
        "errors": errors,
        "p50": percentile(latencies, 0.50),
        "p99": percentile(latencies, 0.99),
    }


# -- the bench side ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Cycle:
    """One repetition on one configuration: the empty-RPC floor and the burst on a fresh
    mollifier of `processes` server processes, then the drain by `drainers` drainer processes."""

    processes: int
    drainers: int
    triggers: int
    empty_seconds: float  # N health Checks from the same callers on the same server
    empty_p99_ms: float
    burst_seconds: float
    buffered: int
    p50_ms: float
    p99_ms: float
    in_postgres_after_burst: int  # the gate's pass-throughs, written during the burst
    drained: int  # runs written by the drainers over the measured drain window
    drain_seconds: float
    drain_total_seconds: float  # from the drainers' start to the last run (start-up included)
    drainer_cores: float  # CPU of the drainer processes over the drain, in cores
    runstore_cores: float
    service_cores: float  # the mollifier service over the burst
    burst_runstore_cores: float  # the run store over the burst (the gate's pass-throughs)
    loadgen_cores: float

    @property
    def accepted_rate(self) -> float:
        return self.triggers / self.burst_seconds

    @property
    def empty_rate(self) -> float:
        return self.triggers / self.empty_seconds

    @property
    def drain_rate(self) -> float:
        return self.drained / self.drain_seconds if self.drain_seconds else 0.0


@dataclass(frozen=True)
class MollifierResult:
    cpus: int
    durability: dict[str, str]
    triggers: int
    callers: int
    channels: int
    floor_seconds: tuple[float, ...]  # the unnest floor, once per repetition
    cycles: tuple[Cycle, ...]  # every configuration's repetitions, in order

    def of(self, processes: int) -> list[Cycle]:
        """The repetitions of one configuration (`processes` server processes and as many
        drainers)."""
        return [c for c in self.cycles if c.processes == processes]

    @property
    def configurations(self) -> list[int]:
        return sorted({c.processes for c in self.cycles})

    @property
    def floor(self) -> Repeated:
        return Repeated(tuple(self.triggers / s for s in self.floor_seconds))

    @property
    def floor_rate(self) -> float:
        return self.floor.median

    def rows(self) -> list[Row]:
        b, floor = BENCHMARK, self.floor
        rows: list[Row] = []
        for n in self.configurations:
            cycles = self.of(n)
            accepted = Repeated(tuple(c.accepted_rate for c in cycles))
            empty = Repeated(tuple(c.empty_rate for c in cycles))
            p99 = Repeated(tuple(c.p99_ms for c in cycles))
            drain = Repeated(tuple(c.drain_rate for c in cycles))
            procs = "" if n == 1 else f", {n} processes"
            drainers = _count(cycles[0].drainers, "drainer")
            rows += [
                Row.repeated(b, f"Trigger accepted/s, {self.callers} callers{procs}", accepted,
                             "triggers/s", empty, "empty unary RPC", target=">= 0.8 of empty RPC",
                             at_least=0.8),
                Row(b, f"Trigger p99{procs}", p99.median, "ms", target="<= 50 ms",
                    met=p99.median <= 50, spread=p99.spread if len(cycles) > 1 else None),
                Row.repeated(b, f"drain into Postgres, {drainers}", drain, "runs/s", floor,
                             "unnest INSERT", target=">= 0.5 of unnest", at_least=0.5),
            ]  # fmt: skip
        return rows

    def report(self) -> str:
        lines = [
            f"mollifier burst, {self.cpus} CPUs, Postgres: " + settings(self.durability),
            f"  floor: unnest INSERT of {self.triggers:,} runs ({floors.CHUNK} a statement,"
            f" {floors.IN_FLIGHT} in flight): "
            + ", ".join(f"{r:,.0f}" for r in self.floor.values)
            + " runs/s",
        ]
        for c in self.cycles:
            straight = c.triggers - c.buffered
            lines += [
                f"  {_count(c.processes, 'server process')}, {_count(c.drainers, 'drainer')}:",
                f"    empty RPC (health Check, same callers and server): {c.empty_rate:,.0f}/s,"
                f" p99 {c.empty_p99_ms:.1f} ms",
                f"    burst: {c.triggers:,} triggers from {self.callers} callers on"
                f" {self.channels} channels in {c.burst_seconds:.2f}s ="
                f" {c.accepted_rate:,.0f}/s accepted ({c.accepted_rate / c.empty_rate:.0%} of"
                f" the empty RPC); latency p50 {c.p50_ms:.1f} ms, p99 {c.p99_ms:.1f} ms;"
                f" {c.buffered:,} buffered, {straight:,} passed the gate"
                f" ({c.in_postgres_after_burst:,} in Postgres after the burst); CPU (cores)"
                f" mollifier {c.service_cores:.2f}, run store {c.burst_runstore_cores:.2f}, load"
                f" generator {c.loadgen_cores:.2f}",
                f"    drain: {c.drained:,} runs in {c.drain_seconds:.2f}s ="
                f" {c.drain_rate:,.0f} runs/s ({c.drain_rate / self.floor_rate:.0%} of the"
                f" floor's median; from the drainers' start {c.drain_total_seconds:.2f}s); CPU"
                f" (cores) drainers {c.drainer_cores:.2f}, run store {c.runstore_cores:.2f}",
            ]
        lines.append(
            "  checked: every trigger answered with a distinct run id; Postgres holds exactly"
            " those runs (each repetition on an environment of its own)"
        )
        return "\n".join(lines)


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}es" if what.endswith("s") else f"{n} {what}s"


async def _mollifier_environment(suite: Suite) -> str:
    """A fresh organization (mollifier flag on, through the admin `SetOrganizationFlags`) with
    one environment: each repetition counts its own runs."""
    from runops.cli.admin import bootstrap_at
    from runops.controlplane.v1 import controlplane_pb2 as cp
    from runops.controlplane.v1 import controlplane_pb2_grpc as cp_grpc
    from runops.kit.channels import create_channel

    target = suite.base[0].target
    seeded = await bootstrap_at(target, suite.admin_token, "bench-mollifier", suffix_if_taken=True)
    channel = create_channel(target, token=suite.admin_token)
    try:
        stub = cp_grpc.ControlPlaneServiceStub(channel)
        await stub.SetOrganizationFlags(
            cp.SetOrganizationFlagsRequest(
                organization_id=seeded.organization.id, mollifier_enabled=True
            )
        )
    finally:
        await channel.close()
    return seeded.environments[0][0].id


class Counter:
    """count(*) of one environment's runs on both writers (a run lands in the database its id's
    residency names), on connections opened once."""

    def __init__(self, conns: list[asyncpg.Connection], environment_id: str) -> None:
        self.conns, self.environment_id = conns, environment_id

    async def count(self) -> int:
        sql = "SELECT count(*) FROM runs WHERE environment_id = $1"
        return sum([int(await c.fetchval(sql, self.environment_id)) for c in self.conns])

    async def ids(self) -> list[str]:
        sql = "SELECT id FROM runs WHERE environment_id = $1"
        return [r["id"] for c in self.conns for r in await c.fetch(sql, self.environment_id)]


async def _drain(
    counter: Counter, total: int, baseline: int, limit: float
) -> tuple[int, float, float]:
    """Poll until `total` runs are there: (runs the drainer wrote, seconds from the last sample
    still at `baseline` to the first at `total`, seconds since polling began). The window
    brackets the drain (start-up excluded) to within one poll, so the rate errs low."""
    began = time.perf_counter()
    last_idle = began
    while True:
        count, now = await counter.count(), time.perf_counter()
        if count <= baseline:
            last_idle = now
        if count >= total:
            break
        if now - began > limit:
            raise RuntimeError(f"only {count:,} of {total:,} runs in Postgres after {limit:.0f}s")
        await asyncio.sleep(POLL_SECONDS)
    if count <= baseline:  # nothing to drain (every trigger passed the gate)
        return 0, 0.0, now - began
    return count - baseline, now - last_idle, now - began


@dataclass(frozen=True)
class Burst:
    """What every cycle shares: sizes, the gate, the connections that count runs."""

    suite: Suite
    triggers: int
    callers: int
    channels: int
    gate: dict[str, str]
    conns: list[asyncpg.Connection]


async def _cycle(burst: Burst, processes: int, drainers: int, say: Progress) -> Cycle:
    """On a fresh environment and a fresh mollifier (`processes` server processes, no drainer,
    a Redis key prefix of its own so no other mollifier drains its buffer): the empty-RPC floor,
    the burst, then `drainers` drainer processes drain it; every answer and run checked."""
    from runops.localstack.ports import free_port
    from runops.localstack.services import ServiceProcess

    suite, triggers = burst.suite, burst.triggers
    counter = Counter(burst.conns, await _mollifier_environment(suite))
    own = {"RUNOPS_KEY_PREFIX": f"bench-{secrets.token_hex(4)}"}
    label = "mollifier" if processes == 1 else f"mollifier-{processes}-processes"
    async with suite.service(
        "mollifier", label, RUNOPS_DRAINER_ENABLED="false", RUNOPS_PROCESSES=str(processes),
        **burst.gate, **own,
    ) as svc:  # fmt: skip
        service_pid, store_pid = pid_of(svc), pid_of(suite.base[1])
        spec = {
            "target": svc.target, "token": suite.internal_token,
            "environment_id": counter.environment_id, "triggers": triggers,
            "callers": burst.callers, "channels": burst.channels,
            "own_connections": processes > 1,
        }  # fmt: skip
        async with profile.phase(f"empty RPC, {_count(processes, 'process')}"):
            empty = await in_subprocess(MODULE, spec | {"empty": True})
        if empty["errors"] or empty["calls"] != triggers:
            raise RuntimeError(f"empty RPC: {empty['errors']} errors of {triggers} calls")
        cpu_before = (process_tree_cpu(service_pid) or 0.0, cpu_seconds(store_pid))
        async with profile.phase(f"burst, {_count(processes, 'process')}"):
            result = await in_subprocess(MODULE, spec)
        service_cores, burst_store_cores = (
            ((process_tree_cpu(service_pid) or 0.0) - cpu_before[0]) / result["seconds"],
            (cpu_seconds(store_pid) - cpu_before[1]) / result["seconds"],
        )
        ids: list[str] = result["ids"]
        if result["errors"] or len(ids) != triggers or len(set(ids)) != triggers:
            raise RuntimeError(
                f"burst: {result['errors']} errors, {len(ids)} answers,"
                f" {len(set(ids))} distinct run ids for {triggers} triggers"
            )
        say(
            f"burst ({_count(processes, 'process')}): {triggers / result['seconds']:,.0f} triggers/s"
            f" (empty RPC {triggers / empty['seconds']:,.0f}/s), p99"
            f" {result['p99'] * 1000:.1f} ms, {result['buffered']:,} buffered"
        )
        after_burst = await counter.count()
        started = [
            ServiceProcess(
                "mollifier", free_port(), -1, suite.logs / f"mollifier-drainer-{k}.log",
                env=suite.env(**own), companion="mollifier-drainer",
            )
            for k in range(drainers)
        ]  # fmt: skip
        for drainer in started:
            drainer.start()
        try:
            pids = [pid_of(d) for d in started]
            before = (sum(cpu_seconds(p) for p in pids), cpu_seconds(store_pid))
            with contextlib.ExitStack() as watched:
                for k, pid in enumerate(pids):
                    watched.enter_context(profile.watching(f"mollifier-drainer-{k + 1}", pid))
                async with profile.phase(f"drain, {_count(drainers, 'drainer')}"):
                    drained, drain_seconds, total_seconds = await _drain(
                        counter, triggers, after_burst, DRAIN_LIMIT_SECONDS
                    )
            cores = (
                (sum(cpu_seconds(p) for p in pids) - before[0]) / total_seconds,
                (cpu_seconds(store_pid) - before[1]) / total_seconds,
            )
        finally:
            await asyncio.gather(*(asyncio.to_thread(d.stop) for d in started))
    say(
        f"drain ({_count(drainers, 'drainer')}): {drained / drain_seconds if drain_seconds else 0:,.0f} runs/s"
    )
    await asyncio.sleep(0.2)  # a duplicate written late would show now
    found = await counter.ids()
    if len(found) != triggers or set(found) != set(ids):
        raise RuntimeError(
            f"Postgres holds {len(found):,} runs ({len(set(found)):,} distinct),"
            f" {len(set(found) & set(ids)):,} of the {triggers:,} triggered"
        )
    return Cycle(
        processes=processes, drainers=drainers, triggers=triggers,
        empty_seconds=empty["seconds"], empty_p99_ms=empty["p99"] * 1000,
        burst_seconds=result["seconds"], buffered=result["buffered"],
        p50_ms=result["p50"] * 1000, p99_ms=result["p99"] * 1000,
        in_postgres_after_burst=after_burst, drained=drained, drain_seconds=drain_seconds,
        drain_total_seconds=total_seconds, drainer_cores=cores[0], runstore_cores=cores[1],
        service_cores=service_cores, burst_runstore_cores=burst_store_cores,
        loadgen_cores=result["cores"],
    )  # fmt: skip


async def measure(
    suite: Suite,
    *,
    triggers: int,
    callers: int,
    channels: int,
    gate_threshold: int | None,
    repetitions: int,
    processes: tuple[int, ...],
    progress: Progress,
    drainers: int | None = None,
) -> MollifierResult:
    say = progress
    stack = suite.stack
    floor_seconds = []
    for k in range(repetitions):
        async with profile.phase("floor unnest INSERT"):
            floor_seconds.append(
                await floors.measure(
                    stack.runops_db.writer_dsn, method="unnest", rows=triggers,
                    payload_bytes=PAYLOAD_BYTES, environment_id=f"{suite.environment_id}_floor{k}",
                    batch_id=None,
                )
            )  # fmt: skip
        say(f"floor unnest INSERT: {triggers / floor_seconds[-1]:,.0f} runs/s")
    conns = [await asyncpg.connect(db.admin_writer_dsn)
             for db in (stack.controlplane_db, stack.runops_db)]  # fmt: skip
    gate = {} if gate_threshold is None else {"RUNOPS_GATE_THRESHOLD": str(gate_threshold)}
    burst = Burst(suite, triggers, callers, channels, gate, conns)
    cycles = []
    try:
        # N server processes, N drainers (or `drainers`): the 1 vs 2 rows of each (spec §7).
        for n in processes:
            for _ in range(repetitions):
                cycles.append(await _cycle(burst, n, drainers or n, say))
    finally:
        for conn in conns:
            await conn.close()
    return MollifierResult(
        cpus=os.cpu_count() or 1,
        durability=await durability(stack.runops_db.admin_writer_dsn),
        triggers=triggers,
        callers=callers,
        channels=channels,
        floor_seconds=tuple(floor_seconds),
        cycles=tuple(cycles),
    )


DEFAULTS: dict[str, Any] = {
    "triggers": 20_000, "callers": 64, "channels": 4, "repetitions": REPETITIONS,
    "processes": (1, 2),
}  # fmt: skip


async def run(
    stack: LocalStack,
    *,
    triggers: int = DEFAULTS["triggers"],
    callers: int = DEFAULTS["callers"],
    channels: int = DEFAULTS["channels"],
    repetitions: int = DEFAULTS["repetitions"],
    processes: tuple[int, ...] = DEFAULTS["processes"],
    drainers: int | None = None,
    gate_threshold: int | None = None,
    progress: Progress | None = None,
) -> MollifierResult:
    """Start a control plane and a run store as processes on `stack`; per configuration
    (`processes`: server processes and as many drainers) and repetition, an environment with
    the mollifier flag, a mollifier and (after the burst) its drainers, and measure.
    `gate_threshold`: the gate's (default: the service's, 100 per 200 ms)."""
    say: Progress = progress or (lambda _line: None)
    async with running_suite(stack, say) as suite:
        return await measure(
            suite, triggers=triggers, callers=callers, channels=channels,
            gate_threshold=gate_threshold, repetitions=repetitions, processes=processes,
            progress=say, drainers=drainers,
        )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = program.parser(MODULE, __doc__)
    add = parser.add_argument
    add("--triggers", type=int, default=DEFAULTS["triggers"], help="triggers in the burst")
    add("--callers", type=int, default=DEFAULTS["callers"], help="concurrent callers")
    add("--channels", type=int, default=DEFAULTS["channels"], help="gRPC channels they share")
    add("--repetitions", type=int, default=REPETITIONS, help="cycles per configuration")
    add("--processes", type=int, nargs="+", default=list(DEFAULTS["processes"]),
        help="configurations: N server processes and N drainers each (default 1 2)")  # fmt: skip
    add("--drainers", type=int, help="drainer processes in every configuration (default: N)")
    args = parser.parse_args(argv)
    if args.loadgen_worker:
        worker_main(_burst_work)
        return
    if min(args.triggers, args.callers, args.channels, args.repetitions, *args.processes,
           args.drainers or 1) < 1:  # fmt: skip
        parser.error("sizes must be >= 1")
    sizes = {name: getattr(args, name) for name in DEFAULTS} | {"processes": tuple(args.processes)}
    sizes["drainers"] = args.drainers
    result = program.on_local_stack(lambda stack, say: run(stack, **sizes, progress=say))
    print(result.report(), "", table(result.rows()), sep="\n", flush=True)


if __name__ == "__main__":
    main()
