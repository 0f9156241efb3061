"""The seal-timeout reaper: one job per database (`LeasedJob`). Each step takes (or renews) that
database's lease, aborts batches still unsealed after the seal timeout (their waitpoints
completed with an error naming the expected item count), re-checks sealed batches still waiting
on runs past the re-check threshold (counts repaired, or the waitpoint completed with an error
naming the items whose runs were never written), and re-checks links to runs of the
other database (the repair for a completion whose second write was lost). Only the lease
holder works; the statements are correct without it (docs/runstore.md)."""

from __future__ import annotations

import functools
from datetime import timedelta

import structlog

from services.runstore.leased import LeasedJob
from services.runstore.settings import RunStoreSettings
from services.runstore.store import Database, RunStore

log = structlog.get_logger("runops.runstore.reaper")


class Reaper(LeasedJob):
    def __init__(self, store: RunStore, db: Database, settings: RunStoreSettings) -> None:
        self.store = store
        self.db = db
        self.seal_timeout = timedelta(seconds=settings.runstore_seal_timeout_seconds)
        self.lease_ttl = timedelta(seconds=settings.runstore_reaper_lease_seconds)
        self.recheck_after = timedelta(seconds=settings.runstore_processing_recheck_seconds)
        self.limit = settings.runstore_reaper_batch_size
        self._cursor = ""
        super().__init__(
            f"runstore-reaper-{db.name}",
            settings.runstore_reaper_interval_seconds,
            functools.partial(store.tables.release_reaper_lease, db.router.writer),
        )

    async def step(self) -> list[str] | None:
        """One step; the aborted batch ids, or None when another process holds the lease."""
        aborted, self._cursor = await self.store.reap(
            self.db,
            holder=self.holder,
            seal_timeout=self.seal_timeout,
            lease_ttl=self.lease_ttl,
            limit=self.limit,
            cursor=self._cursor,
            recheck_after=self.recheck_after,
        )
        if aborted:
            log.info("aborted unsealed batches", database=self.db.name, batches=len(aborted))
        return aborted
