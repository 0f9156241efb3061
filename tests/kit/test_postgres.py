"""runops.kit.postgres against the session's real databases: settings per database (and the
exit 2 a DSN asyncpg cannot use causes), two databases in one process, read routing and
`transaction()`'s read-your-writes."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runops.kit.postgres import DatabaseSettings, database_field, open_database
from runops.kit.replica import Consistency, ReplicaRouter
from runops.kit.server import ServiceApp
from runops.kit.settings import ServerSettings, SettingsError, load_settings
from runops.localstack import LocalStack, PostgresDatabase
from runops.localstack.ports import free_port

REPO = Path(__file__).resolve().parents[2]


class TwoDatabases(ServerSettings):
    """Like the run store: the control-plane database (LEGACY) and the run-ops one (NEW)."""

    controlplane_db: DatabaseSettings = database_field()
    runops_db: DatabaseSettings = database_field()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("RUNOPS_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_each_database_reads_its_own_variables(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RUNOPS_CONTROLPLANE_DB_WRITER_URL", "postgresql://cp@writer:5432/cp")
    # Two replicas; the first is a multi-host DSN (its comma separates hosts, not DSNs).
    clean_env.setenv(
        "RUNOPS_CONTROLPLANE_DB_REPLICA_URL",
        "postgresql://cp@r1:5432,r2:5433/cp, postgres://cp@r3/cp",
    )
    clean_env.setenv("RUNOPS_RUNOPS_DB_WRITER_URL", "postgres://ro@writer2/runops")
    clean_env.setenv("RUNOPS_RUNOPS_DB_POOL_MAX_SIZE", "3")
    clean_env.setenv("RUNOPS_RUNOPS_DB_REPLICA_TIMEOUT_SECONDS", "0.5")
    settings = load_settings(TwoDatabases)
    assert settings.controlplane_db.writer_dsn == "postgresql://cp@writer:5432/cp"
    assert settings.controlplane_db.replica_dsns == (
        "postgresql://cp@r1:5432,r2:5433/cp",
        "postgres://cp@r3/cp",
    )
    assert settings.controlplane_db.pool_max_size == 10
    assert settings.runops_db.writer_dsn == "postgres://ro@writer2/runops"
    assert settings.runops_db.replica_dsns == ()
    assert settings.runops_db.pool_max_size == 3
    assert settings.runops_db.replica_timeout_seconds == 0.5


def test_bad_database_settings_name_their_variables(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RUNOPS_CONTROLPLANE_DB_WRITER_URL", "postgresql+psycopg://cp:s3cret@h/cp")
    clean_env.setenv("RUNOPS_CONTROLPLANE_DB_REPLICA_URL", "postgresql://h/cp,mysql://h/cp")
    clean_env.setenv("RUNOPS_CONTROLPLANE_DB_POOL_MAXSIZE", "3")  # a typo is not ignored
    with pytest.raises(SettingsError) as info:
        load_settings(TwoDatabases)
    message = str(info.value)
    assert "RUNOPS_CONTROLPLANE_DB_WRITER_URL: URL scheme should be" in message
    assert "RUNOPS_CONTROLPLANE_DB_REPLICA_URL: URL scheme should be" in message
    assert "RUNOPS_CONTROLPLANE_DB_POOL_MAXSIZE" in message
    # Nothing given for the second database: named by its variable, not as a missing block.
    assert "RUNOPS_RUNOPS_DB_WRITER_URL: Field required" in message
    assert "s3cret" not in message


def test_a_dsn_asyncpg_cannot_use_stops_a_service_process_with_exit_2() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNOPS_")}
    env |= {
        "PYTHONPATH": f"{REPO / 'shared'}:{REPO}",
        "RUNOPS_CONTROLPLANE_DB_WRITER_URL": "postgresql+psycopg://cp:s3cret@127.0.0.1/cp",
        "RUNOPS_CONTROLPLANE_DB_REPLICA_URL": "mysql://127.0.0.1/cp",
        "RUNOPS_GRPC_PORT": "0",
        "RUNOPS_METRICS_PORT": "-1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "services.controlplane"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "RUNOPS_CONTROLPLANE_DB_WRITER_URL" in proc.stderr
    assert "RUNOPS_CONTROLPLANE_DB_REPLICA_URL" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "s3cret" not in proc.stderr


# -- against the session's databases -------------------------------------------------------


def _server_settings() -> ServerSettings:
    return load_settings(
        ServerSettings,
        grpc_host="127.0.0.1",
        grpc_port=0,
        metrics_port=-1,
        health_check_interval_seconds=0.1,
    )


def _database(db: PostgresDatabase, **overrides: Any) -> DatabaseSettings:
    values: dict[str, Any] = {"writer_url": db.writer_dsn, "replica_url": db.replica_dsn}
    return DatabaseSettings.model_validate(values | overrides)


async def _health(app: ServiceApp) -> int:
    async with grpc.aio.insecure_channel(app.target) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(reply.status)


async def test_two_databases_in_one_process(stack: LocalStack) -> None:
    app = ServiceApp("kit-two-dbs", _server_settings())
    legacy = await open_database(app, "controlplane-db", _database(stack.controlplane_db))
    new = await open_database(app, "runops-db", _database(stack.runops_db))
    await app.start()
    try:
        assert await _health(app) == health_pb2.HealthCheckResponse.SERVING

        async def name(conn: Any) -> str:
            return str(await conn.fetchval("SELECT current_database()"))

        assert await legacy.read(name) == "runops_controlplane"
        assert await new.read(name) == "runops"
        async with new.transaction() as conn:
            assert await name(conn) == "runops"
    finally:
        await app.stop(grace=1)
    # The close hooks ran: both databases' pools are closed.
    for router in (legacy, new):
        assert all(pool.is_closing() for pool in (router.writer, *router.replicas))


async def test_health_follows_every_writer(stack: LocalStack) -> None:
    app = ServiceApp("kit-dead-db", _server_settings())
    await open_database(app, "controlplane-db", _database(stack.controlplane_db))
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/runops"
    await open_database(app, "runops-db", DatabaseSettings.model_validate({"writer_url": dead}))
    await app.start()
    try:
        assert await _health(app) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await app.stop(grace=1)


@pytest.fixture
async def probe(stack: LocalStack) -> AsyncIterator[tuple[asyncpg.Connection, str]]:
    """A fresh table on the run-ops writer (replayed on the replica), dropped afterwards. Made by
    the migrations role, like every table the services' role reads and writes."""
    table = f"probe_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(stack.runops_db.migrator_dsn)
    try:
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        await stack.runops_db.wait_for_replica()
        yield conn, table
        await conn.execute(f"DROP TABLE {table}")
    finally:
        await conn.close()


async def test_default_reads_go_to_the_replica_and_transactions_read_their_writes(
    stack: LocalStack, probe: tuple[asyncpg.Connection, str]
) -> None:
    if not stack.runops_db.has_replica:
        pytest.skip("needs a streaming replica")
    writer, table = probe
    settings = _database(stack.runops_db)
    router = ReplicaRouter(
        await asyncpg.create_pool(settings.writer_dsn, min_size=0),
        [await asyncpg.create_pool(settings.replica_dsns[0], min_size=0)],
    )

    async def ids(conn: Any) -> set[int]:
        return {row["id"] for row in await conn.fetch(f"SELECT id FROM {table}")}

    try:
        async with stack.runops_db.replay_paused():
            # Written behind the router's back: a replica read cannot see it yet.
            await writer.execute(f"INSERT INTO {table} VALUES (1)")
            assert await router.read(ids) == set()
            assert await router.read(ids, consistency=Consistency.WRITER) == {1}
            # Written through the router: its position is known, so reads avoid the replica
            # until it has replayed that far.
            async with router.transaction() as conn:
                await conn.execute(f"INSERT INTO {table} VALUES (2)")
            assert await router.read(ids) == {1, 2}
        await stack.runops_db.wait_for_replica()
        # Resumed: the replica has replayed both and serves the read again.
        await writer.execute(f"INSERT INTO {table} VALUES (3)")
        async with stack.runops_db.replay_paused():
            assert await router.read(ids) in ({1, 2}, {1, 2, 3})
            assert await router.read(ids, consistency=Consistency.WRITER) == {1, 2, 3}
    finally:
        await router.close()
