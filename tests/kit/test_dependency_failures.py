"""Every row of the dependency-failure table (spec §3), provoked for real against the session's
Postgres and real redis-servers, then mapped by `runops.kit.dependencies.dependency_error`:
once directly, and once as a real gRPC client receives it from a kit server whose handler hit
the same failure (a throwaway TestingService servicer on ServiceApp).

The provocations connect as the superuser: ending another backend needs it, and the mapping
does not depend on the role.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from runops.kit.channels import create_channel
from runops.kit.dependencies import dependency_error
from runops.kit.errors import RETRYABLE_CODES, details_of
from runops.kit.server import ServiceApp
from runops.kit.settings import ServerSettings
from runops.localstack import PostgresDatabase
from runops.localstack.ports import free_port
from runops.localstack.redis import RedisServer
from runops.testing.v1 import testing_pb2, testing_pb2_grpc

INTERNAL = "internal-token-for-dependency-tests"
# Long enough that only the provoked failure can end it.
LONG_SLEEP = "SELECT pg_sleep(60)"


@dataclass
class Dependencies:
    """What the provocations need: the database, scratch tables, a directory for redis."""

    db: PostgresDatabase
    tmp: Path
    parent: str = field(default_factory=lambda: f"dep_parent_{secrets.token_hex(4)}")
    child: str = field(default_factory=lambda: f"dep_child_{secrets.token_hex(4)}")
    ledger: str = field(default_factory=lambda: f"dep_ledger_{secrets.token_hex(4)}")

    @property
    def dsn(self) -> str:
        return self.db.admin_writer_dsn

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        conn = await asyncpg.connect(self.dsn)
        try:
            yield conn
        finally:
            await conn.close()


Provocation = Callable[[Dependencies], Awaitable[Any]]


async def unique_violation(deps: Dependencies) -> None:
    async with deps.connection() as conn:
        await conn.execute(f"INSERT INTO {deps.parent} (id) VALUES (1) ON CONFLICT DO NOTHING")
        await conn.execute(f"INSERT INTO {deps.parent} (id) VALUES (1)")


async def foreign_key_violation(deps: Dependencies) -> None:
    async with deps.connection() as conn:
        await conn.execute(f"INSERT INTO {deps.child} (id, parent_id) VALUES (1, -1)")


async def statement_timeout(deps: Dependencies) -> None:
    async with deps.connection() as conn:
        await conn.execute("SET statement_timeout = '100ms'")
        await conn.execute(LONG_SLEEP)


async def serialization_failure(deps: Dependencies) -> None:
    """Write skew: each SERIALIZABLE transaction reads what the other writes; the second to
    commit is refused."""
    async with deps.connection() as first, deps.connection() as second:
        one, two = (
            first.transaction(isolation="serializable"),
            second.transaction(isolation="serializable"),
        )
        await one.start()
        await two.start()
        try:
            for conn, k in ((first, 1), (second, 2)):
                await conn.fetchval(f"SELECT count(*) FROM {deps.ledger} WHERE k <> $1", k)
            for conn, k in ((first, 1), (second, 2)):
                await conn.execute(f"INSERT INTO {deps.ledger} (k) VALUES ($1)", k)
            await one.commit()
            await two.commit()
        finally:
            for tx in (one, two):
                with contextlib.suppress(asyncpg.InterfaceError):
                    await tx.rollback()


async def pool_exhausted(deps: Dependencies) -> None:
    pool = await asyncpg.create_pool(deps.dsn, min_size=1, max_size=1)
    try:
        async with pool.acquire(), pool.acquire(timeout=0.2):
            raise AssertionError("a pool of one handed out a second connection")
    finally:
        await pool.close()


async def _backend_busy(admin: asyncpg.Connection, pid: int) -> None:
    for _ in range(500):
        if await admin.fetchval(
            "SELECT wait_event = 'PgSleep' FROM pg_stat_activity WHERE pid = $1", pid
        ):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"backend {pid} never started sleeping")


async def connection_lost_mid_query(deps: Dependencies) -> None:
    async with deps.connection() as admin, deps.connection() as conn:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        query = asyncio.ensure_future(conn.execute(LONG_SLEEP))
        await _backend_busy(admin, pid)
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        await query


async def connection_lost_in_pool(deps: Dependencies) -> None:
    """A pooled connection whose backend is ended while a query runs on it."""
    pool = await asyncpg.create_pool(deps.dsn, min_size=1, max_size=1)
    try:
        async with deps.connection() as admin, pool.acquire() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            query = asyncio.ensure_future(conn.execute(LONG_SLEEP))
            await _backend_busy(admin, pid)
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            await query
    finally:
        await pool.close()


def _redis(url: str) -> aioredis.Redis:
    # One quick retry instead of redis-py's default back-off (seconds): the failure is the
    # same, only later.
    return aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 1), socket_timeout=5)


async def redis_closed_port(deps: Dependencies) -> None:
    client = _redis(f"redis://127.0.0.1:{free_port()}/0")
    try:
        await client.ping()
    finally:
        await client.aclose()


async def redis_stopped_mid_use(deps: Dependencies) -> None:
    """A command blocked on a real redis-server when that server stops."""
    server = RedisServer(deps.tmp / f"redis-{secrets.token_hex(3)}")
    await asyncio.to_thread(server.start)
    client, observer = _redis(server.url), _redis(server.url)
    try:
        await client.set("probe", "1")
        assert await client.get("probe") == b"1"
        blocked = asyncio.ensure_future(client.blpop(["nothing"], timeout=60))
        for _ in range(500):
            if (await observer.info("clients"))["blocked_clients"]:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("BLPOP never blocked")
        await asyncio.to_thread(server.stop)
        await blocked
    finally:
        await asyncio.to_thread(server.stop)
        await client.aclose()
        await observer.aclose()


async def redis_read_only_replica(deps: Dependencies) -> None:
    """A write to a redis-server that is a replica (a failover demoted it under the client):
    READONLY."""
    primary = RedisServer(deps.tmp / f"primary-{secrets.token_hex(3)}")
    replica = RedisServer(deps.tmp / f"replica-{secrets.token_hex(3)}")
    await asyncio.to_thread(primary.start)
    await asyncio.to_thread(replica.start)
    client = _redis(replica.url)
    try:
        await client.replicaof("127.0.0.1", primary.port)
        await client.set("probe", "1")
    finally:
        await client.aclose()
        await asyncio.to_thread(replica.stop)
        await asyncio.to_thread(primary.stop)


async def connection_lost_while_idle(deps: Dependencies) -> None:
    """A connection whose backend was ended between two queries."""
    async with deps.connection() as admin, deps.connection() as conn:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        for _ in range(500):
            if not await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid
            ):
                break
            await asyncio.sleep(0.01)
        await conn.fetchval("SELECT 1")


@dataclass(frozen=True)
class Expected:
    code: grpc.StatusCode
    reason: str
    # A constraint named in the ErrorInfo metadata: a format string over Dependencies.
    constraint: str | None = None


UNAVAILABLE_DB = Expected(grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
UNAVAILABLE_REDIS = Expected(grpc.StatusCode.UNAVAILABLE, "REDIS_UNAVAILABLE")
TABLE: dict[str, tuple[Provocation, Expected]] = {
    "unique": (
        unique_violation,
        Expected(grpc.StatusCode.ALREADY_EXISTS, "UNIQUE_VIOLATION", "{parent}_pkey"),
    ),
    "foreign-key": (
        foreign_key_violation,
        Expected(
            grpc.StatusCode.FAILED_PRECONDITION, "FOREIGN_KEY_VIOLATION", "{child}_parent_fkey"
        ),
    ),
    "statement-timeout": (
        statement_timeout,
        Expected(grpc.StatusCode.DEADLINE_EXCEEDED, "STATEMENT_TIMEOUT"),
    ),
    "serialization": (
        serialization_failure,
        Expected(grpc.StatusCode.ABORTED, "SERIALIZATION_FAILURE"),
    ),
    "pool-exhausted": (
        pool_exhausted,
        Expected(grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_TIMEOUT"),
    ),
    "lost-connection": (connection_lost_mid_query, UNAVAILABLE_DB),
    "lost-pooled-connection": (connection_lost_in_pool, UNAVAILABLE_DB),
    "lost-idle-connection": (connection_lost_while_idle, UNAVAILABLE_DB),
    "redis-closed-port": (redis_closed_port, UNAVAILABLE_REDIS),
    "redis-stopped": (redis_stopped_mid_use, UNAVAILABLE_REDIS),
    "redis-read-only": (redis_read_only_replica, UNAVAILABLE_REDIS),
}
# Retryable refusals tell the client when to retry; a statement that ran out of time would
# only run out of time again.
WITH_RETRY_INFO = {code for code in RETRYABLE_CODES if code != grpc.StatusCode.DEADLINE_EXCEEDED}


def _check(
    deps: Dependencies,
    expected: Expected,
    code: grpc.StatusCode,
    reason: str | None,
    metadata: dict[str, str],
    retry_after: float | None,
) -> None:
    assert (code, reason) == (expected.code, expected.reason)
    if expected.constraint is not None:
        assert metadata["constraint"] == expected.constraint.format(**vars(deps))
    if code in WITH_RETRY_INFO:
        assert retry_after is not None
        assert retry_after > 0
    else:
        assert retry_after is None


@pytest.fixture
async def deps(runops_db: PostgresDatabase, tmp_path: Path) -> AsyncIterator[Dependencies]:
    made = Dependencies(runops_db, tmp_path)
    async with made.connection() as conn:
        await conn.execute(
            f"""
            CREATE TABLE {made.parent} (id int CONSTRAINT {made.parent}_pkey PRIMARY KEY);
            CREATE TABLE {made.child} (
                id int PRIMARY KEY,
                parent_id int CONSTRAINT {made.child}_parent_fkey REFERENCES {made.parent} (id)
            );
            CREATE TABLE {made.ledger} (k int NOT NULL);
            """
        )
    try:
        yield made
    finally:
        async with made.connection() as conn:
            await conn.execute(f"DROP TABLE {made.child}, {made.parent}, {made.ledger}")


@pytest.mark.parametrize("name", list(TABLE))
async def test_each_failure_maps_to_its_domain_error(deps: Dependencies, name: str) -> None:
    provoke, expected = TABLE[name]
    with pytest.raises(Exception) as caught:  # noqa: PT011 - which one is what we map
        await provoke(deps)
    err = dependency_error(caught.value)
    assert err is not None, f"{name}: {type(caught.value).__name__} is not mapped: {caught.value}"
    _check(deps, expected, err.code, err.reason, err.metadata, err.retry_after)


class ProvokingServicer(testing_pb2_grpc.TestingServiceServicer):
    """Behave runs the provocation named by probe.behaviour and lets its failure escape, as a
    handler that met it would."""

    def __init__(self) -> None:
        self.deps: Dependencies | None = None

    async def Behave(
        self, request: testing_pb2.BehaveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> testing_pb2.BehaveResponse:
        assert self.deps is not None
        provoke, _ = TABLE[request.probe.behaviour]
        await provoke(self.deps)
        return testing_pb2.BehaveResponse()


@pytest.fixture(scope="module")
async def provoking() -> AsyncIterator[tuple[ServiceApp, ProvokingServicer]]:
    settings = ServerSettings.model_validate(
        {
            "grpc_host": "127.0.0.1",
            "grpc_port": 0,
            "metrics_port": -1,
            "grace_period_seconds": 1,
            "internal_token": SecretStr(INTERNAL),
            "admin_token": SecretStr(INTERNAL + "-admin"),
        }
    )
    servicer = ProvokingServicer()  # type: ignore[abstract]  # only Behave is called
    app = ServiceApp("dependency-failures", settings)
    app.add_service(
        testing_pb2.DESCRIPTOR.services_by_name["TestingService"].full_name,
        testing_pb2_grpc.add_TestingServiceServicer_to_server,
        servicer,
    )
    await app.start()
    try:
        yield app, servicer
    finally:
        await app.stop(grace=1)


@pytest.mark.parametrize("name", list(TABLE))
async def test_a_grpc_client_receives_the_mapped_status(
    deps: Dependencies, provoking: tuple[ServiceApp, ProvokingServicer], name: str
) -> None:
    app, servicer = provoking
    servicer.deps = deps
    _, expected = TABLE[name]
    async with create_channel(app.target, token=INTERNAL) as channel:
        stub: Any = testing_pb2_grpc.TestingServiceStub(channel)
        request = testing_pb2.BehaveRequest(probe=testing_pb2.Probe(behaviour=name))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Behave(request, timeout=30)
    got = details_of(caught.value)
    assert "Error" not in got.message, f"a Python exception leaked: {got.message}"
    _check(deps, expected, got.code, got.reason, dict(got.metadata), got.retry_after)
