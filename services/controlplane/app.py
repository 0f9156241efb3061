"""Wiring: pools, cache and its reads, invalidation feed and servicer on the kit's ServiceApp."""

from __future__ import annotations

import structlog

from runops.controlplane.cache import ControlPlaneCache
from runops.controlplane.v1 import controlplane_pb2, controlplane_pb2_grpc
from runops.kit.postgres import open_database
from runops.kit.replica import ReplicaRouter
from runops.kit.server import ServiceApp
from services.controlplane.invalidation import InvalidationHub, InvalidationListener, Publisher
from services.controlplane.reads import CachedReads
from services.controlplane.service import ControlPlaneServicer
from services.controlplane.settings import ControlPlaneSettings
from services.controlplane.store import ControlPlaneStore

log = structlog.get_logger("runops.controlplane")

# Each RPC's access level (internal resolves, admin writes) is declared in the contract.
SERVICE = controlplane_pb2.DESCRIPTOR.services_by_name["ControlPlaneService"]


class ControlPlane:
    """The parts of one control-plane process, reachable from tests and benchmarks."""

    def __init__(
        self, app: ServiceApp, settings: ControlPlaneSettings, router: ReplicaRouter
    ) -> None:
        self.app = app
        self.cache = ControlPlaneCache(
            "controlplane",
            ttl_seconds=settings.cache_ttl_seconds,
            max_entries=settings.cache_max_entries,
        )
        # Nothing is cached until the invalidation feed listens.
        self.cache.enabled = False
        self.router = router
        self.publisher = Publisher(self.cache)
        self.hub = InvalidationHub(settings.watch_queue_size)
        self.listener = InvalidationListener(
            settings.controlplane_db.writer_dsn, self.cache, self.router, self.hub
        )
        self.store = ControlPlaneStore(self.router, self.publisher)
        self.servicer = ControlPlaneServicer(
            self.store, CachedReads(self.store, self.cache), self.hub
        )

        app = self.app
        app.add_service(
            SERVICE, controlplane_pb2_grpc.add_ControlPlaneServiceServicer_to_server, self.servicer
        )
        # Start-up waits for the feed (serving uncached after the timeout, until it is up).
        app.add_background(self.listener.feed, ready_timeout=settings.feed_start_timeout_seconds)
        # Watch streams end as soon as shutdown begins; clients resubscribe elsewhere.
        app.on_stopping(self.hub.close)


async def build_control_plane(settings: ControlPlaneSettings) -> ControlPlane:
    app = ServiceApp("controlplane", settings)
    # Registered first, so its pools close last (after the feed stopped).
    router = await open_database(app, "controlplane-db", settings.controlplane_db)
    return ControlPlane(app, settings, router)


async def build_app(settings: ControlPlaneSettings) -> ServiceApp:
    return (await build_control_plane(settings)).app
