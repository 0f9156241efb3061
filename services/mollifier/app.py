"""Wiring: Redis, the run-store and control-plane clients, the core (buffer, gate, claims), the
servicer, and the background work (drainer unless it runs as its own process, stale sweeper).

Redis is deliberately NOT a health dependency of the service: triggers fail open to the run
store while Redis is down, so taking every mollifier out of its load balancer then would turn a
degraded buffer into an outage. The run store is (every trigger ends there). The drainer
process (`python -m services.mollifier.drainer`, `drainer_app.py`) does depend on Redis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

from runops.controlplane.client import ControlPlaneClient
from runops.kit.backoff import ExponentialBackoff
from runops.kit.channels import create_channel
from runops.kit.ids import IdMinter
from runops.kit.redis import RedisClient, create_redis, warm_up
from runops.kit.server import ServiceApp
from runops.mollifier.v1 import mollifier_pb2, mollifier_pb2_grpc
from runops.runstore.client import RunStoreClient
from services.mollifier.buffer import MollifierBuffer
from services.mollifier.claims import IdempotencyClaims
from services.mollifier.drainer import Drainer
from services.mollifier.gate import Gate
from services.mollifier.key_claims import KeyClaims
from services.mollifier.policy import Policies
from services.mollifier.runs import BufferedRuns
from services.mollifier.service import MollifierServicer
from services.mollifier.settings import MollifierSettings
from services.mollifier.sweeper import StaleSweeper
from services.mollifier.trigger import TriggerFront
from services.mollifier.writer import RunStoreWriter

SERVICE = mollifier_pb2.DESCRIPTOR.services_by_name["MollifierService"]


def internal_token(settings: MollifierSettings) -> str | None:
    token = settings.internal_token
    return token.get_secret_value() if token is not None else None


def run_store_client(app: ServiceApp, settings: MollifierSettings) -> RunStoreClient:
    """The run-store client (closed after the drain) and its health as a dependency."""
    channel = create_channel(settings.runstore_target, token=internal_token(settings))
    client = RunStoreClient(settings.runstore_target, channel=channel)
    health: Any = health_pb2_grpc.HealthStub(channel)  # the stubs type only sync channels

    async def check() -> None:
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise ConnectionError("the run store is not SERVING")

    app.add_dependency("runstore", check)
    app.on_shutdown(channel.close)
    return client


def buffer_of(redis: RedisClient, settings: MollifierSettings) -> MollifierBuffer:
    return MollifierBuffer(
        redis, prefix=settings.key_prefix, ack_grace_seconds=settings.ack_grace_seconds
    )


def drainer_of(
    buffer: MollifierBuffer, run_store: RunStoreClient, settings: MollifierSettings
) -> Drainer:
    return Drainer(
        buffer,
        RunStoreWriter(run_store),
        batch_size=settings.drain_batch_size,
        env_batch_size=settings.drain_env_batch_size,
        max_attempts=settings.drain_max_attempts,
        backoff=ExponentialBackoff(
            base=settings.drain_backoff_base_seconds, cap=settings.drain_backoff_cap_seconds
        ),
        visibility_timeout_seconds=settings.drain_visibility_timeout_seconds,
        recovery_interval_seconds=settings.drain_recovery_interval_seconds,
        idle_seconds=settings.drain_idle_seconds,
        pipeline_depth=settings.drain_pipeline_depth,
    )


def sweeper_of(buffer: MollifierBuffer, settings: MollifierSettings) -> StaleSweeper:
    return StaleSweeper(
        buffer,
        threshold_seconds=settings.stale_threshold_seconds,
        interval_seconds=settings.sweep_interval_seconds,
        lease_seconds=settings.sweep_lease_seconds,
    )


@dataclass
class Mollifier:
    """The parts of one mollifier process, reachable from tests and benchmarks."""

    app: ServiceApp
    settings: MollifierSettings
    redis: RedisClient
    buffer: MollifierBuffer
    gate: Gate
    claims: IdempotencyClaims
    runs: BufferedRuns
    front: TriggerFront
    run_store: RunStoreClient
    control_plane: ControlPlaneClient
    drainer: Drainer | None


async def build_mollifier(settings: MollifierSettings, *, name: str = "mollifier") -> Mollifier:
    app = ServiceApp(name, settings)
    redis = create_redis(settings.redis)
    app.on_startup(lambda: warm_up(redis))
    app.on_shutdown(redis.aclose)
    run_store = run_store_client(app, settings)
    control_plane = ControlPlaneClient(
        settings.controlplane_target,
        token=internal_token(settings),
        cache_ttl_seconds=settings.controlplane_cache_ttl_seconds,
    )
    # Its invalidation feed runs with the server; uncached (a round trip each) until it is up.
    app.add_background(control_plane.watch, ready_timeout=5.0)
    app.on_shutdown(control_plane.close)

    buffer = buffer_of(redis, settings)
    gate = Gate(
        buffer.scripts,
        prefix=settings.key_prefix,
        threshold=settings.gate_threshold,
        window_seconds=settings.gate_window_seconds,
        hold_seconds=settings.gate_hold_seconds,
    )
    claims = IdempotencyClaims(
        redis,
        buffer.scripts,
        prefix=settings.key_prefix,
        min_ttl_seconds=settings.claim_ttl_min_seconds,
        max_ttl_seconds=settings.claim_ttl_max_seconds,
        wait_seconds=settings.claim_wait_seconds,
        poll_interval_seconds=settings.claim_poll_interval_seconds,
        batch_size=settings.claim_batch_size,
    )
    policies = Policies(
        control_plane, enabled=settings.mollifier_enabled, shadow_mode=settings.shadow_mode
    )
    runs = BufferedRuns(buffer, run_store)
    front = TriggerFront(
        policies=policies,
        buffer=buffer,
        gate=gate,
        claims=claims,
        runs=runs,
        run_store=run_store,
        minter=IdMinter(database_split=settings.runstore_split),
    )
    servicer = MollifierServicer(
        policies, front, runs, KeyClaims(claims, buffer, runs, lookup_chunk=1000)
    )
    app.add_service(SERVICE, mollifier_pb2_grpc.add_MollifierServiceServicer_to_server, servicer)

    drainer = None
    if settings.drainer_enabled:
        drainer = drainer_of(buffer, run_store, settings)
        app.add_background(drainer.worker())
    app.add_background(sweeper_of(buffer, settings).worker())
    return Mollifier(
        app, settings, redis, buffer, gate, claims, runs, front, run_store, control_plane, drainer
    )


async def build_app(settings: MollifierSettings) -> ServiceApp:
    return (await build_mollifier(settings)).app
