"""Where uncached control-plane reads go, and what callers see while a database server stops,
hangs or comes back, on a cluster of its own (these tests take its servers away; the session's
stack stays untouched):

- default reads are answered by the replica (a row changed behind the service's back is not
  seen while replay is paused);
- a stopped or hung (SIGSTOP) replica sends reads to the writer promptly, health stays SERVING,
  and reads return to the replica once it is back;
- a stopped writer answers UNAVAILABLE with RetryInfo and NOT_SERVING, and the service recovers
  by itself when it starts again; a hung writer is NOT_SERVING too;
- under load, stopping the replica and then the writer answers only OK or UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.kit.channels import create_channel
from runops.kit.errors import details_of
from runops.localstack import CONTROLPLANE_DATABASE, LocalStack, PostgresCluster
from runops.localstack.settings import ADMIN_TOKEN, INTERNAL_TOKEN
from services.controlplane.app import ControlPlane
from tests.controlplane.harness import (
    Stub,
    seed,
    start_control_plane,
    stub,
)
from tests.harness import expect_error, private_postgres, until

# Every read reaches the database (1 us TTL, one entry).
UNCACHED = {"cache_ttl_seconds": 1e-6, "cache_max_entries": 1}
# The bound: a hung replica must not hold reads anywhere near a caller's deadline.
DEADLINE_SECONDS = 5.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PostgresCluster]:
    """A control-plane database (writer + streaming replica) for these tests alone."""
    state_dir = Path(tmp_path_factory.mktemp("faults"))
    async with private_postgres("faults", state_dir, CONTROLPLANE_DATABASE, "controlplane") as pg:
        yield pg


@pytest.fixture(scope="module")
async def plane(stack: LocalStack, cluster: PostgresCluster) -> AsyncIterator[ControlPlane]:
    database = {
        "writer_url": cluster.writer_dsn,
        "replica_url": cluster.replica_dsn,
        "replica_timeout_seconds": 0.5,
        # Far above every wait here: a hung server must be detected by the router's own
        # timeouts, not by asyncpg's command timeout (statement timeout + 1 s) running out.
        "statement_timeout_seconds": 60,
    }
    started = await start_control_plane(stack, controlplane_db=database, **UNCACHED)
    yield started
    await started.app.stop(grace=1)


@pytest.fixture(scope="module")
def admin(plane: ControlPlane) -> Stub:
    return stub(plane.app.target, ADMIN_TOKEN)


@pytest.fixture(scope="module")
def internal(plane: ControlPlane) -> Stub:
    return stub(plane.app.target, INTERNAL_TOKEN)


@pytest.fixture(scope="module")
def health(plane: ControlPlane) -> Any:
    return health_pb2_grpc.HealthStub(create_channel(plane.app.target))


@pytest.fixture
async def env_id(admin: Stub, cluster: PostgresCluster) -> str:
    seeded = await seed(admin)
    await cluster.wait_for_replica()
    return seeded.env_id


async def paused(internal: Stub, env_id: str) -> bool:
    reply = await internal.GetEnvironment(
        cp.GetEnvironmentRequest(environment_id=env_id), timeout=DEADLINE_SECONDS
    )
    return reply.environment.paused


async def status(health: Any) -> int:
    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE_SECONDS)
    return int(reply.status)


async def reads_the_replica(cluster: PostgresCluster, internal: Stub, env_id: str) -> bool:
    """Whether an uncached read is answered by the replica: with its replay paused, a change
    made on the writer behind the service's back (no invalidation) cannot be seen there."""
    await cluster.wait_for_replica()
    before = await paused(internal, env_id)
    async with cluster.replay_paused():
        writer = await asyncpg.connect(cluster.writer_dsn)
        try:
            await writer.execute(
                "UPDATE runtime_environments SET paused = NOT paused WHERE id = $1", env_id
            )
        finally:
            await writer.close()
        seen = await paused(internal, env_id)
    await cluster.wait_for_replica()
    assert await paused(internal, env_id) != before  # the change itself happened
    return seen == before


async def test_default_reads_go_to_the_replica(
    cluster: PostgresCluster, internal: Stub, env_id: str
) -> None:
    assert await reads_the_replica(cluster, internal, env_id)


async def test_reads_fall_back_to_the_writer_while_the_replica_is_down(
    cluster: PostgresCluster, internal: Stub, health: Any, env_id: str
) -> None:
    await asyncio.to_thread(cluster.stop_server, "replica")
    try:
        for _ in range(5):
            assert not await paused(internal, env_id)
        assert await status(health) == SERVING
    finally:
        await asyncio.to_thread(cluster.start_server, "replica")

    async def back() -> bool:
        return await reads_the_replica(cluster, internal, env_id)

    await until(back, limit=20, interval=0.2)


async def test_a_hung_replica_sends_reads_to_the_writer_promptly(
    cluster: PostgresCluster, internal: Stub, health: Any, env_id: str, plane: ControlPlane
) -> None:
    interval = plane.app.settings.health_check_interval_seconds
    with cluster.suspended("replica"):
        # Each read answers within its deadline, from the writer (the replica answers nothing).
        for _ in range(10):
            assert not await paused(internal, env_id)
        # Several health-check rounds: the replica is not a dependency of health.
        for _ in range(5):
            assert await status(health) == SERVING
            await asyncio.sleep(interval)

    async def back() -> bool:
        return await reads_the_replica(cluster, internal, env_id)

    await until(back, limit=20, interval=0.2)


async def test_a_stopped_writer_is_unavailable_then_recovers_without_a_restart(
    cluster: PostgresCluster, admin: Stub, internal: Stub, health: Any, env_id: str
) -> None:
    def create() -> Any:
        slug = f"org-{secrets.token_hex(4)}"
        return admin.CreateOrganization(
            cp.CreateOrganizationRequest(slug=slug, title="t"), timeout=DEADLINE_SECONDS
        )

    await asyncio.to_thread(cluster.stop_server, "writer")
    try:
        exc = await expect_error(create(), grpc.StatusCode.UNAVAILABLE)
        assert details_of(exc).retry_after is not None

        async def not_serving() -> bool:
            return await status(health) == NOT_SERVING

        await until(not_serving, limit=5)
    finally:
        await asyncio.to_thread(cluster.start_server, "writer")

    async def serving() -> bool:
        return await status(health) == SERVING

    await until(serving, limit=20, interval=0.1)
    await create()
    assert not await paused(internal, env_id)


async def test_a_hung_writer_is_not_serving(cluster: PostgresCluster, health: Any) -> None:
    """The health check times out on a writer that answers nothing (it does not only notice
    refused connections), and follows it back."""

    async def is_(wanted: int) -> bool:
        return await status(health) == wanted

    with cluster.suspended("writer"):
        await until(lambda: is_(NOT_SERVING), limit=10, interval=0.1)
    await until(lambda: is_(SERVING), limit=20, interval=0.1)


async def test_stopping_servers_under_load_answers_only_ok_or_unavailable(
    cluster: PostgresCluster, admin: Stub, internal: Stub, health: Any, env_id: str
) -> None:
    codes: collections.Counter[str] = collections.Counter()
    wrong: list[str] = []
    done = asyncio.Event()

    async def call(make: Any) -> None:
        try:
            await make()
            codes["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            codes[exc.code().name] += 1
            retry = details_of(exc).retry_after
            if exc.code() != grpc.StatusCode.UNAVAILABLE or retry is None:
                wrong.append(f"{exc.code().name} (retry_after={retry}): {exc.details()}")
            await asyncio.sleep(0.01)

    async def reads() -> None:
        while not done.is_set():
            await call(lambda: paused(internal, env_id))

    async def writes() -> None:
        request = cp.PauseEnvironmentRequest(environment_id=env_id)
        undo = cp.ResumeEnvironmentRequest(environment_id=env_id)
        while not done.is_set():
            await call(lambda: admin.PauseEnvironment(request, timeout=DEADLINE_SECONDS))
            await call(lambda: admin.ResumeEnvironment(undo, timeout=DEADLINE_SECONDS))

    load = [asyncio.create_task(reads()) for _ in range(6)]
    load += [asyncio.create_task(writes()) for _ in range(2)]
    try:
        await asyncio.sleep(0.5)
        await asyncio.to_thread(cluster.stop_server, "replica")
        await asyncio.sleep(0.5)
        await asyncio.to_thread(cluster.stop_server, "writer")
        await asyncio.sleep(0.5)
    finally:
        await asyncio.to_thread(cluster.start_server, "writer")
        await asyncio.to_thread(cluster.start_server, "replica")

    async def serving() -> bool:
        return await status(health) == SERVING

    try:
        await until(serving, limit=20, interval=0.1)
        await asyncio.sleep(0.5)
    finally:
        done.set()
        await asyncio.gather(*load)
    assert not wrong, f"{len(wrong)} calls answered otherwise, e.g. {wrong[:5]} ({codes})"
    # The load ran through both stops (else this proves nothing), and serves after them.
    assert codes["UNAVAILABLE"] > 0, codes
    assert codes["OK"] > 0, codes
    before = codes["OK"]
    await call(lambda: paused(internal, env_id))
    assert codes["OK"] == before + 1
