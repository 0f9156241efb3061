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

import asyncio
import os
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import asyncpg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from runops.bench import proc, profile, program
from runops.bench.loadgen import (
    Call,
    Close,
    LoadResult,
    Mark,
    Mismatch,
    Spec,
    closed_loop,
    run_worker,
    warmup_for,
    worker,
)
from runops.bench.report import cores
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
SEED_CONCURRENCY = 8


# -- the load generator (in this process or in a subprocess) ------------------------------------


@dataclass(frozen=True)
class LoadSpec(Spec):
    """One run of this benchmark's load generator."""

    kind: Kind
    api_keys: tuple[str, ...]
    env_ids: tuple[str, ...]
    target: str = ""  # grpc
    token: str = ""  # grpc
    dsn: str = ""  # postgres
    query: str = ""  # postgres: the service's SELECT_BY_KEY_HASH


def _metric(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _cache_lookups(cache: str) -> dict[str, float]:
    return {
        result: _metric("runops_cache_lookups_total", {"cache": cache, "result": result})
        for result in CACHE_RESULTS
    }


async def _grpc_caller(spec: LoadSpec) -> tuple[Call, Close]:
    channel = create_channel(spec.target, token=spec.token)
    client = cp_grpc.ControlPlaneServiceStub(channel)
    requests = [cp.AuthenticateApiKeyRequest(api_key=key) for key in spec.api_keys]

    async def call(n: int) -> int:
        i = n % len(requests)
        response = await client.AuthenticateApiKey(requests[i])
        return _checked(response.environment.id, spec.env_ids[i])

    async def close() -> None:
        await channel.close()

    return call, close


def _checked(environment_id: str, expected: str) -> int:
    """One successful call, if it answered the key's own environment."""
    if environment_id != expected:
        raise Mismatch(f"environment {environment_id}, not {expected}", "WRONG_ENVIRONMENT")
    return 1


async def _health_caller(spec: LoadSpec) -> tuple[Call, Close]:
    """grpc.health.v1 Check on the same server and channel kind: the RPC without the servicer."""
    channel = create_channel(spec.target, token=spec.token)
    client: Any = health_pb2_grpc.HealthStub(channel)  # the stubs have no methods typed
    request = health_pb2.HealthCheckRequest(service="")
    serving = health_pb2.HealthCheckResponse.SERVING

    async def call(_n: int) -> int:
        response = await client.Check(request)
        if response.status != serving:
            raise Mismatch(f"health status {response.status}", "NOT_SERVING")
        return 1

    async def close() -> None:
        await channel.close()

    return call, close


async def _client_caller(spec: LoadSpec) -> tuple[Call, Close]:
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

    async def call(n: int) -> int:
        i = n % len(spec.api_keys)
        try:
            environment = await client.authenticate_api_key(spec.api_keys[i])
        except RunopsError as exc:
            raise Mismatch(str(exc), exc.reason) from exc
        # A cache hit completes without suspending: yield once per call so the other callers
        # and the window's timer run (a consumer's RPC handler pays this too).
        await asyncio.sleep(0)
        if not client.subscribed.is_set():
            # The cache was off: not the path being measured.
            raise Mismatch("the invalidation subscription dropped", "UNSUBSCRIBED")
        return _checked(environment.id, spec.env_ids[i])

    return call, client.close


async def _postgres_caller(spec: LoadSpec) -> tuple[Call, Close]:
    digests = [hash_api_key(key) for key in spec.api_keys]
    pool = await asyncpg.create_pool(spec.dsn, min_size=spec.concurrency, max_size=spec.concurrency)

    async def call(n: int) -> int:
        i = n % len(digests)
        row = await pool.fetchrow(spec.query, digests[i])
        if row is None:
            raise Mismatch("no environment for the key", "NOT_FOUND")
        return _checked(row["id"], spec.env_ids[i])

    async def close() -> None:
        await pool.close()

    return call, close


async def generate(spec: LoadSpec, mark: Mark, progress: Progress) -> LoadResult:
    """C closed-loop callers, round-robin over the keys (`closed_loop`); for the client
    phase, its own cache's lookups over the window in `figures`."""
    make = {
        "authenticate": _grpc_caller,
        "client": _client_caller,
        "health": _health_caller,
        "postgres": _postgres_caller,
    }[spec.kind]
    call, close = await make(spec)
    lookups: dict[str, dict[str, float]] = {}

    async def marked(event: str) -> None:
        # The client's cache counters, read inside the window's edges.
        if event == "end":
            lookups[event] = _cache_lookups(CLIENT_CACHE_NAME)
        await mark(event)
        if event == "start":
            lookups[event] = _cache_lookups(CLIENT_CACHE_NAME)

    result = await closed_loop(spec, call, close, marked, progress, unit="calls")
    if spec.kind != "client":
        return result
    start, end = lookups["start"], lookups["end"]
    return replace(result, figures={r: round(end[r] - start[r]) for r in CACHE_RESULTS})


async def _work(spec_json: str, mark: Mark, progress: Progress) -> dict[str, Any]:
    return asdict(await generate(LoadSpec.from_json(spec_json), mark, progress))


# -- the bench process: servers, samples around each window -------------------------------------


@dataclass(frozen=True)
class _Sample:
    own_cpu: float
    machine: tuple[int, int] | None  # busy, total jiffies of all CPUs
    replica_cpu: float | None  # the replica's postmaster and all its processes
    cache: dict[str, float]
    handled_ok: float


def _sample(replica: int | None) -> _Sample:
    return _Sample(
        own_cpu=proc.own_cpu_seconds(),
        machine=proc.machine_jiffies(),
        replica_cpu=None if replica is None else proc.process_tree_cpu(replica),
        cache=_cache_lookups(CACHE_NAME),
        handled_ok=_metric("grpc_server_handled_total", HANDLED_OK),
    )


async def _in_subprocess(
    spec: LoadSpec, replica: int | None
) -> tuple[LoadResult, dict[str, _Sample]]:
    return await run_worker(MODULE, spec, lambda: _sample(replica))


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

    def delta(key: str) -> int | None:
        if spec.kind == "client":
            return round(result.figures[key])
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
        machine_cores=proc.machine_cores(start.machine, end.machine),
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
    say: Progress = progress or (lambda _line: None)
    # The control planes run in this process: it is what `--profile` records as the service.
    watched = profile.watching("controlplane (bench process)", os.getpid())
    with watched:
        return await _measure(stack, seconds, concurrency, keys, loadgen, say)


async def _measure(
    stack: LocalStack, seconds: float, concurrency: int, keys: int, loadgen: LoadgenMode,
    say: Progress,
) -> BenchResult:  # fmt: skip
    from runops.localstack.settings import INTERNAL_TOKEN
    from services.controlplane.store import SELECT_BY_KEY_HASH

    warmup = warmup_for(seconds)
    pool_size = min(concurrency, 200)
    pids: list[int] = []
    plane = await _start_control_plane(stack, pool_size)
    try:
        say(f"control plane (cached) serving on {plane.app.target}; seeding {keys} environments")
        seeded = await _seed(plane.app.target, keys)
        await stack.controlplane_db.wait_for_replica()
        replica = await proc.local_postmaster(stack.controlplane_db.replica_dsn)

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
    parser = program.parser(MODULE, __doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per phase")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent callers")
    parser.add_argument("--keys", type=int, default=64, help="seeded API keys, round-robin")
    parser.add_argument(
        "--loadgen",
        choices=("subprocess", "inprocess"),
        default="subprocess",
        help="where the client side runs (default: a subprocess)",
    )
    args = parser.parse_args(argv)
    if args.loadgen_worker:
        worker(_work)
        return
    if args.seconds <= 0 or args.concurrency < 1 or args.keys < 1:
        parser.error("--seconds must be > 0, --concurrency and --keys >= 1")
    result = program.on_local_stack(
        lambda stack, say: run(
            stack, args.seconds, args.concurrency, args.keys, loadgen=args.loadgen, progress=say
        )
    )
    print(result.report(), flush=True)


if __name__ == "__main__":
    main()
