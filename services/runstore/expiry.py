"""TTL expiry: one kit `Worker` per database. Each step takes (or renews) that database's expiry
lease and expires runs not started within their TTL (`sql.EXPIRE_RUNS`: EXPIRED, counted as
final in their batches, their waitpoints completed with the error), then counts the items of
the other database linked to them. Only the lease holder works; the statement is correct
without it. Needs nothing but the databases: no control plane, no environment lookup."""

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

log = structlog.get_logger("runops.runstore.expiry")


class Expirer:
    def __init__(self, store: RunStore, db: Database, settings: RunStoreSettings) -> None:
        self.store = store
        self.db = db
        self.interval = settings.runstore_expiry_interval_seconds
        self.lease_ttl = timedelta(seconds=settings.runstore_reaper_lease_seconds)
        self.limit = settings.runstore_expiry_batch_size
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.holding = False
        self.worker = Worker(
            f"runstore-expiry-{db.name}",
            self._run,
            backoff=ExponentialBackoff(base=self.interval, cap=max(self.interval, 30.0)),
        )

    async def step(self) -> list[str] | None:
        """One step; the expired run ids, or None when another process holds the lease. A full
        batch is followed by another step at once (a backlog drains without waiting)."""
        expired = await self.store.expire(
            self.db, holder=self.holder, lease_ttl=self.lease_ttl, limit=self.limit
        )
        self.holding = expired is not None
        if expired:
            log.info("expired runs past their TTL", database=self.db.name, runs=len(expired))
        return expired

    async def _run(self) -> None:
        try:
            while True:
                expired = await self.step()
                self.worker.ready.set()
                if expired is None or len(expired) < self.limit:
                    await asyncio.sleep(self.interval)
        finally:
            if self.holding:
                await self._release()

    async def _release(self) -> None:
        """Another process may take over at once instead of after the lease expires."""
        try:
            await asyncio.wait_for(
                self.store.tables.release_expiry_lease(self.db.router.writer, self.holder), 2
            )
        except Exception as exc:
            log.warning("releasing the expiry lease failed", error=repr(exc))
        self.holding = False
