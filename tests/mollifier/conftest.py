"""The mollifier core against real Redis: every test here runs twice, against the standalone
server and against the 3-master Redis Cluster (fixture `redis`)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runops.kit.redis import RedisClient, RedisSettings, connect_redis
from runops.localstack import LocalStack
from runops.localstack.redis import RedisServer
from services.controlplane.app import ControlPlane
from services.mollifier.app import Mollifier
from services.mollifier.buffer import MollifierBuffer
from services.runstore.app import RunStoreApp
from tests.controlplane.harness import Seeded, start_control_plane
from tests.mollifier.service_harness import seeded_env, start_mollifier
from tests.runstore.harness import start_on_stack


@pytest.fixture(params=["standalone", "cluster"])
async def redis(request: pytest.FixtureRequest) -> AsyncIterator[RedisClient]:
    """The kit's client (runops.kit.redis) of the standalone Redis or of the Cluster (keys
    must be unique per test)."""
    if request.param == "standalone":
        settings = RedisSettings(url=request.getfixturevalue("stack").redis_url)
    else:
        settings = RedisSettings(cluster_nodes=tuple(request.getfixturevalue("redis_cluster")))
    client = await connect_redis(settings)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test alone, which the test may stop, kill and start again (same port,
    same directory: its append-only file is replayed)."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test alone (the servers are shared by the session)."""
    return f"mtest-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def buffer(redis: RedisClient, prefix: str) -> MollifierBuffer:
    return MollifierBuffer(redis, prefix=prefix, ack_grace_seconds=30)


# -- the service: a control plane and a run store per session, a mollifier per test ------------
@pytest.fixture(scope="session")
async def svc_control_plane(stack: LocalStack) -> AsyncIterator[ControlPlane]:
    plane = await start_control_plane(stack)
    yield plane
    await plane.app.stop(grace=1)


@pytest.fixture(scope="session")
async def svc_run_store(stack: LocalStack) -> AsyncIterator[RunStoreApp]:
    started = await start_on_stack(stack, split=True, name="runstore-mollifier-tests")
    yield started
    await started.app.stop(grace=1)


@pytest.fixture
async def env(svc_control_plane: ControlPlane) -> Seeded:
    """A fresh environment whose organization has the mollifier flag."""
    return await seeded_env(svc_control_plane.app.target, enabled=True)


@pytest.fixture(params=["standalone", "cluster"])
def redis_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "standalone":
        return {"url": request.getfixturevalue("stack").redis_url}
    return {"cluster_nodes": list(request.getfixturevalue("redis_cluster"))}


@pytest.fixture
async def services(
    svc_control_plane: ControlPlane,
    svc_run_store: RunStoreApp,
    redis_settings: dict[str, Any],
    prefix: str,
) -> AsyncIterator[Callable[..., Awaitable[Mollifier]]]:
    """start(**overrides) -> a started mollifier on this test's key prefix (stopped after)."""
    started: list[Mollifier] = []

    async def start(**overrides: Any) -> Mollifier:
        values: dict[str, Any] = {
            "redis": redis_settings,
            "key_prefix": prefix,
            "runstore_target": svc_run_store.app.target,
            "controlplane_target": svc_control_plane.app.target,
        }
        values.update(overrides)
        service = await start_mollifier(**values)
        started.append(service)
        return service

    yield start
    for service in started:
        await service.app.stop(grace=1)
