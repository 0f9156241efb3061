"""Control plane (spec §7): cached `AuthenticateApiKey` through gRPC, and through
`ControlPlaneClient`'s local cache (the path the other services take), against a raw indexed
Postgres lookup, measured in the same run on the same servers.

    python -m runops.bench.controlplane [--seconds N] [--concurrency C] [--keys K]
                                            [--loadgen subprocess|inprocess]

Five phases, in this order, each with C closed-loop callers going round-robin over K seeded API
keys, a warm-up first, then N measured seconds:

  postgres floor   the service's own query (SELECT_BY_KEY_HASH, digest given) with asyncpg, a pool
                   of C connections on the replica, where the service reads
  grpc cached      AuthenticateApiKey with the internal token -> control-plane grpc.aio server ->
                   its in-process cache (every key cached during the warm-up)
  grpc health      grpc.health.v1 Check on the same server: the RPC and the kit's interceptor with
                   no servicer work, i.e. what the cached path could at best reach here
  client cached    ControlPlaneClient.authenticate_api_key (runops.controlplane.client) against
                   the same server: the client's own cache, kept fresh by its WatchInvalidations
                   subscription; a miss would be a cached AuthenticateApiKey (target: >= 10x the
                   floor)
  grpc uncached    AuthenticateApiKey against a control plane whose cache keeps nothing (1 us TTL,
                   1 entry): every call is an indexed lookup on the replica via the service's pool

The load generator (the client side of every phase) runs in a subprocess by default, so the
control plane's process serves only; `--loadgen inprocess` runs it in the server's event loop.
See shared/runops/bench/README.md for the figures and why.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import secrets
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from runops.bench.loadgen import drive
from runops.controlplane.client import ControlPlaneClient
from runops.controlplane.model import hash_api_key
from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.controlplane.v1 import controlplane_pb2_grpc as cp_grpc
from runops.kit.channels import create_channel
from runops.kit.errors import RunopsError

# The load-generator subprocess imports only what a client needs (it starts in every phase);
# the servers' side is imported where it is used.
if TYPE_CHECKING:
    from runops.localstack import LocalStack
    from services.controlplane.app import ControlPlane

Progress = Callable[[str], None]
LoadgenMode = Literal["subprocess", "inprocess"]
Call = Callable[[int], Awaitable[str | None]]
Kind = Literal["authenticate", "client", "health", "postgres"]

MODULE = "runops.bench.controlplane"
# The control plane's API-key cache, ControlPlaneClient's (prometheus labels), and the RPC's
# handled counter.
CACHE_NAME = "controlplane.api_keys"
CLIENT_CACHE_NAME = "controlplane_client.api_keys"
CACHE_RESULTS = ("hit", "miss", "shared")
HANDLED_OK = {
    "grpc_type": "unary",
    "grpc_service": cp.DESCRIPTOR.services_by_name["ControlPlaneService"].full_name,
    "grpc_method": "AuthenticateApiKey",
    "grpc_code": "OK",
}
# A control plane that caches nothing: entries expire at once, and only one is ever held.
UNCACHED_SETTINGS: dict[str, Any] = {"cache_ttl_seconds": 1e-6, "cache_max_entries": 1}
PROGRESS_EVERY_SECONDS = 2.0
SEED_CONCURRENCY = 8


def warmup_for(seconds: float) -> float:
    """Warm-up before each measured window: a fifth of it, between 0.2 s and 2 s."""
    return min(2.0, max(0.2, seconds / 5))


# -- the load generator (in this process or in a subprocess) ------------------------------------


@dataclass(frozen=True)
class LoadSpec:
    """One load-generator run; travels as JSON on the subprocess's stdin."""

    kind: Kind
    label: str
    seconds: float
    warmup: float
    concurrency: int
    api_keys: tuple[str, ...]
    env_ids: tuple[str, ...]
    target: str = ""  # grpc
    token: str = ""  # grpc
    dsn: str = ""  # postgres
    query: str = ""  # postgres: the service's SELECT_BY_KEY_HASH

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LoadSpec:
        raw = json.loads(text)
        raw["api_keys"] = tuple(raw["api_keys"])
        raw["env_ids"] = tuple(raw["env_ids"])
        return cls(**raw)


@dataclass(frozen=True)
class LoadResult:
    calls: int  # successful calls that completed inside the measured window
    seconds: float
    errors: dict[str, int]  # failed calls by status, warm-up included
    p50_ms: float
    p99_ms: float
    cpu_seconds: float  # CPU of the load generator's process over the measured window
    pid: int
    # The client phase: ControlPlaneClient's API-key cache over the window, by result.
    client_cache: dict[str, int] | None = None


def _metric(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _cache_lookups(cache: str) -> dict[str, float]:
    return {
        result: _metric("runops_cache_lookups_total", {"cache": cache, "result": result})
        for result in CACHE_RESULTS
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _percentile(ordered: list[int], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6


async def _grpc_caller(spec: LoadSpec) -> tuple[Call, Callable[[], Awaitable[None]]]:
    channel = create_channel(spec.target, token=spec.token)
    client = cp_grpc.ControlPlaneServiceStub(channel)
    requests = [cp.AuthenticateApiKeyRequest(api_key=key) for key in spec.api_keys]

    async def call(i: int) -> str | None:
        response = await client.AuthenticateApiKey(requests[i])
        return None if response.environment.id == spec.env_ids[i] else "WRONG_ENVIRONMENT"

    async def close() -> None:
        await channel.close()

    return call, close


async def _health_caller(spec: LoadSpec) -> tuple[Call, Callable[[], Awaitable[None]]]:
    """grpc.health.v1 Check on the same server and channel kind: the RPC without the servicer."""
    channel = create_channel(spec.target, token=spec.token)
    client: Any = health_pb2_grpc.HealthStub(channel)  # the stubs have no methods typed
    request = health_pb2.HealthCheckRequest(service="")
    serving = health_pb2.HealthCheckResponse.SERVING

    async def call(_i: int) -> str | None:
        response = await client.Check(request)
        return None if response.status == serving else "NOT_SERVING"

    async def close() -> None:
        await channel.close()

    return call, close


async def _client_caller(spec: LoadSpec) -> tuple[Call, Callable[[], Awaitable[None]]]:
    """What a consumer service does: ControlPlaneClient.authenticate_api_key, answered by the
    client's cache once its WatchInvalidations subscription is live."""
    client = ControlPlaneClient(spec.target, token=spec.token)
    await client.start()
    if not client.subscribed.is_set():
        await client.close()
        raise RuntimeError("ControlPlaneClient did not subscribe to invalidations within 5 s")
    # Every key cached before the warm-up starts, however slow the machine: a miss in the
    # window can then only be an invalidation or an expiry, which the report shows.
    for key in dict.fromkeys(spec.api_keys):
        await client.authenticate_api_key(key)

    async def call(i: int) -> str | None:
        try:
            environment = await client.authenticate_api_key(spec.api_keys[i])
        except RunopsError as exc:
            return exc.reason
        # A cache hit completes without suspending: yield once per call so the other callers
        # and the window's timer run (a consumer's RPC handler pays this too).
        await asyncio.sleep(0)
        if not client.subscribed.is_set():
            return "UNSUBSCRIBED"  # the cache was off: not the path being measured
        return None if environment.id == spec.env_ids[i] else "WRONG_ENVIRONMENT"

    return call, client.close


async def _postgres_caller(spec: LoadSpec) -> tuple[Call, Callable[[], Awaitable[None]]]:
    digests = [hash_api_key(key) for key in spec.api_keys]
    pool = await asyncpg.create_pool(spec.dsn, min_size=spec.concurrency, max_size=spec.concurrency)

    async def call(i: int) -> str | None:
        row = await pool.fetchrow(spec.query, digests[i])
        if row is None:
            return "NOT_FOUND"
        return None if row["id"] == spec.env_ids[i] else "WRONG_ENVIRONMENT"

    async def close() -> None:
        await pool.close()

    return call, close


async def generate(
    spec: LoadSpec, mark: Callable[[str], Awaitable[None]], progress: Progress
) -> LoadResult:
    """C closed-loop callers, round-robin over the keys: `spec.warmup` seconds unmeasured, then
    `spec.seconds` measured. `await mark("start")` / `await mark("end")` bracket the measured
    window (the callers keep going meanwhile, so the servers are sampled under load)."""
    make = {
        "authenticate": _grpc_caller,
        "client": _client_caller,
        "health": _health_caller,
        "postgres": _postgres_caller,
    }[spec.kind]
    call, close = await make(spec)
    keys = len(spec.api_keys)
    turn = itertools.count()
    latencies: list[int] = []
    errors: Counter[str] = Counter()
    window = [sys.maxsize, sys.maxsize]  # perf_counter_ns bounds of the measured window
    stopped = False

    async def caller() -> None:
        while not stopped:
            i = next(turn) % keys
            began = time.perf_counter_ns()
            try:
                error = await call(i)
            except grpc.aio.AioRpcError as exc:
                error = exc.code().name
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                error = type(exc).__name__
            ended = time.perf_counter_ns()
            if error is not None:
                errors[error] += 1
            elif window[0] <= ended <= window[1]:
                latencies.append(ended - began)

    tasks = [asyncio.create_task(caller()) for _ in range(spec.concurrency)]
    try:
        await asyncio.sleep(spec.warmup)
        await mark("start")
        cache_before = _cache_lookups(CLIENT_CACHE_NAME)
        cpu_before = _cpu_seconds()
        start = time.perf_counter_ns()
        window[:] = [start, start + int(spec.seconds * 1e9)]
        while (left := (window[1] - time.perf_counter_ns()) / 1e9) > 0:
            await asyncio.sleep(min(PROGRESS_EVERY_SECONDS, left))
            elapsed = (time.perf_counter_ns() - start) / 1e9
            if elapsed < spec.seconds - 0.01:
                progress(
                    f"{spec.label}: {len(latencies):,} calls in {elapsed:.0f}s"
                    f" ({len(latencies) / elapsed:,.0f}/s), {sum(errors.values())} errors"
                )
        cpu_seconds = _cpu_seconds() - cpu_before
        cache_after = _cache_lookups(CLIENT_CACHE_NAME)
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
        calls=len(latencies),
        seconds=(window[1] - window[0]) / 1e9,
        errors=dict(errors),
        p50_ms=_percentile(latencies, 0.50),
        p99_ms=_percentile(latencies, 0.99),
        cpu_seconds=cpu_seconds,
        pid=os.getpid(),
        client_cache=(
            {r: round(cache_after[r] - cache_before[r]) for r in CACHE_RESULTS}
            if spec.kind == "client"
            else None
        ),
    )


def _loadgen_main() -> None:
    """The subprocess: the spec as a line on stdin; JSON lines on stdout: each mark, which
    waits for a line on stdin (the bench has sampled the servers), then the result."""
    spec = LoadSpec.from_json(sys.stdin.readline())

    async def mark(event: str) -> None:
        print(json.dumps({"event": event}), flush=True)
        await asyncio.to_thread(sys.stdin.readline)

    started = time.monotonic()

    def progress(line: str) -> None:
        elapsed = time.monotonic() - started
        print(f"[loadgen pid {os.getpid()} +{elapsed:4.1f}s] {line}", file=sys.stderr, flush=True)

    result = asyncio.run(generate(spec, mark, progress))
    print(json.dumps({"event": "result", "result": asdict(result)}), flush=True)


# -- the bench process: servers, samples around each window -------------------------------------


@dataclass(frozen=True)
class _Sample:
    own_cpu: float
    machine: tuple[int, int] | None  # busy, total jiffies of all CPUs
    replica_cpu: float | None  # the replica's postmaster and all its processes
    cache: dict[str, float]
    handled_ok: float


def _machine_jiffies() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal (guest time is already in user).
    values = [int(v) for v in fields[1:9]]
    idle = values[3] + values[4]
    total = sum(values)
    return total - idle, total


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from the state field on (field 3 is [0]), or None."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[1])


def _process_tree_cpu(root: int) -> float | None:
    """CPU seconds of `root` (with its reaped children) and of its live children: a postmaster
    and its backends, walreceiver, startup process..."""
    fields = _stat_fields(root)
    if fields is None:
        return None
    ticks = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and entry.name != str(root):
            child = _stat_fields(int(entry.name))
            if child is not None and child[1] == str(root):
                ticks += int(child[11]) + int(child[12])
    return ticks / os.sysconf("SC_CLK_TCK")


async def _local_postmaster(dsn: str) -> int | None:
    """The pid of the postmaster serving `dsn` when it runs on this machine, else None."""
    conn = await asyncpg.connect(dsn)
    try:
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        # While the connection is open: the backend exits with it.
        return _postgres_parent(backend) if isinstance(backend, int) else None
    finally:
        await conn.close()


def _postgres_parent(backend: int) -> int | None:
    """The parent of `backend` if it is a local postgres (not a server elsewhere that happens
    to share a pid with something here)."""
    postmaster = _parent_pid(backend)
    if postmaster is None:
        return None
    try:
        with open(f"/proc/{postmaster}/comm") as comm:
            name = comm.read().strip()
        with open(f"/proc/{backend}/comm") as comm:
            backend_name = comm.read().strip()
    except OSError:
        return None
    return postmaster if name.startswith("postgres") and backend_name == "postgres" else None


def _sample(replica: int | None) -> _Sample:
    return _Sample(
        own_cpu=_cpu_seconds(),
        machine=_machine_jiffies(),
        replica_cpu=None if replica is None else _process_tree_cpu(replica),
        cache=_cache_lookups(CACHE_NAME),
        handled_ok=_metric("grpc_server_handled_total", HANDLED_OK),
    )


async def _in_subprocess(
    spec: LoadSpec, replica: int | None
) -> tuple[LoadResult, dict[str, _Sample]]:
    result, marks = await drive(MODULE, spec.to_json(), lambda: _sample(replica), spec.label)
    return LoadResult(**result), marks


@dataclass(frozen=True)
class Phase:
    name: str
    calls: int  # successful calls completed inside the measured window
    seconds: float
    errors: dict[str, int]  # failed calls by status (warm-up included); empty: all succeeded
    p50_ms: float
    p99_ms: float
    # CPU over the window, in cores: the bench process (the control plane, and the client too
    # when in-process), the load-generator subprocess, the replica's Postgres processes, and the
    # whole machine. None: not measurable here (no /proc, a replica on another host).
    bench_cores: float
    loadgen_cores: float | None
    replica_cores: float | None
    machine_cores: float | None
    # Over the window: the API-key cache that answers the phase (the control plane's; the
    # client's own for the client phase) and the control plane's AuthenticateApiKey OK count,
    # i.e. the calls that reached it (None for the floor, which touches neither).
    cache_hits: int | None = None
    cache_misses: int | None = None  # each one an indexed lookup on the replica
    cache_shared: int | None = None  # joined a lookup of the same key already in flight
    server_ok: int | None = None

    @property
    def per_second(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0

    @property
    def rest_cores(self) -> float | None:
        """Everything else the machine ran meanwhile: the writer, Redis, moto, other work."""
        if self.machine_cores is None or self.replica_cores is None:
            return None
        own = self.bench_cores + (self.loadgen_cores or 0.0) + self.replica_cores
        return max(0.0, self.machine_cores - own)


async def _phase(
    spec: LoadSpec,
    loadgen: LoadgenMode,
    progress: Progress,
    *,
    server: bool,
    replica: int | None,
) -> tuple[Phase, int]:
    progress(f"{spec.label}: {spec.warmup:.1f}s warm-up, then {spec.seconds:.1f}s measured")
    if loadgen == "subprocess":
        result, marks = await _in_subprocess(spec, replica)
    else:
        marks = {}

        async def mark(event: str) -> None:
            marks[event] = _sample(replica)

        result = await generate(spec, mark, progress)
    start, end = marks["start"], marks["end"]
    seconds = result.seconds
    machine = None
    if start.machine is not None and end.machine is not None:
        busy, total = (e - s for s, e in zip(start.machine, end.machine, strict=True))
        machine = busy / total * (os.cpu_count() or 1) if total > 0 else None

    def delta(key: str) -> int | None:
        if result.client_cache is not None:
            return result.client_cache[key]
        return round(end.cache[key] - start.cache[key]) if server else None

    phase = Phase(
        name=spec.label,
        calls=result.calls,
        seconds=seconds,
        errors=result.errors,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        bench_cores=(end.own_cpu - start.own_cpu) / seconds,
        loadgen_cores=result.cpu_seconds / seconds if loadgen == "subprocess" else None,
        replica_cores=(
            None
            if start.replica_cpu is None or end.replica_cpu is None
            else (end.replica_cpu - start.replica_cpu) / seconds
        ),
        machine_cores=machine,
        cache_hits=delta("hit"),
        cache_misses=delta("miss"),
        cache_shared=delta("shared"),
        server_ok=round(end.handled_ok - start.handled_ok) if server else None,
    )
    progress(f"{spec.label}: {phase.per_second:,.0f}/s, p50 {phase.p50_ms:.2f} ms")
    return phase, result.pid


@dataclass(frozen=True)
class BenchResult:
    seconds: float
    warmup: float
    concurrency: int
    keys: int
    loadgen: LoadgenMode
    cpus: int
    bench_pid: int
    loadgen_pids: tuple[int, ...]
    floor: Phase
    cached: Phase
    health: Phase  # the kit's RPC path alone: grpc.health.v1 Check on the cached control plane
    client: Phase  # ControlPlaneClient.authenticate_api_key against the cached control plane
    uncached: Phase
    cached_entries: int  # API keys in the cached control plane's cache after its phase

    @property
    def ratio(self) -> float:
        """Cached gRPC calls/s over raw Postgres lookups/s."""
        return self.cached.per_second / self.floor.per_second

    @property
    def uncached_ratio(self) -> float:
        return self.uncached.per_second / self.floor.per_second

    @property
    def cache_speedup(self) -> float:
        return self.cached.per_second / self.uncached.per_second

    @property
    def client_ratio(self) -> float:
        """Client-cached calls/s over raw Postgres lookups/s (spec §7: at least 10x)."""
        return self.client.per_second / self.floor.per_second

    @property
    def client_speedup(self) -> float:
        """The client's local cache against the control plane's cache behind an RPC."""
        return self.client.per_second / self.cached.per_second

    @property
    def rpc_share(self) -> float:
        """Cached calls/s over health checks/s on the same server: how close the cached path
        gets to the cost of an RPC that does nothing."""
        return self.cached.per_second / self.health.per_second

    def report(self) -> str:
        def cores(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}"

        lines = [
            f"AuthenticateApiKey vs raw Postgres lookup: {self.concurrency} concurrent callers,"
            f" {self.keys} keys round-robin, {self.seconds:g}s measured per phase after"
            f" {self.warmup:g}s warm-up, {self.cpus} CPUs, load generator: {self.loadgen}",
            "",
            f"{'phase':<34}{'calls/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'calls':>11}{'errors':>7}"
            f"   cores: {'bench':>5}{'loadgen':>8}{'replica':>8}{'rest':>6}{'machine':>8}",
        ]
        for phase in (self.client, self.cached, self.uncached, self.health, self.floor):
            lines.append(
                f"{phase.name:<34}{phase.per_second:>9,.0f}{phase.p50_ms:>8.2f}"
                f"{phase.p99_ms:>8.2f}{phase.calls:>11,}{sum(phase.errors.values()):>7}"
                f"          {cores(phase.bench_cores):>5}{cores(phase.loadgen_cores):>8}"
                f"{cores(phase.replica_cores):>8}{cores(phase.rest_cores):>6}"
                f"{cores(phase.machine_cores):>8}"
            )
        cached, uncached, local = self.cached, self.uncached, self.client
        target = "meets" if self.client_ratio >= 10 else "BELOW"
        lines += [
            "",
            f"client cached / floor: {self.client_ratio:.1f}x ({target} the spec's 10x)"
            f"    client cached / grpc cached: {self.client_speedup:.1f}x",
            f"cached / floor: {self.ratio:.2f}x    uncached / floor: {self.uncached_ratio:.2f}x"
            f"    cached / uncached: {self.cache_speedup:.2f}x"
            f"    cached / health check: {self.rpc_share:.2f}x",
            f"cache over the window: cached {cached.cache_hits:,} hits, {cached.cache_misses:,}"
            f" misses ({self.cached_entries} keys held); uncached {uncached.cache_hits:,} hits,"
            f" {uncached.cache_misses:,} misses (= replica lookups), {uncached.cache_shared:,}"
            f" joined a lookup in flight; client's own cache {local.cache_hits:,} hits,"
            f" {local.cache_misses:,} misses",
            f"server-side OK AuthenticateApiKey over the window: cached {cached.server_ok:,},"
            f" uncached {uncached.server_ok:,}, client {local.server_ok:,} (client-side:"
            f" {cached.calls:,} / {uncached.calls:,} / {local.calls:,})",
            "",
            "who did what:",
            f"  pid {self.bench_pid} (bench): the local stack's driver; the control plane (grpc.aio"
            f" server, its cache, its asyncpg pools of <= {self.concurrency} to the replica),"
            " one at a time: cached (+ health check, client), then uncached; idle during the"
            " floor",
        ]
        pids = ", ".join(str(p) for p in self.loadgen_pids)
        client = (
            f"grpc.aio client (one channel, runops create_channel, internal token) with"
            f" {self.concurrency} coroutines; for the floor an asyncpg pool of {self.concurrency}"
            " on the replica; for the client phase a ControlPlaneClient (its cache and its"
            " WatchInvalidations subscription) on such a channel"
        )
        if self.loadgen == "subprocess":
            lines.append(f"  pids {pids} (load generator, one subprocess per phase): {client}")
        else:
            lines.append(f"  pid {self.bench_pid} also ran the load generator in-process: {client}")
        lines += [
            "  postgres (own processes): the replica's backends serve the uncached and floor"
            " lookups",
            "  cores = CPU time over the window / its length: bench and loadgen processes, the"
            " replica's postgres processes, the rest of the machine (writer, Redis, moto, anything"
            " else running), and all CPUs busy",
        ]
        return "\n".join(lines)


async def _seed(target: str, keys: int) -> list[tuple[str, str]]:
    """`keys` fresh organizations with one environment each: (environment id, its API key)."""
    from runops.cli.admin import bootstrap
    from runops.localstack.settings import ADMIN_TOKEN

    limit = asyncio.Semaphore(SEED_CONCURRENCY)
    async with create_channel(target, token=ADMIN_TOKEN) as channel:
        admin = cp_grpc.ControlPlaneServiceStub(channel)

        async def one() -> tuple[str, str]:
            async with limit:
                created = await bootstrap(admin, f"bench-{secrets.token_hex(4)}")
            environment, api_key = created.environments[0]
            return environment.id, api_key

        return list(await asyncio.gather(*(one() for _ in range(keys))))


async def _start_control_plane(stack: LocalStack, pool_size: int, **values: Any) -> ControlPlane:
    """A control plane in this process (its cache and metrics are read here), its pools as large
    as the floor's so uncached vs floor is fair."""
    from runops.localstack.settings import ADMIN_TOKEN, database, in_process_settings
    from services.controlplane.app import build_control_plane
    from services.controlplane.settings import ControlPlaneSettings

    settings = in_process_settings(
        ControlPlaneSettings,
        admin_token=ADMIN_TOKEN,
        controlplane_db=database(stack.controlplane_db, pool_max_size=pool_size),
        health_check_interval_seconds=1.0,
        **values,
    )
    plane = await build_control_plane(settings)
    await plane.app.start()
    return plane


async def _stopped(plane: ControlPlane) -> None:
    await plane.app.stop(grace=1)


async def run(
    stack: LocalStack,
    seconds: float = 10.0,
    concurrency: int = 16,
    keys: int = 64,
    *,
    loadgen: LoadgenMode = "subprocess",
    progress: Progress | None = None,
) -> BenchResult:
    """Seed `keys` environments, then measure the floor, the cached path, the bare RPC (health
    check) and ControlPlaneClient's cached path on the same server, and the uncached path."""
    from runops.localstack.settings import INTERNAL_TOKEN
    from services.controlplane.store import SELECT_BY_KEY_HASH

    say: Progress = progress or (lambda _line: None)
    warmup = warmup_for(seconds)
    pool_size = min(concurrency, 200)
    pids: list[int] = []
    plane = await _start_control_plane(stack, pool_size)
    try:
        say(f"control plane (cached) serving on {plane.app.target}; seeding {keys} environments")
        seeded = await _seed(plane.app.target, keys)
        await stack.controlplane_db.wait_for_replica()
        replica = await _local_postmaster(stack.controlplane_db.replica_dsn)

        async def measure(kind: Kind, label: str, *, server: bool, **where: str) -> Phase:
            spec = LoadSpec(
                kind=kind,
                label=label,
                seconds=seconds,
                warmup=warmup,
                concurrency=concurrency,
                api_keys=tuple(api_key for _, api_key in seeded),
                env_ids=tuple(env_id for env_id, _ in seeded),
                **where,
            )
            phase, pid = await _phase(spec, loadgen, say, server=server, replica=replica)
            pids.append(pid)
            return phase

        floor = await measure(
            "postgres", "postgres floor (asyncpg, replica)", server=False,
            dsn=stack.controlplane_db.replica_dsn, query=SELECT_BY_KEY_HASH,
        )  # fmt: skip
        grpc_at = {"target": plane.app.target, "token": INTERNAL_TOKEN}
        cached = await measure("authenticate", "grpc cached", server=True, **grpc_at)
        cached_entries = len(plane.cache.api_keys)
        health = await measure("health", "grpc health check (same server)", server=False, **grpc_at)
        client = await measure(
            "client", "client cached (ControlPlaneClient)", server=True, **grpc_at
        )
    finally:
        await _stopped(plane)
    plane = await _start_control_plane(stack, pool_size, **UNCACHED_SETTINGS)
    try:
        say(f"control plane (uncached: 1 us TTL, 1 entry) serving on {plane.app.target}")
        grpc_at = {"target": plane.app.target, "token": INTERNAL_TOKEN}
        uncached = await measure("authenticate", "grpc uncached", server=True, **grpc_at)
    finally:
        await _stopped(plane)
    return BenchResult(
        seconds=seconds,
        warmup=warmup,
        concurrency=concurrency,
        keys=keys,
        loadgen=loadgen,
        cpus=os.cpu_count() or 1,
        bench_pid=os.getpid(),
        loadgen_pids=tuple(dict.fromkeys(pids)),
        floor=floor,
        cached=cached,
        health=health,
        client=client,
        uncached=uncached,
        cached_entries=cached_entries,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per phase")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent callers")
    parser.add_argument("--keys", type=int, default=64, help="seeded API keys, round-robin")
    parser.add_argument(
        "--loadgen",
        choices=("subprocess", "inprocess"),
        default="subprocess",
        help="where the client side runs (default: a subprocess)",
    )
    parser.add_argument("--loadgen-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.loadgen_worker:
        _loadgen_main()
        return
    if args.seconds <= 0 or args.concurrency < 1 or args.keys < 1:
        parser.error("--seconds must be > 0, --concurrency and --keys >= 1")
    from runops.kit.logging import configure_logging
    from runops.localstack import LocalStack, printing_progress

    configure_logging("warning", "console")
    say = printing_progress("bench")
    with LocalStack(None, progress=say) as stack:
        result = asyncio.run(
            run(
                stack,
                args.seconds,
                args.concurrency,
                args.keys,
                loadgen=args.loadgen,
                progress=say,
            )
        )
    # After the stack stopped: the figures are the last thing printed.
    print(result.report(), flush=True)


if __name__ == "__main__":
    main()
