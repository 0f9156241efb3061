"""Session-wide real servers for the tests: the local stack (or servers you already run).

Every server option also reads an environment variable, e.g. `--redis-url` or
RUNOPS_TEST_REDIS_URL; anything not given is started locally, once per session:

    pytest --controlplane-db-writer postgresql://postgres@127.0.0.1:5432/runops_controlplane \\
           --redis-url redis://127.0.0.1:6379/0 --s3-endpoint http://127.0.0.1:9000

The Redis Cluster starts only when a test asks for the `redis_cluster` fixture.
"""

from __future__ import annotations

import os

# The tests fork+exec servers and services while grpc.aio is busy; gRPC's fork handlers are
# for fork without exec and only add risk (gRPC issues 17986, 37259). Before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from runops.kit.redis import warm_up
from runops.localstack import ExternalServers, LocalStack, PostgresDatabase, printing_progress

ENV_PREFIX = "RUNOPS_TEST_"
SERVER_OPTIONS = {
    "controlplane-db-writer": "DSN of a running control-plane database writer",
    "controlplane-db-replica": "DSN of its streaming replica (tests needing one skip without)",
    "runops-db-writer": "DSN of a running run-ops database writer",
    "runops-db-replica": "DSN of its streaming replica (tests needing one skip without)",
    "redis-url": "URL of a running standalone Redis",
    "redis-cluster-nodes": "comma-separated host:port of a running Redis Cluster's masters",
    "s3-endpoint": "URL of a running S3-compatible endpoint (the bucket is created if missing)",
}


def _env_name(option: str) -> str:
    return ENV_PREFIX + option.upper().replace("-", "_")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("runops", "runops servers (default: started locally per session)")
    # The end-to-end suite (tests/e2e) against a running suite instead of its own processes.
    group.addoption(
        "--e2e-env-file",
        default=os.environ.get("RUNOPS_E2E_ENV_FILE") or None,
        help="tests/e2e drive the suite this env file names (runops up's runops.env, "
        "docker/e2e.env for compose) instead of starting one [env RUNOPS_E2E_ENV_FILE]",
    )
    for option, text in SERVER_OPTIONS.items():
        env = _env_name(option)
        group.addoption(
            f"--{option}",
            default=os.environ.get(env) or None,
            help=f"{text} [env {env}]",
        )


def _external(config: pytest.Config) -> ExternalServers:
    def opt(name: str) -> str | None:
        value: Any = config.getoption(name.replace("-", "_"))
        return str(value) if value else None

    nodes = opt("redis-cluster-nodes")
    return ExternalServers(
        controlplane_db_writer=opt("controlplane-db-writer"),
        controlplane_db_replica=opt("controlplane-db-replica"),
        runops_db_writer=opt("runops-db-writer"),
        runops_db_replica=opt("runops-db-replica"),
        redis_url=opt("redis-url"),
        redis_cluster_nodes=tuple(n.strip() for n in nodes.split(",") if n.strip())
        if nodes
        else None,
        s3_endpoint=opt("s3-endpoint"),
    )


@pytest.fixture(scope="session")
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    """The local stack, started once per session (migrations applied), stopped at the end."""
    local = LocalStack(
        tmp_path_factory.mktemp("stack"),
        external=_external(request.config),
        progress=printing_progress("stack"),
    )
    local.start()
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="session")
def redis_cluster(stack: LocalStack) -> list[str]:
    """host:port of the 3-master Redis Cluster's nodes; started on first use."""
    return stack.start_redis_cluster()


@pytest.fixture(scope="session")
def controlplane_db(stack: LocalStack) -> PostgresDatabase:
    return stack.controlplane_db


@pytest.fixture(scope="session")
def runops_db(stack: LocalStack) -> PostgresDatabase:
    return stack.runops_db


async def _connection(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def _pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=10)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def controlplane_writer(
    controlplane_db: PostgresDatabase,
) -> AsyncIterator[asyncpg.Connection]:
    async for conn in _connection(controlplane_db.admin_writer_dsn):
        yield conn


@pytest.fixture
async def controlplane_replica(
    controlplane_db: PostgresDatabase,
) -> AsyncIterator[asyncpg.Connection]:
    async for conn in _connection(controlplane_db.admin_replica_dsn):
        yield conn


@pytest.fixture
async def runops_writer(runops_db: PostgresDatabase) -> AsyncIterator[asyncpg.Connection]:
    async for conn in _connection(runops_db.admin_writer_dsn):
        yield conn


@pytest.fixture
async def runops_replica(runops_db: PostgresDatabase) -> AsyncIterator[asyncpg.Connection]:
    async for conn in _connection(runops_db.admin_replica_dsn):
        yield conn


@pytest.fixture
async def controlplane_pool(controlplane_db: PostgresDatabase) -> AsyncIterator[asyncpg.Pool]:
    async for pool in _pool(controlplane_db.admin_writer_dsn):
        yield pool


@pytest.fixture
async def runops_pool(runops_db: PostgresDatabase) -> AsyncIterator[asyncpg.Pool]:
    async for pool in _pool(runops_db.admin_writer_dsn):
        yield pool


@pytest.fixture
async def redis_client(stack: LocalStack) -> AsyncIterator[aioredis.Redis]:
    """A client of the standalone Redis (shared by the session: use unique keys)."""
    client = aioredis.Redis.from_url(stack.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def redis_cluster_client(redis_cluster: list[str]) -> AsyncIterator[RedisCluster]:
    nodes = [
        ClusterNode(host, int(port)) for host, port in (n.rsplit(":", 1) for n in redis_cluster)
    ]
    client = RedisCluster(startup_nodes=nodes)
    # Its slot map loaded before any test's burst of first commands (`runops.kit.redis.warm_up`:
    # redis-py's async RedisCluster breaks connections when many start at once on a cold client;
    # seen as a CI flake of tests/ingest/test_ratelimit.py::test_on_redis_cluster).
    assert await warm_up(client), "the session's Redis Cluster does not answer"
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def s3_client(stack: LocalStack) -> AsyncIterator[Any]:
    """An aiobotocore S3 client for the stack's endpoint (bucket: stack.s3_bucket)."""
    from aiobotocore.session import get_session

    env = stack.service_env()
    async with get_session().create_client(
        "s3",
        endpoint_url=stack.s3_endpoint_url,
        region_name=stack.s3_region,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    ) as client:
        yield client
