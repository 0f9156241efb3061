"""Wiring: Redis, the run-store and control-plane clients, the core (buffer, gate, claims), the
servicer, and the background work (drainer unless it runs as its own process, stale sweeper).

Redis is deliberately NOT a health dependency of the service: triggers fail open to the run
store while Redis is down, so taking every mollifier out of its load balancer then would turn a
degraded buffer into an outage. The run store is (every trigger ends there; `builders.py`). The
control plane is not: its answers are cached. The drainer process
(`python -m services.mollifier.drainer`, `drainer/app.py`) does depend on Redis.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from runops.controlplane.client import ControlPlaneClient
from runops.controlplane.defaults import TaskDefaults
from runops.kit.downstream import Downstream
from runops.kit.ids import IdMinter
from runops.kit.redis import RedisClient, create_redis, warm_up
from runops.kit.server import ServiceApp
from runops.mollifier.v1 import mollifier_pb2, mollifier_pb2_grpc
from runops.runstore.client import RunStoreClient
from services.mollifier.buffer import MollifierBuffer
from services.mollifier.builders import (
    buffer_of,
    drainer_of,
    run_store_client,
    sweeper_of,
)
from services.mollifier.claim_store import ClaimStore
from services.mollifier.claims import IdempotencyClaims
from services.mollifier.create_batcher import CreateBatcher
from services.mollifier.drainer.drainer import Drainer
from services.mollifier.gate import Gate
from services.mollifier.policy import Policies
from services.mollifier.runs import BufferedRuns
from services.mollifier.service import MollifierServicer
from services.mollifier.settings import MollifierSettings
from services.mollifier.trigger import TriggerFront

SERVICE = mollifier_pb2.DESCRIPTOR.services_by_name["MollifierService"]


def control_plane_client(app: ServiceApp, settings: MollifierSettings) -> ControlPlaneClient:
    """Not a health dependency: policies and task defaults are cached."""

    def client(target: str, *, channel: grpc.aio.Channel) -> ControlPlaneClient:
        return ControlPlaneClient(
            target, channel=channel, cache_ttl_seconds=settings.controlplane_cache_ttl_seconds
        )

    return Downstream.connect(
        "controlplane",
        settings.controlplane_target,
        client,
        token=settings.internal_token,
        health=False,
    ).attach(app)


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
    control_plane = control_plane_client(app, settings)
    # Its invalidation feed runs with the server; uncached (a round trip each) until it is up.
    app.add_background(control_plane.watch, ready_timeout=5.0)

    buffer = buffer_of(redis, settings)
    gate = Gate(
        buffer.scripts,
        prefix=settings.key_prefix,
        threshold=settings.gate_threshold,
        window_seconds=settings.gate_window_seconds,
        hold_seconds=settings.gate_hold_seconds,
    )
    policies = Policies(
        control_plane, enabled=settings.mollifier_enabled, shadow_mode=settings.shadow_mode
    )
    runs = BufferedRuns(buffer, run_store)
    claim_store = ClaimStore(
        buffer.scripts,
        prefix=settings.key_prefix,
        min_ttl_seconds=settings.claim_ttl_min_seconds,
        max_ttl_seconds=settings.claim_ttl_max_seconds,
        batch_size=settings.claim_batch_size,
    )
    claims = IdempotencyClaims(
        claim_store,
        buffer,
        runs,
        wait_seconds=settings.claim_wait_seconds,
        poll_interval_seconds=settings.claim_poll_interval_seconds,
        lookup_chunk=1000,
    )
    front = TriggerFront(
        policies=policies,
        buffer=buffer,
        gate=gate,
        claims=claims,
        runs=runs,
        run_store=run_store,
        creates=CreateBatcher(
            run_store,
            max_runs=settings.create_batch_max_runs,
            max_wait_seconds=settings.create_batch_max_wait_seconds,
        ),
        minter=IdMinter(database_split=settings.runstore_split),
        defaults=TaskDefaults(control_plane),
    )
    servicer = MollifierServicer(policies, front, runs, claims)
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
