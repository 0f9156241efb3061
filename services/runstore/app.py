"""Wiring: both databases, the router between them, the servicer, the reapers and the TTL
expirers on the kit's ServiceApp."""

from __future__ import annotations

from runops.kit.errors import Aborted, RunopsError
from runops.kit.postgres import open_database
from runops.kit.server import ServiceApp
from runops.runstore.v1 import runstore_pb2, runstore_pb2_grpc
from services.runstore.expiry import Expirer
from services.runstore.reaper import Reaper
from services.runstore.service import RunStoreServicer
from services.runstore.settings import RunStoreSettings
from services.runstore.store import RunStore
from services.runstore.tables import TransientConflict

# Every RPC is INTERNAL, declared in the contract.
SERVICE = runstore_pb2.DESCRIPTOR.services_by_name["RunStoreService"]


def transient_conflict(exc: BaseException) -> RunopsError | None:
    """The data layer's retryable refusal (nothing was written): ABORTED, like a serialization
    failure."""
    if isinstance(exc, TransientConflict):
        return Aborted(str(exc), reason="TRANSIENT_CONFLICT", retry_after=0.05)
    return None


class RunStoreApp:
    """The parts of one run-store process, reachable from tests and benchmarks."""

    def __init__(self, app: ServiceApp, settings: RunStoreSettings, store: RunStore) -> None:
        self.app = app
        self.settings = settings
        self.store = store
        self.servicer = RunStoreServicer(store)
        app.add_service(
            SERVICE, runstore_pb2_grpc.add_RunStoreServiceServicer_to_server, self.servicer
        )
        self.reapers = [Reaper(store, db, settings) for db in store.databases]
        for reaper in self.reapers:
            app.add_background(reaper.worker)
        self.expirers = [Expirer(store, db, settings) for db in store.databases]
        for expirer in self.expirers:
            app.add_background(expirer.worker)


async def build_run_store(settings: RunStoreSettings, *, name: str = "runstore") -> RunStoreApp:
    """`name` names the process in logs and its database connections (application_name
    `runops-<name>`)."""
    app = ServiceApp(name, settings, error_mappers=(transient_conflict,))
    legacy = await open_database(app, "controlplane-db", settings.controlplane_db)
    new = None
    if settings.runstore_split:
        new = await open_database(app, "runops-db", settings.runops_db)
    return RunStoreApp(app, settings, RunStore(legacy, new))


async def build_app(settings: RunStoreSettings) -> ServiceApp:
    return (await build_run_store(settings)).app
