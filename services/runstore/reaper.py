"""The seal-timeout reaper: one kit `Worker` per database. Each step takes (or renews) that
database's lease, aborts batches still unsealed after the seal timeout (their waitpoints
completed with an error naming the expected item count), re-checks sealed batches still waiting
on runs past the re-check threshold (counts repaired, or the waitpoint completed with an error
naming the items whose runs were never written), and re-checks links to runs of the
other database (the repair for a completion whose second write was lost). Only the lease
holder works; the statements are correct without it (docs/runstore.md)."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from datetime import timedelta

import structlog

from runops.kit.background import Worker
from runops.kit.backoff import ExponentialBackoff
from services.runstore.settings import RunStoreSettings
from services.runstore.store import Database, RunStore

log = structlog.get_logger("runops.runstore.reaper")


class Reaper:
    def __init__(self, store: RunStore, db: Database, settings: RunStoreSettings) -> None:
        self.store = store
        self.db = db
        self.interval = settings.runstore_reaper_interval_seconds
        self.seal_timeout = timedelta(seconds=settings.runstore_seal_timeout_seconds)
        self.lease_ttl = timedelta(seconds=settings.runstore_reaper_lease_seconds)
        self.recheck_after = timedelta(seconds=settings.runstore_processing_recheck_seconds)
        self.limit = settings.runstore_reaper_batch_size
        # Unique per process (several run on one host, and a restarted one is a new holder).
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._cursor = ""
        self.holding = False
        self.worker = Worker(
            f"runstore-reaper-{db.name}",
            self._run,
            backoff=ExponentialBackoff(base=self.interval, cap=max(self.interval, 30.0)),
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
        self.holding = aborted is not None
        if aborted:
            log.info("aborted unsealed batches", database=self.db.name, batches=len(aborted))
        return aborted

    async def _run(self) -> None:
        try:
            while True:
                await self.step()
                self.worker.ready.set()
                await asyncio.sleep(self.interval)
        finally:
            if self.holding:
                await self._release()

    async def _release(self) -> None:
        """Another process may take over at once instead of after the lease expires."""
        try:
            await asyncio.wait_for(
                self.store.tables.release_reaper_lease(self.db.router.writer, self.holder), 2
            )
        except Exception as exc:
            log.warning("releasing the reaper lease failed", error=repr(exc))
        self.holding = False
