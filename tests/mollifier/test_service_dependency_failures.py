"""The mollifier service with a dependency down, through gRPC (spec §4; docs/mollifier.md,
Tested failure modes): its own Redis stopped, its own run store stopped, its Redis a read-only
replica. Real servers throughout: the session's control plane and Postgres, a redis-server and
a run store of the test's own."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import grpc
import redis.asyncio as aioredis

from runops.common.v1 import common_pb2
from runops.kit.errors import details_of
from runops.kit.ids import body_of
from runops.localstack import LocalStack
from runops.localstack.redis import RedisServer
from runops.mollifier.v1 import mollifier_pb2 as m
from services.controlplane.app import ControlPlane
from services.mollifier.app import Mollifier
from services.runstore.app import RunStoreApp
from tests.controlplane.harness import Seeded
from tests.harness import expect_error
from tests.mollifier.service_harness import (
    TASK,
    TRIPPED,
    RunStoreOnPort,
    Stub,
    count_runs,
    start_mollifier,
    stub,
    trigger_request,
)

# Fail fast while Redis is down (the defaults retry for a while first).
QUICK_REDIS = {"socket_timeout_seconds": 1, "retry_attempts": 1}


def _reset(env: str, key: str) -> m.ResetIdempotencyKeyRequest:
    return m.ResetIdempotencyKeyRequest(
        environment_id=env, task_identifier=TASK, idempotency_key=key
    )


def _keyed(env: str, key: str) -> m.TriggerRequest:
    return trigger_request(env, options=common_pb2.TriggerOptions(idempotency_key=key))


async def _key_holder(stack: LocalStack, run_id: str) -> str | None:
    """The idempotency key run `run_id` holds in Postgres (read on both writers directly)."""
    for db in (stack.controlplane_db, stack.runops_db):
        conn = await asyncpg.connect(db.admin_writer_dsn)
        try:
            row = await conn.fetchrow(
                "SELECT idempotency_key FROM runs WHERE id = $1", body_of(run_id)
            )
        finally:
            await conn.close()
        if row is not None:
            return str(row["idempotency_key"]) if row["idempotency_key"] is not None else None
    raise AssertionError(f"run {run_id} is in neither database")


async def _unavailable_with_retry_info(call: object) -> grpc.aio.AioRpcError:
    caught = await expect_error(call, grpc.StatusCode.UNAVAILABLE)
    retry_after = details_of(caught).retry_after
    assert retry_after is not None
    assert retry_after > 0
    return caught


async def _retried(
    client: Stub, request: m.ResetIdempotencyKeyRequest
) -> m.ResetIdempotencyKeyResponse:
    """As a client honouring UNAVAILABLE would: again after the hinted delay, while the
    mollifier's channel reconnects to the restarted run store."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return await client.ResetIdempotencyKey(request)
        except grpc.aio.AioRpcError as exc:
            retry_after = details_of(exc).retry_after
            if exc.code() != grpc.StatusCode.UNAVAILABLE or retry_after is None:
                raise
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(min(retry_after, 0.2))


@contextlib.asynccontextmanager
async def _mollifier(**overrides: object) -> AsyncIterator[Stub]:
    """A mollifier on a Redis of the test's own (the `services` fixture's Redis kinds would
    not be used)."""
    service = await start_mollifier(**overrides)
    try:
        yield stub(service.app.target)
    finally:
        await service.app.stop(grace=1)


async def test_reset_with_redis_down_succeeds_only_if_the_run_store_cleared_a_run(
    redis_server: RedisServer,
    env: Seeded,
    stack: LocalStack,
    svc_control_plane: ControlPlane,
    svc_run_store: RunStoreApp,
) -> None:
    async with _mollifier(
        redis={"url": redis_server.url, **QUICK_REDIS},
        key_prefix="reset-redis-down",
        runstore_target=svc_run_store.app.target,
        controlplane_target=svc_control_plane.app.target,
    ) as client:
        held = await client.Trigger(_keyed(env.env_id, "k-held"))
        assert not held.buffered
        redis_server.stop()

        # The buffer failed but the run store cleared a run: it succeeds.
        reset = await client.ResetIdempotencyKey(_reset(env.env_id, "k-held"))
        assert (reset.cleared_count, reset.buffer_cleared) == (1, False)
        assert await _key_holder(stack, held.run.friendly_id) is None
        # Nothing cleared and the buffer failed: UNAVAILABLE, retryable.
        caught = await _unavailable_with_retry_info(
            client.ResetIdempotencyKey(_reset(env.env_id, "k-nobody"))
        )
        assert details_of(caught).reason == "BUFFER_UNAVAILABLE"

        redis_server.start()
        again = await client.ResetIdempotencyKey(_reset(env.env_id, "k-nobody"))
        assert (again.cleared_count, again.buffer_cleared) == (0, False)


async def test_reset_with_the_run_store_down_is_unavailable_until_both_stores_answer(
    stack: LocalStack,
    env: Seeded,
    services: Callable[..., Awaitable[Mollifier]],
) -> None:
    run_store = RunStoreOnPort(stack)
    await run_store.start()
    try:
        service = await services(runstore_target=run_store.target, **TRIPPED)
        client = stub(service.app.target)
        stored = await client.Trigger(_keyed(env.env_id, "k-stored"))
        buffered = await client.Trigger(_keyed(env.env_id, "k-buffered"))
        assert (stored.buffered, buffered.buffered) == (False, True)
        await run_store.stop()

        # The run store may hold the key: nothing can say it is cleared, so UNAVAILABLE with
        # RetryInfo, whether the buffer cleared its entry or held nothing.
        for key in ("k-stored", "k-buffered"):
            await _unavailable_with_retry_info(client.ResetIdempotencyKey(_reset(env.env_id, key)))

        await run_store.start()
        # A retry once both answer clears what is left; the first try's buffer reset held.
        reset = await _retried(client, _reset(env.env_id, "k-stored"))
        assert reset.cleared_count == 1
        assert await _key_holder(stack, stored.run.friendly_id) is None
        reset = await client.ResetIdempotencyKey(_reset(env.env_id, "k-buffered"))
        assert (reset.cleared_count, reset.buffer_cleared) == (0, False)
        again = await client.Trigger(_keyed(env.env_id, "k-buffered"))
        assert again.run.friendly_id != buffered.run.friendly_id, "the key was released"
    finally:
        await run_store.stop()


async def test_a_read_only_replica_redis_is_unavailable_with_retry_info(
    redis_server: RedisServer,
    tmp_path: Path,
    env: Seeded,
    stack: LocalStack,
    svc_control_plane: ControlPlane,
    svc_run_store: RunStoreApp,
) -> None:
    """A replica under the client (a failover demoted the node, a stale endpoint): every write
    answers READONLY. Claims answer UNAVAILABLE with RetryInfo, not INTERNAL; a trigger fails
    open to the run store, as with Redis down."""
    replica = RedisServer(tmp_path / "replica")
    replica.start()
    try:
        admin = aioredis.Redis.from_url(replica.url)
        try:
            await admin.replicaof("127.0.0.1", redis_server.port)
        finally:
            await admin.aclose()
        async with _mollifier(
            redis={"url": replica.url, **QUICK_REDIS},
            key_prefix="read-only",
            runstore_target=svc_run_store.app.target,
            controlplane_target=svc_control_plane.app.target,
        ) as client:
            claim = m.ClaimIdempotencyKeyRequest(
                environment_id=env.env_id, task_identifier=TASK, idempotency_key="k-claim"
            )
            caught = await _unavailable_with_retry_info(client.ClaimIdempotencyKey(claim))
            assert details_of(caught).reason == "REDIS_UNAVAILABLE"

            before = await count_runs(stack, env.env_id)
            opened = await client.Trigger(_keyed(env.env_id, "k-open"))
            assert not opened.buffered
            assert await count_runs(stack, env.env_id) == before + 1
    finally:
        replica.stop()
