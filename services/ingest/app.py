"""Wiring: the control plane (API keys, task defaults), the run store, the mollifier
(idempotency-key claims), the object store, the token bucket and the servicer on the kit's
ServiceApp.

Health dependencies: Redis, the object store and the run store (every RPC reads or writes
batches there). Not the control plane (API keys and task defaults are cached) nor the mollifier
(only units with keyed items call it). See docs/ingest.md, Health.
"""

from __future__ import annotations

from runops.controlplane.client import ControlPlaneClient
from runops.controlplane.defaults import TaskDefaults
from runops.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from runops.kit.downstream import Downstream
from runops.kit.redis import RedisClient, open_redis
from runops.kit.server import ServiceApp
from runops.mollifier.client import MollifierClient
from runops.runstore.client import RunStoreClient
from services.ingest.keyed import KeyedItems, MollifierKeyedItems
from services.ingest.offload import ObjectStore, Offloader, StoreConfig
from services.ingest.ratelimit import TokenBucket, bucket_from_settings
from services.ingest.service import IngestServicer
from services.ingest.settings import IngestSettings
from services.ingest.streaming import Limits

# Every RPC is API_KEY in the contract.
SERVICE = ingest_pb2.DESCRIPTOR.services_by_name["BatchIngestService"]
# Start-up waits this long for the control plane's invalidation feed (then serves uncached).
CONTROL_PLANE_FEED_TIMEOUT_SECONDS = 5.0


def transport_options(settings: IngestSettings) -> list[tuple[str, int]]:
    """The read-ahead of a client stream, bounded to one chunk message. Phase 2 reads a message
    only when its pipeline has a free slot (spec §5); without a bound, gRPC's BDP probing grows
    a stream's flow-control window to megabytes, so the transport would buffer what the
    pipeline has not asked for (peak RSS beyond concurrency x chunk, and the client would not
    feel backpressure). A fixed window of RUNOPS_MAX_CHUNK_BYTES keeps the next chunk on its
    way while every slot is busy, so the pipeline never waits a round trip for it."""
    return [
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", settings.max_chunk_bytes),
    ]


class Ingest:
    """The parts of one ingest process, reachable from tests and benchmarks."""

    def __init__(
        self,
        app: ServiceApp,
        control_plane: Downstream[ControlPlaneClient],
        redis: RedisClient,
        settings: IngestSettings,
        store_config: StoreConfig | None = None,
    ) -> None:
        """`store_config` replaces the one from settings (tests: explicit credentials)."""
        run_store = Downstream.connect(
            "runstore",
            settings.runstore_target,
            RunStoreClient,
            token=settings.internal_token,
            health=True,
        )
        mollifier = Downstream.connect(
            "mollifier",
            settings.mollifier_target,
            MollifierClient,
            token=settings.internal_token,
            health=False,
        )
        self.app = app
        self.control_plane = control_plane.client
        self.run_store = run_store.client
        self.object_store = ObjectStore(store_config or StoreConfig.from_settings(settings))
        self.redis = redis
        self.bucket: TokenBucket | None = (
            bucket_from_settings(settings, self.redis) if settings.rate_limit_enabled else None
        )
        self.mollifier = mollifier.client
        self.keyed: KeyedItems = MollifierKeyedItems(self.mollifier)
        self.servicer = IngestServicer(
            run_store=self.run_store,
            offloader=Offloader(self.object_store, settings.offload_threshold_bytes),
            keyed=self.keyed,
            defaults=TaskDefaults(self.control_plane),
            bucket=self.bucket,
            limits=Limits(
                concurrency=settings.ingest_concurrency,
                max_chunk_items=settings.max_chunk_items,
                max_item_payload_bytes=settings.max_item_payload_bytes,
            ),
            max_run_count=settings.max_run_count,
            watch_interval_seconds=settings.watch_interval_seconds,
            shutting_down=app.shutting_down,
        )
        app.add_service(
            SERVICE, ingest_pb2_grpc.add_BatchIngestServiceServicer_to_server, self.servicer
        )
        app.on_startup(self.object_store.open)
        app.add_dependency("object-store", self.object_store.check)
        # The control plane's cache stays fresh through its invalidation subscription.
        app.add_background(
            self.control_plane.watch, ready_timeout=CONTROL_PLANE_FEED_TIMEOUT_SECONDS
        )
        # Reverse order at shutdown: the downstream clients and channels, then the store's pool
        # (Redis closes last: open_redis registered its hook first).
        app.on_shutdown(self.object_store.close)
        run_store.attach(app)
        mollifier.attach(app)
        control_plane.attach(app)


async def build_ingest(settings: IngestSettings, store_config: StoreConfig | None = None) -> Ingest:
    # Made before the app, which resolves API keys through it; attached by Ingest.
    control_plane = Downstream.connect(
        "controlplane",
        settings.controlplane_target,
        ControlPlaneClient,
        token=settings.internal_token,
        health=False,
    )
    app = ServiceApp(
        "ingest",
        settings,
        api_key_resolver=control_plane.client.authenticate_api_key,
        transport_options=transport_options(settings),
    )
    redis = await open_redis(app, "redis", settings.redis)
    return Ingest(app, control_plane, redis, settings, store_config)


async def build_app(settings: IngestSettings) -> ServiceApp:
    return (await build_ingest(settings)).app
