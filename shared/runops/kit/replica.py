"""Read routing between a Postgres writer and its streaming replica, guarded by WAL positions.

After a write (ours, or one announced by an invalidation) a read must not come from a replica
that has not replayed it yet, or a cache would refill with the old row. The router remembers the
highest writer LSN it has been told about and sends reads to the writer until the replica has
replayed past it (one cheap check, then replica reads again).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import asyncpg.pool
import structlog

log = structlog.get_logger("runops.replica")

# What `pool.acquire()` hands out and what `asyncpg.connect()` returns.
DbConnection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
T = TypeVar("T")

# A replica that is down or restarting: the read goes to the writer instead.
REPLICA_FAILURES = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
)


def parse_lsn(text: str) -> int:
    """'16/B374D848' -> its 64-bit position."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


class ReplicaRouter:
    def __init__(self, writer: asyncpg.Pool, replica: asyncpg.Pool | None) -> None:
        self.writer = writer
        self.replica = replica
        self._required = 0
        self._reached = True
        # Writes are known to have happened but their position is still being fetched.
        self._held = False

    async def reader(self) -> asyncpg.Pool:
        """The pool a read that must see every write announced so far should use."""
        if self.replica is None or self._held:
            return self.writer
        if self._reached:
            return self.replica
        required = self._required
        try:
            replayed = await self.replica.fetchval("SELECT pg_last_wal_replay_lsn()::text")
        except REPLICA_FAILURES as exc:
            log.warning("replica unreachable; reading the writer", error=repr(exc))
            return self.writer
        # NULL: the "replica" is a primary (promoted, or pointed at the writer).
        if replayed is None or parse_lsn(replayed) >= required:
            if required == self._required:
                self._reached = True
            return self.replica
        return self.writer

    async def read(self, query: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
        """Run `query` on the pool `reader` picks; on the writer if the replica fails it."""
        pool = await self.reader()
        if pool is self.writer:
            return await query(pool)
        try:
            return await query(pool)
        except REPLICA_FAILURES as exc:
            log.warning("replica read failed; reading the writer", error=repr(exc))
            return await query(self.writer)

    def require(self, lsn: str) -> None:
        position = parse_lsn(lsn)
        if position > self._required:
            self._required = position
            self._reached = False

    def hold(self) -> None:
        """A write happened whose LSN is not known yet: read the writer until `release`."""
        self._held = True

    def release(self, lsn: str) -> None:
        """`lsn`, read after every write announced before, is now the position to wait for."""
        self.require(lsn)
        self._held = False

    async def writer_lsn(self, conn: DbConnection | None = None) -> str:
        """The writer's WAL insert position: past every record of every committed transaction.
        (The write position is not: with synchronous_commit off a commit record may still sit
        in the WAL buffers.)"""
        query = "SELECT pg_current_wal_insert_lsn()::text"
        value = await (conn.fetchval(query) if conn is not None else self.writer.fetchval(query))
        return str(value)
