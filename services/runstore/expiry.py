"""TTL expiry: one job per database (`LeasedJob`). Each step takes (or renews) that database's
expiry lease and expires runs not started within their TTL (`sql.EXPIRE_RUNS`: EXPIRED, counted
as final in their batches, their waitpoints completed with the error), then counts the items of
the other database linked to them. Needs nothing but the databases: no control plane, no
environment lookup."""

from __future__ import annotations

import functools
from datetime import timedelta

import structlog

from services.runstore.leased import LeasedJob
from services.runstore.settings import RunStoreSettings
from services.runstore.store import Database, RunStore

log = structlog.get_logger("runops.runstore.expiry")


class Expirer(LeasedJob):
    def __init__(self, store: RunStore, db: Database, settings: RunStoreSettings) -> None:
        self.store = store
        self.db = db
        self.lease_ttl = timedelta(seconds=settings.runstore_reaper_lease_seconds)
        self.limit = settings.runstore_expiry_batch_size
        super().__init__(
            f"runstore-expiry-{db.name}",
            settings.runstore_expiry_interval_seconds,
            functools.partial(store.tables.release_expiry_lease, db.router.writer),
        )

    async def step(self) -> list[str] | None:
        """One step; the expired run ids, or None when another process holds the lease."""
        expired = await self.store.expire(
            self.db, holder=self.holder, lease_ttl=self.lease_ttl, limit=self.limit
        )
        if expired:
            log.info("expired runs past their TTL", database=self.db.name, runs=len(expired))
        return expired

    def again_at_once(self, done: list[str]) -> bool:
        # A full step: more runs may be due.
        return len(done) == self.limit
