"""The mollifier under load while the run-ops Postgres writer behind its run store stops and
starts again mid-drain (docs/architecture.md, Failure modes), on a cluster of this module's own:
callers trigger at one environment with the gate tripped (every trigger buffered) and the
drainer writing; while the writer is down callers see only retryable refusals, the drainer
requeues without counting attempts, and once the writer is back everything drains without a
restart. Afterwards Postgres (read directly) holds every acknowledged run exactly once, as the run
it was (not a SYSTEM_FAILURE)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest

from runops.localstack import LocalStack, PostgresCluster
from services.controlplane.app import ControlPlane
from services.runstore.app import RunStoreApp
from tests.controlplane.harness import Seeded
from tests.harness import RETRYABLE, until
from tests.mollifier.service_harness import body, start_mollifier, stub, trigger_request
from tests.runstore.harness import private_runops, rows, run_store_on

CALLERS = 10
OUTAGE_SECONDS = 3.0


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PostgresCluster]:
    async with private_runops(tmp_path_factory, "mollifier-load") as pg:
        yield pg


@pytest.fixture(scope="module")
async def store(stack: LocalStack, cluster: PostgresCluster) -> AsyncIterator[RunStoreApp]:
    async with run_store_on(stack, cluster, name="runstore-mollifier-load") as started:
        yield started


@pytest.mark.slow
async def test_run_ops_writer_stopped_mid_drain_loses_and_duplicates_nothing(
    stack: LocalStack,
    cluster: PostgresCluster,
    store: RunStoreApp,
    svc_control_plane: ControlPlane,
    env: Seeded,
    prefix: str,
) -> None:
    service = await start_mollifier(
        redis={"url": stack.redis_url},
        key_prefix=prefix,
        runstore_target=store.app.target,
        controlplane_target=svc_control_plane.app.target,
        drainer_enabled=True,
        # Tripped at once and held: every trigger is buffered, the drainer writes them.
        gate_threshold=5,
        gate_hold_seconds=600,
    )
    try:
        client = stub(service.app.target)
        acknowledged: dict[str, bool] = {}  # run id (body) -> buffered
        refused: Counter[grpc.StatusCode] = Counter()
        stop = asyncio.Event()

        async def caller() -> None:
            while not stop.is_set():
                try:
                    reply = await client.Trigger(trigger_request(env.env_id), timeout=30)
                except grpc.aio.AioRpcError as exc:
                    refused[exc.code()] += 1
                    await asyncio.sleep(0.05)
                    continue
                acknowledged[body(reply.run.friendly_id)] = reply.buffered
                await asyncio.sleep(0.01)

        callers = [asyncio.create_task(caller()) for _ in range(CALLERS)]
        try:
            await asyncio.sleep(1.5)
            before = len(acknowledged)
            await asyncio.to_thread(cluster.stop_server, "writer")
            stopped_at = time.monotonic()
            try:
                await asyncio.sleep(OUTAGE_SECONDS)
                depth_in_outage = (await service.buffer.stats(env.env_id)).depth
            finally:
                await asyncio.to_thread(cluster.start_server, "writer")
            restarted_at = time.monotonic()
            await asyncio.sleep(2.0)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*callers), 60)
        depth_at_restart = (await service.buffer.stats(env.env_id)).depth

        async def stored_runs() -> list[str]:
            found = await rows(
                cluster.admin_writer_dsn,
                "SELECT id FROM runs WHERE environment_id = $1 AND status <> 'SYSTEM_FAILURE'",
                env.env_id,
            )
            return [row["id"] for row in found]

        async def drained() -> bool:
            stats = await service.buffer.stats(env.env_id)
            return stats.depth == 0 and acknowledged.keys() <= set(await stored_runs())

        took = await until(drained, limit=60, interval=0.1)
    finally:
        await service.app.stop(grace=1)
    stored = await stored_runs()
    failed = await rows(
        cluster.admin_writer_dsn,
        "SELECT id FROM runs WHERE environment_id = $1 AND status = 'SYSTEM_FAILURE'",
        env.env_id,
    )
    print(
        f"\nrun-ops writer stopped {restarted_at - stopped_at:.1f}s mid-drain, {CALLERS} callers: "
        f"{len(acknowledged)} acknowledged ({before} before the stop, "
        f"{sum(acknowledged.values())} buffered), refused {dict(refused)}; depth "
        f"{depth_in_outage} at the end of the outage, {depth_at_restart} after the load, drained {took:.1f}s later; {len(stored)} runs"
    )
    assert before > 0
    assert depth_in_outage > 0, "the drain was held up by the outage"
    assert set(refused) <= RETRYABLE, refused
    assert not failed, "an outage is no run's fault"
    assert len(stored) == len(set(stored)), "one row per run"
    assert acknowledged.keys() <= set(stored)
    # A run nobody was told about can only come from a trigger that ended in an error.
    assert len(stored) - len(acknowledged) <= sum(refused.values())
