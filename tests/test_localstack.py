"""The local stack against itself: real PostgreSQL replication and replay control, migrations,
Redis (standalone and cluster), S3 through aiobotocore, and clean start failures."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from runops import migrations, registry
from runops.localstack import ExternalServers, LocalStack, PostgresDatabase, StackError, ports
from runops.localstack.ports import CLUSTER_MAX_PORT, free_cluster_port, is_listening
from runops.migrations import MigrationError, migrate

REPO = Path(__file__).resolve().parents[1]
DATABASES = ["controlplane", "runops"]


def _db(stack: LocalStack, name: str) -> PostgresDatabase:
    return stack.controlplane_db if name == "controlplane" else stack.runops_db


@pytest.fixture
async def probe_table(stack: LocalStack, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A fresh table on the parametrized database's writer, dropped afterwards."""
    db = _db(stack, request.param)
    table = f"probe_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(db.admin_writer_dsn)
    try:
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, note text)")
        yield table
        await conn.execute(f"DROP TABLE {table}")
    finally:
        await conn.close()


async def _replica_has(db: PostgresDatabase, table: str, row_id: int) -> bool:
    conn = await asyncpg.connect(db.admin_replica_dsn)
    try:
        return bool(await conn.fetchval(f"SELECT count(*) FROM {table} WHERE id = $1", row_id))
    finally:
        await conn.close()


@pytest.mark.parametrize("probe_table", DATABASES, indirect=True)
async def test_replica_replicates_and_replay_pause_holds_rows_back(
    stack: LocalStack, probe_table: str, request: pytest.FixtureRequest
) -> None:
    name = request.node.callspec.params["probe_table"]
    db = _db(stack, name)
    if not db.has_replica:
        pytest.skip(f"the {name} database was given without a replica")
    assert db.replica_dsn != db.writer_dsn
    writer = await asyncpg.connect(db.admin_writer_dsn)
    try:
        await writer.execute(f"INSERT INTO {probe_table} VALUES (1, 'before pause')")
        await db.wait_for_replica(timeout=10)
        assert await _replica_has(db, probe_table, 1)

        async with db.replay_paused():
            assert await db.is_replay_paused()
            await writer.execute(f"INSERT INTO {probe_table} VALUES (2, 'while paused')")
            await asyncio.sleep(0.5)  # far more than replication needs when replay runs
            assert not await _replica_has(db, probe_table, 2)
            with pytest.raises(TimeoutError):
                await db.wait_for_replica(timeout=0.3)
            assert await writer.fetchval(f"SELECT count(*) FROM {probe_table}") == 2

        assert not await db.is_replay_paused()
        await db.wait_for_replica(timeout=10)
        assert await _replica_has(db, probe_table, 2)
    finally:
        await writer.close()


async def test_replica_is_read_only_and_databases_are_separate(stack: LocalStack) -> None:
    ids = set()
    for name, expected in (("controlplane", "runops_controlplane"), ("runops", "runops")):
        db = _db(stack, name)
        writer = await asyncpg.connect(db.writer_dsn)
        replica = await asyncpg.connect(db.replica_dsn)
        try:
            assert await writer.fetchval("SELECT current_database()") == expected
            assert await replica.fetchval("SELECT current_database()") == expected
            assert await writer.fetchval("SELECT pg_is_in_recovery()") is False
            if db.has_replica:
                assert await replica.fetchval("SELECT pg_is_in_recovery()") is True
                with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                    await replica.execute("CREATE TABLE nope (id int)")
            ids.add(await writer.fetchval("SELECT system_identifier FROM pg_control_system()"))
        finally:
            await writer.close()
            await replica.close()
    assert len(ids) == 2, "the two databases must be different clusters"


async def test_connection_fixtures_point_at_writer_and_replica(
    runops_writer: asyncpg.Connection,
    runops_replica: asyncpg.Connection,
    controlplane_pool: asyncpg.Pool,
    runops_db: PostgresDatabase,
) -> None:
    assert await runops_writer.fetchval("SELECT pg_is_in_recovery()") is False
    assert await runops_replica.fetchval("SELECT pg_is_in_recovery()") is runops_db.has_replica
    assert await controlplane_pool.fetchval("SELECT current_database()") == "runops_controlplane"


async def test_services_connect_as_a_least_privilege_role(stack: LocalStack) -> None:
    """The DSNs handed to services are not the superuser's: their role may read and write the
    migrated tables, follow WAL positions and LISTEN, but not change the schema."""
    env = stack.service_env()
    for name in DATABASES:
        db = _db(stack, name)
        if db.writer_dsn == db.admin_writer_dsn:
            pytest.skip(f"the {name} database was given by URL: its roles are the operator's")
        assert env[f"RUNOPS_{name.upper()}_DB_WRITER_URL"] == db.writer_dsn
        for dsn in (db.writer_dsn, db.replica_dsn, db.migrator_dsn):
            conn = await asyncpg.connect(dsn)
            try:
                role = await conn.fetchrow(
                    "SELECT rolname, rolsuper, rolcreatedb, rolcreaterole, rolreplication,"
                    " rolbypassrls FROM pg_roles WHERE rolname = current_user"
                )
            finally:
                await conn.close()
            assert role is not None
            assert role["rolname"] != "postgres"
            assert not any(role[k] for k in list(role.keys())[1:]), dict(role)
        service = await asyncpg.connect(db.writer_dsn)
        try:
            # (Tests may add superuser-owned scratch tables: look at migrated ones only.)
            owners = await service.fetch(
                "SELECT tablename, tableowner FROM pg_tables"
                " WHERE tablename IN ('runops_schema_migrations', 'organizations', 'api_keys')"
            )
            assert owners
            assert {r["tableowner"] for r in owners} == {"runops_migrator"}
            await service.fetchval("SELECT pg_current_wal_insert_lsn()")
            await service.execute("LISTEN runops_probe")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await service.execute("CREATE TABLE not_mine (id int)")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await service.execute("DROP TABLE runops_schema_migrations")
        finally:
            await service.close()
        if db.has_replica:
            replica = await asyncpg.connect(db.replica_dsn)
            try:
                await replica.fetchval("SELECT pg_last_wal_replay_lsn()")
            finally:
                await replica.close()


# -- migrations -------------------------------------------------------------------------------


@pytest.fixture
async def scratch_dsn(stack: LocalStack) -> AsyncIterator[str]:
    """An empty database on the run-ops writer, so migration tests start from nothing."""
    name = f"scratch_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(stack.runops_db.admin_writer_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        yield stack.runops_db.admin_writer_dsn.rsplit("/", 1)[0] + f"/{name}"
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await admin.close()


def _write(root: Path, service: str, database: str, name: str, sql: str) -> None:
    directory = root / service / "migrations" / database
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(sql)


@pytest.fixture
def services_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in `services` package directory holding only what a test writes into it, and a
    registry whose services may migrate either database."""
    root = tmp_path / "services"
    root.mkdir()
    monkeypatch.setattr(registry, "services_roots", lambda: [root])
    anywhere = [dataclasses.replace(s, databases=registry.DATABASES) for s in registry.SERVICES]
    monkeypatch.setattr(registry, "SERVICES", tuple(anywhere))
    return root


async def test_migrations_apply_in_order_once(scratch_dsn: str, services_root: Path) -> None:
    # runstore's migration needs controlplane's table: service order matters, not file order.
    _write(
        services_root,
        "runstore",
        "runops",
        "0001_runs.sql",
        "CREATE TABLE runs (id text PRIMARY KEY, org text REFERENCES orgs (id));",
    )
    _write(
        services_root,
        "controlplane",
        "runops",
        "0002_more.sql",
        "ALTER TABLE orgs ADD COLUMN name text;",
    )
    _write(
        services_root,
        "controlplane",
        "runops",
        "0001_orgs.sql",
        "CREATE TABLE orgs (id text PRIMARY KEY);",
    )
    _write(services_root, "ingest", "controlplane", "0001_other_db.sql", "SELECT 1/0;")
    _write(services_root, "unknown", "runops", "0001_ignored.sql", "SELECT 1/0;")  # fmt: skip

    applied = await migrate(scratch_dsn, "runops")
    assert applied == ["controlplane/0001_orgs", "controlplane/0002_more", "runstore/0001_runs"]
    assert await migrate(scratch_dsn, "runops") == []

    conn = await asyncpg.connect(scratch_dsn)
    try:
        rows = await conn.fetch(
            "SELECT service, version FROM runops_schema_migrations ORDER BY applied_at, service"
        )
        assert {(r["service"], r["version"]) for r in rows} == {
            ("controlplane", "0001_orgs"),
            ("controlplane", "0002_more"),
            ("runstore", "0001_runs"),
        }
        await conn.execute("INSERT INTO orgs VALUES ('o1', 'n')")
    finally:
        await conn.close()

    _write(services_root, "mollifier", "runops", "0001_later.sql", "CREATE TABLE later (x int);")
    assert await migrate(scratch_dsn, "runops") == ["mollifier/0001_later"]


async def test_concurrent_migrators_apply_each_file_once(
    scratch_dsn: str, services_root: Path
) -> None:
    # Without the advisory lock the second CREATE TABLE would fail.
    _write(services_root, "runstore", "runops", "0001_slow.sql",
           "SELECT pg_sleep(0.2); CREATE TABLE slow (id int);")  # fmt: skip
    results = await asyncio.gather(*(migrate(scratch_dsn, "runops") for _ in range(4)))
    assert sorted(len(r) for r in results) == [0, 0, 0, 1]


async def test_failed_migration_rolls_back_and_names_the_file(
    scratch_dsn: str, services_root: Path
) -> None:
    _write(services_root, "runstore", "runops", "0001_ok.sql", "CREATE TABLE ok (id int);")
    _write(services_root, "runstore", "runops", "0002_bad.sql",
           "CREATE TABLE half (id int); SELECT * FROM missing_table;")  # fmt: skip
    with pytest.raises(MigrationError, match="runstore/0002_bad"):
        await migrate(scratch_dsn, "runops")
    conn = await asyncpg.connect(scratch_dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('ok') IS NOT NULL") is True
        assert await conn.fetchval("SELECT to_regclass('half') IS NULL") is True
        versions = await conn.fetch("SELECT version FROM runops_schema_migrations")
        assert [r["version"] for r in versions] == ["0001_ok"]
    finally:
        await conn.close()


def test_misnamed_migration_files_are_refused(services_root: Path) -> None:
    _write(services_root, "ingest", "runops", "1_no_padding.sql", "SELECT 1;")
    with pytest.raises(MigrationError, match="NNNN_lower_snake_name"):
        migrations.discover("runops")
    with pytest.raises(ValueError, match="controlplane, runops"):
        migrations.discover("elsewhere")


def test_migrations_for_a_database_the_registry_does_not_list_are_refused(
    services_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingest = dataclasses.replace(registry.service("ingest"), databases=("controlplane",))
    monkeypatch.setattr(registry, "SERVICES", (ingest,))
    _write(services_root, "ingest", "controlplane", "0001_fine.sql", "SELECT 1;")
    _write(services_root, "ingest", "runops", "0001_undeclared.sql", "SELECT 1;")
    assert [m.label for m in migrations.discover("controlplane")] == ["ingest/0001_fine"]
    with pytest.raises(MigrationError, match=r"ingest.*does not list database 'runops'"):
        migrations.discover("runops")


async def test_stack_migrations_are_idempotent(stack: LocalStack) -> None:
    assert set(stack.migrations_applied) == {"controlplane", "runops"}
    for name in DATABASES:
        assert await migrate(_db(stack, name).migrator_dsn, name) == []
        conn = await asyncpg.connect(_db(stack, name).writer_dsn)
        try:
            count = await conn.fetchval("SELECT count(*) FROM runops_schema_migrations")
        finally:
            await conn.close()
        assert count == len(migrations.discover(name))


# -- redis and s3 ------------------------------------------------------------------------------


async def test_standalone_redis_answers(redis_client: aioredis.Redis) -> None:
    key = f"probe:{uuid.uuid4().hex}"
    assert await redis_client.ping() is True
    await redis_client.set(key, b"value", ex=30)
    assert await redis_client.get(key) == b"value"
    info = await redis_client.info("server")
    assert info["redis_mode"] == "standalone"


async def test_s3_round_trip_through_aiobotocore(stack: LocalStack, s3_client: Any) -> None:
    key = f"packets/test/{uuid.uuid4().hex}/payload"
    body = os.urandom(256 * 1024)
    await s3_client.put_object(Bucket=stack.s3_bucket, Key=key, Body=body)
    response = await s3_client.get_object(Bucket=stack.s3_bucket, Key=key)
    async with response["Body"] as stream:
        assert await stream.read() == body
    listed = await s3_client.list_objects_v2(Bucket=stack.s3_bucket, Prefix=key)
    assert [o["Key"] for o in listed["Contents"]] == [key]


@pytest.mark.cluster
async def test_redis_cluster_spreads_keys_across_masters(
    redis_cluster: list[str], redis_cluster_client: RedisCluster, stack: LocalStack
) -> None:
    assert len(redis_cluster) == 3
    assert all(int(node.rsplit(":", 1)[1]) <= CLUSTER_MAX_PORT for node in redis_cluster)
    # Started on demand (not with_cluster): services keep the standalone Redis.
    assert "RUNOPS_REDIS_CLUSTER_NODES" not in stack.service_env()
    prefix = uuid.uuid4().hex
    keys = [f"{prefix}:{i}" for i in range(60)]
    for key in keys:
        await redis_cluster_client.set(key, key, ex=30)
    for key in keys:
        assert await redis_cluster_client.get(key) == key.encode()
    owners = set()
    for key in keys:
        node = redis_cluster_client.get_node_from_key(key)
        assert node is not None
        owners.add(node.name)
    assert len(owners) == 3, "60 random keys should land on all three masters"
    # A hash tag pins keys to one slot, which is what multi-key Lua scripts rely on.
    tagged = [f"{{{prefix}}}:{i}" for i in range(5)]
    assert len({redis_cluster_client.keyslot(k) for k in tagged}) == 1
    assert (await redis_cluster_client.cluster_info())["cluster_state"] == "ok"


# -- the stack itself --------------------------------------------------------------------------


def test_service_env_names(stack: LocalStack) -> None:
    env = stack.service_env()
    for name in (
        "RUNOPS_CONTROLPLANE_DB_WRITER_URL",
        "RUNOPS_CONTROLPLANE_DB_REPLICA_URL",
        "RUNOPS_RUNOPS_DB_WRITER_URL",
        "RUNOPS_RUNOPS_DB_REPLICA_URL",
        "RUNOPS_REDIS_URL",
        "RUNOPS_S3_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ):
        assert env[name], name
    assert env["RUNOPS_S3_BUCKET"] == "runops-packets"
    assert env["RUNOPS_S3_REGION"] == "us-east-1"
    assert env["RUNOPS_CONTROLPLANE_DB_WRITER_URL"].endswith("/runops_controlplane")
    assert env["RUNOPS_RUNOPS_DB_WRITER_URL"].endswith("/runops")


def test_stack_from_running_servers_starts_nothing(stack: LocalStack) -> None:
    # Servers given by URL are used as given, for services and migrations alike: here the
    # superuser's DSNs, as an operator running the tests against their own servers would.
    env = {
        **stack.service_env(),
        "RUNOPS_CONTROLPLANE_DB_WRITER_URL": stack.controlplane_db.admin_writer_dsn,
        "RUNOPS_CONTROLPLANE_DB_REPLICA_URL": stack.controlplane_db.admin_replica_dsn,
        "RUNOPS_RUNOPS_DB_WRITER_URL": stack.runops_db.admin_writer_dsn,
        "RUNOPS_RUNOPS_DB_REPLICA_URL": stack.runops_db.admin_replica_dsn,
    }
    reused = LocalStack(
        external=ExternalServers(
            controlplane_db_writer=env["RUNOPS_CONTROLPLANE_DB_WRITER_URL"],
            controlplane_db_replica=env["RUNOPS_CONTROLPLANE_DB_REPLICA_URL"],
            runops_db_writer=env["RUNOPS_RUNOPS_DB_WRITER_URL"],
            runops_db_replica=env["RUNOPS_RUNOPS_DB_REPLICA_URL"],
            redis_url=env["RUNOPS_REDIS_URL"],
            redis_cluster_nodes=("127.0.0.1:1", "127.0.0.1:2"),
            s3_endpoint=env["RUNOPS_S3_ENDPOINT_URL"],
        )
    ).start()
    try:
        assert reused.migrations_applied == {"controlplane": [], "runops": []}
        assert reused.start_redis_cluster() == ["127.0.0.1:1", "127.0.0.1:2"]
        assert reused.service_env() == {
            **env,
            "RUNOPS_REDIS_CLUSTER_NODES": "127.0.0.1:1,127.0.0.1:2",
        }
    finally:
        reused.stop()
    assert is_listening(int(env["RUNOPS_REDIS_URL"].rsplit(":", 1)[1].split("/")[0]))


def test_failed_start_stops_what_did_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNOPS_PG_BIN_DIR", str(tmp_path / "no-postgres-here"))
    broken = LocalStack(tmp_path / "state")
    with pytest.raises(StackError, match="apt-get install postgresql-15") as failure:
        broken.start()
    assert "postgres controlplane:" in str(failure.value)
    assert "redis:" not in str(failure.value)  # it did start, so stopping it is what we test
    assert "s3:" not in str(failure.value)
    # Redis and S3 came up concurrently with the failing databases and must be gone again.
    for url in (broken.redis_url, broken.s3_endpoint_url):
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert not is_listening(port), f"{url} still answers after a failed start"


def test_cluster_ports_leave_room_for_the_bus_port() -> None:
    for _ in range(20):
        assert free_cluster_port() <= CLUSTER_MAX_PORT


def test_a_port_another_process_was_handed_is_not_handed_out_until_it_exits() -> None:
    """Two test sessions on one machine never get the same port (SO_REUSEPORT servers of one
    user would share it silently): the other process's claims hold until it exits."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from runops.localstack.ports import free_port, free_cluster_port; "
            "print(*[free_port() for _ in range(5)], free_cluster_port(), flush=True); "
            "sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": f"{REPO / 'shared'}:{REPO}"},
    )
    assert holder.stdout is not None
    assert holder.stdin is not None
    held = [int(port) for port in holder.stdout.readline().split()]
    held.append(held[-1] + 10000)  # the cluster port's bus port
    try:
        assert len(set(held)) == 7, held
        assert [port for port in held if ports._hand_out(port)] == []
    finally:
        holder.stdin.close()
        assert holder.wait(10) == 0
    # Gone with it: the ports are free to hand out again (and stay ours until we exit).
    assert all(ports._hand_out(port) for port in held)


def test_cli_help_is_fast_and_lists_commands() -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "runops.cli.main", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
        timeout=30,
    )
    assert "up" in done.stdout
    assert "protos" in done.stdout
    # Lazy imports: --help must not pull in the stack, asyncpg or grpc.
    for heavy in ("asyncpg", "grpc", "runops.localstack", "botocore"):
        assert f" {heavy}\n" not in done.stderr, f"runops --help imports {heavy}"


@pytest.mark.slow
def test_runops_up_check_starts_and_stops_cleanly(tmp_path: Path) -> None:
    # This checkout's runops, not an editable install's: `runops up` passes it on to services.
    pythonpath = os.pathsep.join((str(REPO / "shared"), str(REPO)))
    done = subprocess.run(
        [sys.executable, "-m", "runops.cli.main", "up", "--check", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": pythonpath},
        timeout=240,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "controlplane db writer:  postgresql://" in done.stdout
    assert "s3:" in done.stdout
    assert "controlplane:            grpc 127.0.0.1:" in done.stdout  # the registry's services
    ports = [
        int(line.rsplit(":", 1)[1].split("/")[0])
        for line in done.stdout.splitlines()
        if "postgresql://" in line or "redis://" in line
    ]
    assert ports, output
    assert not any(is_listening(port) for port in ports), "servers still running after --check"
