"""Invalidations across every control-plane process and every subscribed consumer.

A write publishes its invalidations with pg_notify inside its own transaction, so they go out
exactly when (and only if) it commits. Every process LISTENs on the writer: it drops the stale
entries from its cache, tells the ReplicaRouter a write was announced (reads stay on the writer
until a WAL position past the commit is known: a lagging replica must not refill the cache with
the old row), and forwards the invalidation to its WatchInvalidations streams. While the LISTEN connection is down the process
cannot know what changed, so it stops caching, and every stream is told to reset.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import socket
from collections import deque
from collections.abc import Sequence

import asyncpg
import structlog
from google.protobuf import timestamp_pb2

from runops.controlplane.cache import ControlPlaneCache
from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.kit.background import Worker
from runops.kit.backoff import ExponentialBackoff
from runops.kit.replica import DbConnection, ReplicaRouter

log = structlog.get_logger("runops.controlplane.invalidation")

CHANNEL = "runops_controlplane_invalidations"
NOTIFY = "SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload"
PING = "SELECT 1"
# The LISTEN connection is pinged this often: a silent network failure ends it within this.
PING_INTERVAL_SECONDS = 5.0
MAX_BACKOFF_SECONDS = 5.0


def encode(invalidation: cp.Invalidation) -> str:
    return base64.b64encode(invalidation.SerializeToString()).decode()


def decode(payload: str) -> cp.Invalidation:
    return cp.Invalidation.FromString(base64.b64decode(payload))


class Publisher:
    """Stamps and publishes this process's invalidations."""

    def __init__(self, cache: ControlPlaneCache) -> None:
        self.source = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"
        self._cache = cache
        self._sequence = 0

    async def publish(self, conn: DbConnection, invalidations: Sequence[cp.Invalidation]) -> None:
        """Inside the write's transaction: delivered to every listener when it commits."""
        if not invalidations:
            return
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        for invalidation in invalidations:
            self._sequence += 1
            invalidation.sequence = self._sequence
            invalidation.source = self.source
            invalidation.published_at.CopyFrom(now)
        await conn.execute(NOTIFY, CHANNEL, [encode(i) for i in invalidations])

    def applied_locally(self, invalidations: Sequence[cp.Invalidation]) -> None:
        """Right after the commit, before the writer's RPC answers (its NOTIFY comes back later)."""
        for invalidation in invalidations:
            self._cache.apply(invalidation)


class Subscription:
    """One WatchInvalidations stream: a bounded buffer; overflowing it turns into a reset."""

    def __init__(self, organization_id: str, limit: int) -> None:
        self.organization_id = organization_id
        self._limit = limit
        self._items: deque[cp.Invalidation] = deque()
        self._wakeup = asyncio.Event()
        self._reset = True  # every stream starts with one
        self._closed = False

    def offer(self, invalidation: cp.Invalidation) -> None:
        if self.organization_id and invalidation.organization_id != self.organization_id:
            return
        if len(self._items) >= self._limit:
            self.reset()
            return
        self._items.append(invalidation)
        self._wakeup.set()

    def reset(self) -> None:
        self._items.clear()
        self._reset = True
        self._wakeup.set()

    def close(self) -> None:
        self._closed = True
        self._wakeup.set()

    async def next(self) -> cp.WatchInvalidationsResponse | None:
        """The next message, or None once the subscription is closed."""
        while not self._closed:
            if self._reset:
                self._reset = False
                return cp.WatchInvalidationsResponse(reset=True)
            if self._items:
                return cp.WatchInvalidationsResponse(invalidation=self._items.popleft())
            self._wakeup.clear()
            await self._wakeup.wait()
        return None


class InvalidationHub:
    def __init__(self, queue_size: int) -> None:
        self._queue_size = queue_size
        self._subscriptions: set[Subscription] = set()
        self._closed = False

    def subscribe(self, organization_id: str = "") -> Subscription:
        subscription = Subscription(organization_id, self._queue_size)
        if self._closed:
            subscription.close()
        else:
            self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    def broadcast(self, invalidation: cp.Invalidation) -> None:
        for subscription in self._subscriptions:
            subscription.offer(invalidation)

    def reset_all(self) -> None:
        for subscription in self._subscriptions:
            subscription.reset()

    def close(self) -> None:
        """Shutdown: every stream ends (clients reconnect to another replica)."""
        self._closed = True
        for subscription in self._subscriptions:
            subscription.close()


class InvalidationListener:
    """LISTENs on the writer for every process's invalidations, reconnecting on its own."""

    def __init__(
        self, dsn: str, cache: ControlPlaneCache, router: ReplicaRouter, hub: InvalidationHub
    ) -> None:
        self._dsn = dsn
        self._cache = cache
        self._router = router
        self._hub = hub
        # Reconnects on its own; the app starts and stops it (ServiceApp.add_background).
        self.feed = Worker(
            "invalidation-feed",
            self._listen,
            backoff=ExponentialBackoff(base=0.1, cap=MAX_BACKOFF_SECONDS, jitter=0.5),
        )
        # Set while LISTENing (and caching).
        self.connected = self.feed.ready
        # The LISTEN connection's server process (tests terminate it).
        self.backend_pid: int | None = None

    async def _listen(self) -> None:
        conn = await asyncpg.connect(
            self._dsn, timeout=5, server_settings={"application_name": "runops-controlplane-listen"}
        )
        self.backend_pid = conn.get_server_pid()
        try:
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(CHANNEL, self._on_notification)
            # Whatever changed while nobody listened is unknown: start from nothing.
            self._cache.clear()
            self._cache.enabled = True
            self._hub.reset_all()
            self.connected.set()
            log.info("invalidation feed listening", channel=CHANNEL)
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), PING_INTERVAL_SECONDS)
                if not lost.is_set():
                    await conn.fetchval(PING, timeout=PING_INTERVAL_SECONDS)
            raise ConnectionError("the LISTEN connection was closed")
        finally:
            self._went_deaf()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1)
            if not conn.is_closed():
                conn.terminate()

    def _went_deaf(self) -> None:
        if self.connected.is_set():
            log.info("invalidation feed lost; caching off until it is back")
            self.connected.clear()
            self._cache.enabled = False
            self._cache.clear()
            self._hub.reset_all()

    def _on_notification(
        self, _conn: DbConnection, _pid: int, _channel: str, payload: object
    ) -> None:
        try:
            invalidation = decode(str(payload))
        except Exception:
            log.error(
                "undecodable invalidation; dropping the whole cache", payload=str(payload)[:200]
            )
            invalidation = cp.Invalidation()  # UNSPECIFIED: clears everything
        # Committed on the writer; a replica may not have replayed it yet.
        self._router.write_announced()
        self._cache.apply(invalidation)
        self._hub.broadcast(invalidation)
