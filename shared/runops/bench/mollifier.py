"""Mollifier burst (spec §7): N triggers at one environment from many concurrent callers, the
drain of the buffer into Postgres, beside the raw bulk-insert floor of the same runs.

    python -m runops.bench.mollifier [--triggers N] [--callers C] [--channels K]

Every service runs as its own OS process: control plane, run store, the mollifier service
(`RUNOPS_DRAINER_ENABLED=false`) and its drainer (`python -m services.mollifier.drainer`, the
`mollifier-drainer` companion, as `runops up` runs it). The seeded organization gets
`mollifier_enabled` through the control plane's admin `SetOrganizationFlags`. Phases, in order:

  floor         N `runs` rows (~256 B payloads), asyncpg, unnest INSERT ... ON CONFLICT, 1000 rows
                a statement, 2 in flight, on the run-ops writer (`floors.measure(batch_id=None)`),
                in a load-generator subprocess
  burst         a load-generator subprocess: C callers on K grpc.aio channels (kit channels,
                internal token) send N `Trigger`s at the environment as fast as answered; the
                gate (100 per 200 ms) passes some straight to the run store, the rest are
                buffered -> accepted/s, p50/p99 trigger latency, how many were buffered. The
                drainer is NOT running yet, so the burst and the drain do not share the CPU
  drain         the drainer process starts; the bench polls count(*) of the environment's runs
                on both writers (a run lands in the database its id's residency names) every
                20 ms until all N are there -> drain rate = runs written by the drainer / the
                time from the first drained run seen to the last (its start-up excluded)
                -> drain / floor (target >= 50%; the anchor's drainer is about 1,000 runs/s)

Correctness: every trigger answered OK with a distinct run id, and Postgres ends with exactly
those N ids (no loss, no duplicates). See shared/runops/bench/README.md and docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg

from runops.bench import floors, profile, program
from runops.bench.loadgen import in_subprocess, percentile, worker_main
from runops.bench.proc import cpu_seconds
from runops.bench.report import Row, durability, settings, table
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
    import grpc

    from runops.kit.channels import create_channel
    from runops.kit.ids import body_of
    from runops.mollifier.v1 import mollifier_pb2 as m
    from runops.mollifier.v1 import mollifier_pb2_grpc as m_grpc

    n, callers = int(spec["triggers"]), int(spec["callers"])
    channels = [
        create_channel(spec["target"], token=spec["token"]) for _ in range(int(spec["channels"]))
    ]
    stubs = [m_grpc.MollifierServiceStub(c) for c in channels]
    env = spec["environment_id"]
    indexes = iter(range(n))
    latencies: list[float] = []
    ids: list[str] = []
    buffered = errors = 0

    async def caller(number: int) -> None:
        nonlocal buffered, errors
        stub = stubs[number % len(stubs)]
        for i in indexes:
            request = m.TriggerRequest(
                environment_id=env, task_identifier=floors.TASK,
                payload=floors.payload(i, PAYLOAD_BYTES), payload_type=floors.PAYLOAD_TYPE,
            )  # fmt: skip
            began = time.perf_counter()
            try:
                reply = await stub.Trigger(request)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - began)
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
        "buffered": buffered,
        "errors": errors,
        "p50": percentile(latencies, 0.50),
        "p99": percentile(latencies, 0.99),
    }


# -- the bench side ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MollifierResult:
    cpus: int
    durability: dict[str, str]
    triggers: int
    callers: int
    channels: int
    burst_seconds: float
    buffered: int
    p50_ms: float
    p99_ms: float
    in_postgres_after_burst: int  # the gate's pass-throughs, written during the burst
    drained: int  # runs written by the drainer over the measured drain window
    drain_seconds: float
    drain_total_seconds: float  # from the drainer's start to the last run (start-up included)
    drainer_cores: float  # CPU of the drainer process over the drain, in cores
    runstore_cores: float
    service_cores: float  # the mollifier service over the burst
    burst_runstore_cores: float  # the run store over the burst (the gate's pass-throughs)
    loadgen_cores: float
    floor_seconds: float

    @property
    def accepted_rate(self) -> float:
        return self.triggers / self.burst_seconds

    @property
    def drain_rate(self) -> float:
        return self.drained / self.drain_seconds if self.drain_seconds else 0.0

    @property
    def floor_rate(self) -> float:
        return self.triggers / self.floor_seconds

    def rows(self) -> list[Row]:
        b = BENCHMARK
        return [
            Row(b, f"burst of {self.triggers:,} triggers, {self.callers} callers: accepted",
                self.accepted_rate, "triggers/s"),
            Row(b, "p99 trigger latency", self.p99_ms, "ms"),
            Row.against(b, "drain into Postgres", self.drain_rate, "runs/s", self.floor_rate,
                        "unnest INSERT", target=">= 0.5 of unnest", at_least=0.5),
        ]  # fmt: skip

    def report(self) -> str:
        straight = self.triggers - self.buffered
        return "\n".join(
            [
                f"mollifier burst, {self.cpus} CPUs, Postgres: " + settings(self.durability),
                f"  burst: {self.triggers:,} triggers from {self.callers} callers on"
                f" {self.channels} channels in {self.burst_seconds:.2f}s ="
                f" {self.accepted_rate:,.0f}/s accepted; latency p50 {self.p50_ms:.1f} ms,"
                f" p99 {self.p99_ms:.1f} ms; {self.buffered:,} buffered, {straight:,} passed"
                f" the gate ({self.in_postgres_after_burst:,} in Postgres after the burst);"
                f" CPU (cores) mollifier {self.service_cores:.2f}, run store"
                f" {self.burst_runstore_cores:.2f}, load generator {self.loadgen_cores:.2f}",
                f"  drain: {self.drained:,} runs in {self.drain_seconds:.2f}s ="
                f" {self.drain_rate:,.0f} runs/s (from the last poll before the first drained run"
                f" to the last; from the drainer's start {self.drain_total_seconds:.2f}s); CPU (cores) drainer"
                f" {self.drainer_cores:.2f}, run store {self.runstore_cores:.2f}",
                f"  floor: unnest INSERT of {self.triggers:,} runs ({floors.CHUNK} a statement,"
                f" {floors.IN_FLIGHT} in flight) {self.floor_rate:,.0f} runs/s -> drain"
                f" {self.drain_rate / self.floor_rate:.0%} of the floor (target >= 50%)",
                f"  checked: every trigger answered with a distinct run id; Postgres holds exactly"
                f" those {self.triggers:,} runs",
            ]
        )


async def _set_flag(suite: Suite) -> None:
    from runops.controlplane.v1 import controlplane_pb2 as cp
    from runops.controlplane.v1 import controlplane_pb2_grpc as cp_grpc
    from runops.kit.channels import create_channel

    channel = create_channel(suite.base[0].target, token=suite.admin_token)
    try:
        stub = cp_grpc.ControlPlaneServiceStub(channel)
        await stub.SetOrganizationFlags(
            cp.SetOrganizationFlagsRequest(
                organization_id=suite.organization_id, mollifier_enabled=True
            )
        )
    finally:
        await channel.close()


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


async def measure(
    suite: Suite,
    *,
    triggers: int,
    callers: int,
    channels: int,
    gate_threshold: int | None,
    progress: Progress,
) -> MollifierResult:
    from runops.localstack.ports import free_port
    from runops.localstack.services import ServiceProcess

    say = progress
    stack = suite.stack
    await _set_flag(suite)
    async with profile.phase("floor unnest INSERT"):
        floor_seconds = await floors.measure(
            stack.runops_db.writer_dsn, method="unnest", rows=triggers,
            payload_bytes=PAYLOAD_BYTES, environment_id=f"{suite.environment_id}_floor",
            batch_id=None,
        )  # fmt: skip
    say(f"floor unnest INSERT: {triggers / floor_seconds:,.0f} runs/s")

    conns = [await asyncpg.connect(db.admin_writer_dsn)
             for db in (stack.controlplane_db, stack.runops_db)]  # fmt: skip
    counter = Counter(conns, suite.environment_id)
    try:
        gate = {} if gate_threshold is None else {"RUNOPS_GATE_THRESHOLD": str(gate_threshold)}
        # A key prefix of its own: no other mollifier on this Redis (the test session's) may
        # drain the burst before the measured drainer starts.
        own = {"RUNOPS_KEY_PREFIX": f"bench-{secrets.token_hex(4)}"}
        async with suite.service(
            "mollifier", "mollifier", RUNOPS_DRAINER_ENABLED="false", **gate, **own
        ) as svc:
            service_pid, store_pid = pid_of(svc), pid_of(suite.base[1])
            if await counter.count():
                raise RuntimeError("the environment already has runs")
            spec = {
                "target": svc.target, "token": suite.internal_token,
                "environment_id": suite.environment_id, "triggers": triggers,
                "callers": callers, "channels": channels,
            }  # fmt: skip
            cpu_before = (cpu_seconds(service_pid), cpu_seconds(store_pid))
            async with profile.phase("burst"):
                burst = await in_subprocess(MODULE, spec)
            service_cores, burst_store_cores = (
                (cpu_seconds(p) - b) / burst["seconds"]
                for p, b in zip((service_pid, store_pid), cpu_before, strict=True)
            )
            ids: list[str] = burst["ids"]
            if burst["errors"] or len(ids) != triggers or len(set(ids)) != triggers:
                raise RuntimeError(
                    f"burst: {burst['errors']} errors, {len(ids)} answers,"
                    f" {len(set(ids))} distinct run ids for {triggers} triggers"
                )
            say(
                f"burst: {triggers / burst['seconds']:,.0f} triggers/s, p99"
                f" {burst['p99'] * 1000:.1f} ms, {burst['buffered']:,} buffered"
            )
            after_burst = await counter.count()
            drainer = ServiceProcess(
                "mollifier", free_port(), -1, suite.logs / "mollifier-drainer.log",
                env=suite.env(**own), companion="mollifier-drainer",
            )  # fmt: skip
            drainer.start()
            try:
                before = (cpu_seconds(pid_of(drainer)), cpu_seconds(store_pid))
                with profile.watching("mollifier-drainer", pid_of(drainer)):
                    async with profile.phase("drain"):
                        drained, drain_seconds, total_seconds = await _drain(
                            counter, triggers, after_burst, DRAIN_LIMIT_SECONDS
                        )
                cores = [
                    (cpu_seconds(p) - b) / total_seconds
                    for p, b in zip((pid_of(drainer), store_pid), before, strict=True)
                ]
            finally:
                await asyncio.to_thread(drainer.stop)
            say(f"drain: {drained / drain_seconds if drain_seconds else 0:,.0f} runs/s")
            await asyncio.sleep(0.2)  # a duplicate written late would show now
            found = await counter.ids()
            if len(found) != triggers or set(found) != set(ids):
                raise RuntimeError(
                    f"Postgres holds {len(found):,} runs ({len(set(found)):,} distinct),"
                    f" {len(set(found) & set(ids)):,} of the {triggers:,} triggered"
                )
    finally:
        for conn in conns:
            await conn.close()
    return MollifierResult(
        cpus=os.cpu_count() or 1,
        durability=await durability(stack.runops_db.admin_writer_dsn),
        triggers=triggers,
        callers=callers,
        channels=channels,
        burst_seconds=burst["seconds"],
        buffered=burst["buffered"],
        p50_ms=burst["p50"] * 1000,
        p99_ms=burst["p99"] * 1000,
        in_postgres_after_burst=after_burst,
        drained=drained,
        drain_seconds=drain_seconds,
        drain_total_seconds=total_seconds,
        drainer_cores=cores[0],
        runstore_cores=cores[1],
        service_cores=service_cores,
        burst_runstore_cores=burst_store_cores,
        loadgen_cores=burst["cores"],
        floor_seconds=floor_seconds,
    )


DEFAULTS = {"triggers": 20_000, "callers": 64, "channels": 4}


async def run(
    stack: LocalStack,
    *,
    triggers: int = DEFAULTS["triggers"],
    callers: int = DEFAULTS["callers"],
    channels: int = DEFAULTS["channels"],
    gate_threshold: int | None = None,
    progress: Progress | None = None,
) -> MollifierResult:
    """Start a control plane and a run store as processes on `stack`, seed an environment with
    the mollifier flag, then the mollifier and (after the burst) its drainer, and measure.
    `gate_threshold`: the gate's (default: the service's, 100 per 200 ms)."""
    say: Progress = progress or (lambda _line: None)
    async with running_suite(stack, say) as suite:
        return await measure(
            suite, triggers=triggers, callers=callers, channels=channels,
            gate_threshold=gate_threshold, progress=say,
        )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = program.parser(MODULE, __doc__)
    add = parser.add_argument
    add("--triggers", type=int, default=DEFAULTS["triggers"], help="triggers in the burst")
    add("--callers", type=int, default=DEFAULTS["callers"], help="concurrent callers")
    add("--channels", type=int, default=DEFAULTS["channels"], help="gRPC channels they share")
    args = parser.parse_args(argv)
    if args.loadgen_worker:
        worker_main(_burst_work)
        return
    if min(args.triggers, args.callers, args.channels) < 1:
        parser.error("sizes must be >= 1")
    sizes = {name: getattr(args, name) for name in DEFAULTS}
    result = program.on_local_stack(lambda stack, say: run(stack, **sizes, progress=say))
    print(result.report(), "", table(result.rows()), sep="\n", flush=True)


if __name__ == "__main__":
    main()
