"""A Redis connection pool that gives back what a burst opened.

redis-py's pools open a connection whenever every open one is busy and keep it forever. One
stall of a process (CPU starvation, a Redis fork for its AOF rewrite) starts a crowd of commands
at once, so the pool grows to that peak and stays there: a 30-minute soak showed the mollifier
holding 95 descriptors where it began with 48, in steps, one per stall. asyncpg's pools close a
connection idle past `max_inactive_connection_lifetime`; this does the same for Redis.

A connection idle longer than `max_idle_seconds` is taken out of the pool and closed. The check
runs on release, at most once per quarter of the limit, so it costs nothing per command; the
pool hands out its most recently released connection first (LIFO), so the ones left idle are the
burst's extras. A later burst opens connections again, as it would have the first time.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection


class IdleClosingPool(aioredis.BlockingConnectionPool):
    def __init__(self, *, max_idle_seconds: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # 0: never close (redis-py's own behaviour).
        self.max_idle_seconds = max_idle_seconds
        self._released_at: weakref.WeakKeyDictionary[AbstractConnection, float] = (
            weakref.WeakKeyDictionary()
        )
        self._next_check = 0.0

    async def release(self, connection: AbstractConnection) -> None:
        now = time.monotonic()
        self._released_at[connection] = now
        await super().release(connection)
        if self.max_idle_seconds and now >= self._next_check:
            self._next_check = now + self.max_idle_seconds / 4
            await self._close_idle(now)

    async def _close_idle(self, now: float) -> None:
        # Idle connections sit in `_available_connections` (redis-py 8's pool, locked in
        # requirements; tests/kit/test_redis_pool.py holds this to it). Taken out before the
        # await, so no caller can be handed one while it closes.
        idle = self._available_connections
        stale = [c for c in idle if now - self._released_at.get(c, now) > self.max_idle_seconds]
        if not stale:
            return
        closing = set(stale)
        self._available_connections = [c for c in idle if c not in closing]
        for connection in stale:
            await connection.disconnect()
