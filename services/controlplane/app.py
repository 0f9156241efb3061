"""Wiring: pools, cache, invalidation feed and servicer on the kit's ServiceApp."""

from __future__ import annotations

import asyncio

import asyncpg
import structlog

from runops.controlplane.cache import ControlPlaneCache
from runops.controlplane.v1 import controlplane_pb2, controlplane_pb2_grpc
from runops.kit.replica import ReplicaRouter
from runops.kit.server import ServiceApp
from services.controlplane.invalidation import InvalidationHub, InvalidationListener, Publisher
from services.controlplane.service import ControlPlaneServicer
from services.controlplane.settings import ControlPlaneSettings
from services.controlplane.store import ControlPlaneStore

log = structlog.get_logger("runops.controlplane")

# Each RPC's access level (internal resolves, admin writes) is declared in the contract.
SERVICE = controlplane_pb2.DESCRIPTOR.services_by_name["ControlPlaneService"]


async def _pool(dsn: str, settings: ControlPlaneSettings) -> asyncpg.Pool:
    # min_size 0 by default: the service starts (NOT_SERVING) even while the database is down.
    return await asyncpg.create_pool(
        dsn,
        min_size=settings.db_pool_min_size,
        max_size=settings.db_pool_max_size,
        command_timeout=settings.db_statement_timeout_seconds + 1,
        server_settings={
            "statement_timeout": str(int(settings.db_statement_timeout_seconds * 1000)),
            "application_name": "runops-controlplane",
        },
    )


class ControlPlane:
    """The parts of one control-plane process, reachable from tests and benchmarks."""

    def __init__(
        self, settings: ControlPlaneSettings, writer: asyncpg.Pool, replica: asyncpg.Pool | None
    ) -> None:
        self.app = ServiceApp("controlplane", settings)
        self.cache = ControlPlaneCache(
            "controlplane",
            ttl_seconds=settings.cache_ttl_seconds,
            max_entries=settings.cache_max_entries,
        )
        # Nothing is cached until the invalidation feed listens.
        self.cache.enabled = False
        self.router = ReplicaRouter(writer, replica)
        self.publisher = Publisher(self.cache)
        self.hub = InvalidationHub(settings.watch_queue_size)
        self.listener = InvalidationListener(settings.writer_dsn, self.cache, self.router, self.hub)
        self.store = ControlPlaneStore(self.router, self.publisher)
        self.servicer = ControlPlaneServicer(self.store, self.cache, self.hub)

        app = self.app
        app.add_service(
            SERVICE, controlplane_pb2_grpc.add_ControlPlaneServiceServicer_to_server, self.servicer
        )
        app.add_dependency("controlplane-db", lambda: writer.fetchval("SELECT 1"))
        # Start-up waits for the feed (serving uncached after the timeout, until it is up).
        app.add_background(self.listener.feed, ready_timeout=settings.feed_start_timeout_seconds)
        # Watch streams end as soon as shutdown begins; clients resubscribe elsewhere.
        app.on_stopping(self.hub.close)
        app.on_shutdown(self._close)

    async def _close(self) -> None:
        await self.listener.stop()
        pools = {self.router.writer, self.router.replica} - {None}
        await asyncio.gather(*(pool.close() for pool in pools if pool is not None))


async def build_control_plane(settings: ControlPlaneSettings) -> ControlPlane:
    writer = await _pool(settings.writer_dsn, settings)
    replica = None
    if settings.controlplane_db_replica_url is not None:
        replica = await _pool(settings.replica_dsn, settings)
    return ControlPlane(settings, writer, replica)


async def build_app(settings: ControlPlaneSettings) -> ServiceApp:
    return (await build_control_plane(settings)).app
