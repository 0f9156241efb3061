"""Read routing between a Postgres writer and its streaming replicas, guarded by WAL positions.

After a write (ours, or one announced by an invalidation) a read must not come from a replica
that has not replayed it yet, or a cache would refill with the old row. The router remembers the
highest writer position it has been told about and sends reads to the writer until a replica
has replayed past it (checked on the connection the read then uses). Writes go through
`transaction()`, which learns the position after the commit: the read-your-writes protocol lives
here and nowhere else.

A replica that fails a read (down, restarting, a dying connection) or does not answer within
its short timeout (hung) is skipped for REPLICA_RETRY_SECONDS and the read goes to the writer;
after that one read tries it again. A connection given up on is terminated, never released
with a query in flight (asyncpg would wait for the hung server to acknowledge a cancel).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Literal, TypeVar

import asyncpg
import asyncpg.pool
import structlog

from runops.kit.dependencies import is_connection_failure

log = structlog.get_logger("runops.replica")

# What `pool.acquire()` hands out and what `asyncpg.connect()` returns.
DbConnection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
T = TypeVar("T")
Query = Callable[[DbConnection], Awaitable[T]]
Isolation = Literal["read_committed", "read_uncommitted", "serializable", "repeatable_read"]

# A replica that failed or timed out is left alone this long before one read tries it again.
REPLICA_RETRY_SECONDS = 1.0
# Past any position: a "replica" that is a primary (promoted, or the writer's own address).
_EVERYTHING = 1 << 64
# Before the first attempt, and between attempts, to learn the writer's position.
_LEARN_BACKOFF_SECONDS = (0.05, 5.0)

# Shutdown closes pools gracefully for this long, then terminates them.
CLOSE_TIMEOUT_SECONDS = 5.0

SELECT_WRITER_LSN = "SELECT pg_current_wal_insert_lsn()::text"
SELECT_REPLAY_LSN = "SELECT pg_last_wal_replay_lsn()::text"
SELECT_ONE = "SELECT 1"


class Consistency(enum.Enum):
    REPLICA = "replica"
    """A replica that has replayed every write this process knows of (its own commits and the
    ones announced to it), else the writer. The default."""
    WRITER = "writer"
    """The writer: every committed write from any process (read-your-writes across processes,
    what a caller asking for READ_YOUR_WRITES gets)."""


def parse_lsn(text: str) -> int:
    """'16/B374D848' -> its 64-bit position."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def connection(pool: asyncpg.Pool) -> _Pooled:
    """`pool.acquire()` that survives its server dying or hanging: a connection left by anything
    but a database error (a lost connection, a timeout, a cancellation) is terminated before it
    goes back, and a release that fails (asyncpg's "cannot switch to state …") is only logged:
    the connection is gone either way, and the caller's own outcome is what matters."""
    return _Pooled(pool)


class _Pooled:
    """`connection`'s context manager: a class, not an @asynccontextmanager, as every read
    enters one."""

    __slots__ = ("_conn", "_pool")

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def __aenter__(self) -> DbConnection:
        self._conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record] = await self._pool.acquire()
        return self._conn

    async def __aexit__(
        self,
        _type: type[BaseException] | None,
        exc: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        conn = self._conn
        if exc is not None and (
            not isinstance(exc, asyncpg.PostgresError) or is_connection_failure(exc)
        ):
            conn.terminate()
        try:
            await self._pool.release(conn)
        except Exception as failed:
            if not is_connection_failure(failed):
                raise
            log.warning("releasing a dying connection failed", error=repr(failed))


class _Behind:
    """A replica has not replayed the position a read needs."""


class _Replica:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        # The highest writer position this replica is known to have replayed.
        self.replayed = 0
        # Skipped until then (monotonic seconds) after a failure.
        self.retry_at = 0.0

    def usable(self, now: float) -> bool:
        if now < self.retry_at:
            return False
        if self.retry_at:
            # One read tries it again; the others keep to the writer until it has answered.
            self.retry_at = now + REPLICA_RETRY_SECONDS
        return True

    def failed(self) -> None:
        self.retry_at = time.monotonic() + REPLICA_RETRY_SECONDS


class ReplicaRouter:
    """A database: its writer pool and replica pools, and where each read goes."""

    def __init__(
        self,
        writer: asyncpg.Pool,
        replicas: Sequence[asyncpg.Pool] = (),
        *,
        replica_timeout: float = 1.0,
        ping_timeout: float = 5.0,
    ) -> None:
        self.writer = writer
        self.replicas = tuple(replicas)
        self._replicas = [_Replica(pool) for pool in self.replicas]
        self._turn = itertools.count()
        self._replica_timeout = replica_timeout
        self._ping_timeout = ping_timeout
        # The position every replica read must have been replayed past.
        self._required = 0
        # Writes are known to have happened but their position is still being learned.
        self._held = False
        self._unlearned = False
        self._learning: asyncio.Task[None] | None = None

    # -- reads ------------------------------------------------------------------------------
    async def read(self, query: Query[T], *, consistency: Consistency = Consistency.REPLICA) -> T:
        """Run `query` on a connection from a replica that has replayed every write known
        here, or from the writer (none has, all failed or timed out, or WRITER asked for)."""
        if consistency is Consistency.REPLICA and not self._held:
            now = time.monotonic()
            start = next(self._turn)
            for i in range(len(self._replicas)):
                replica = self._replicas[(start + i) % len(self._replicas)]
                if not replica.usable(now):
                    continue
                try:
                    async with asyncio.timeout(self._replica_timeout):
                        result = await self._on_replica(replica, query)
                except Exception as exc:
                    if not is_connection_failure(exc):
                        raise
                    replica.failed()
                    log.warning("replica read failed; reading the writer", error=repr(exc))
                    continue
                replica.retry_at = 0.0
                if not isinstance(result, _Behind):
                    return result
        async with connection(self.writer) as conn:
            return await query(conn)

    async def _on_replica(self, replica: _Replica, query: Query[T]) -> T | _Behind:
        """The query's result, or _Behind when the replica has not replayed far enough."""
        async with connection(replica.pool) as conn:
            required = self._required
            if replica.replayed < required:
                replayed = await conn.fetchval(SELECT_REPLAY_LSN)
                position = _EVERYTHING if replayed is None else parse_lsn(replayed)
                replica.replayed = max(replica.replayed, position)
                if position < required:
                    return _Behind()
            return await query(conn)

    # -- writes -----------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def transaction(
        self, *, isolation: Isolation | None = None
    ) -> AsyncIterator[DbConnection]:
        """A writer connection in a transaction. After the commit the writer's WAL position is
        recorded, so no later read here comes from a replica that has not replayed it; when it
        cannot be read (the writer is going away) reads stay on the writer until it is."""
        committing = False
        try:
            async with connection(self.writer) as conn:
                async with conn.transaction(isolation=isolation):
                    yield conn
                    committing = True
                try:
                    lsn = await self.writer_lsn(conn)
                except Exception as exc:
                    # Committed (its answer, maybe a key shown once, must reach the caller) but
                    # the position is unknown.
                    log.warning("cannot read the WAL position after a commit", error=repr(exc))
                    self.write_announced()
                else:
                    self.require(lsn)
        except Exception as exc:
            if committing and is_connection_failure(exc):
                self.write_announced()  # the commit may have happened
            raise

    def require(self, lsn: str) -> None:
        """Replica reads must have replayed up to `lsn` (a writer position) from now on."""
        self._required = max(self._required, parse_lsn(lsn))

    def write_announced(self) -> None:
        """A write committed whose position is unknown (another process's, announced by a
        notification; or ours when the position could not be read): reads go to the writer
        until a position read after this is known (learned in the background)."""
        self._held = True
        self._unlearned = True
        if self._learning is None or self._learning.done():
            self._learning = asyncio.create_task(self._learn_position(), name="learn-wal-position")

    async def _learn_position(self) -> None:
        delay, limit = _LEARN_BACKOFF_SECONDS
        while True:
            self._unlearned = False
            try:
                lsn = await self.writer_lsn()
            except Exception as exc:
                log.warning("cannot read the writer's WAL position", error=repr(exc))
                self._unlearned = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, limit)
                continue
            if not self._unlearned:  # nothing announced while it was read: past all of them
                self.require(lsn)
                self._held = False
                return

    async def writer_lsn(self, conn: DbConnection | None = None) -> str:
        """The writer's WAL insert position: past every record of every committed transaction.
        (The write position is not: with synchronous_commit off a commit record may still sit
        in the WAL buffers.)"""
        if conn is not None:
            return str(await conn.fetchval(SELECT_WRITER_LSN))
        async with asyncio.timeout(self._ping_timeout), connection(self.writer) as own:
            return str(await own.fetchval(SELECT_WRITER_LSN))

    # -- health and lifecycle ---------------------------------------------------------------
    async def ping_writer(self) -> None:
        """Raises while the writer is down, and times out while it hangs (the connection given
        up on is terminated, so a cancelled check never waits for the server)."""
        async with asyncio.timeout(self._ping_timeout), connection(self.writer) as conn:
            await conn.fetchval(SELECT_ONE)

    async def close(self) -> None:
        if self._learning is not None:
            self._learning.cancel()
            with contextlib.suppress(BaseException):
                await self._learning
        await asyncio.gather(*(_close(pool) for pool in (self.writer, *self.replicas)))


async def _close(pool: asyncpg.Pool) -> None:
    """Gracefully, unless its server hangs or is gone: then at once."""
    try:
        await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_SECONDS)
    except Exception as exc:
        log.warning("closing a pool failed; terminating it", error=repr(exc))
        pool.terminate()
