"""The run store under load while its run-ops replica hangs (SIGSTOP), on a cluster of this
module's own (docs/architecture.md, Failure modes): readers keep calling GetRun (default
consistency: the replica) and writers keep calling CreateRun. While the replica answers nothing,
reads are served by the writer or refused with a retryable status; once it is back (SIGCONT) the
service serves as before without a restart; afterwards Postgres holds every acknowledged run
exactly once."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest

from runops.kit.ids import body_of
from runops.localstack import LocalStack, PostgresCluster
from runops.runstore.v1 import runstore_pb2 as rs
from services.runstore.app import RunStoreApp
from tests.harness import RETRYABLE
from tests.runstore.harness import (
    new_env,
    private_runops,
    rows,
    run_input,
    run_store_on,
    stub,
)

READERS = 8
WRITERS = 2
SEEDED = 50
# A reader waits at most this long for an answer: a hung replica must not hold reads near it.
READ_DEADLINE = 5.0


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PostgresCluster]:
    async with private_runops(tmp_path_factory, "runstore-load") as pg:
        yield pg


@pytest.fixture(scope="module")
async def store(stack: LocalStack, cluster: PostgresCluster) -> AsyncIterator[RunStoreApp]:
    # A statement timeout far above every wait here: the router's own timeouts notice the hang.
    async with run_store_on(stack, cluster, statement_timeout_seconds=60) as started:
        yield started


@pytest.mark.slow
async def test_a_hung_replica_under_get_run_load_keeps_reads_answering(
    store: RunStoreApp, cluster: PostgresCluster
) -> None:
    client = stub(store.app.target)
    env = new_env()
    seeded = [
        (await client.CreateRun(rs.CreateRunRequest(run=run_input(env)), timeout=10)).run.id
        for _ in range(SEEDED)
    ]
    await cluster.wait_for_replica(timeout=30)

    reads: list[tuple[float, float]] = []  # (began, ended) of each correct answer
    refused: Counter[grpc.StatusCode] = Counter()
    created: list[str] = []
    stop = asyncio.Event()

    async def reader(offset: int) -> None:
        position = offset
        while not stop.is_set():
            run_id = seeded[position % SEEDED]
            position += 1
            began = time.monotonic()
            try:
                reply = await client.GetRun(
                    rs.GetRunRequest(run_id=run_id, environment_id=env), timeout=READ_DEADLINE
                )
            except grpc.aio.AioRpcError as exc:
                refused[exc.code()] += 1
                await asyncio.sleep(0.05)
                continue
            assert reply.run.id == run_id
            reads.append((began, time.monotonic()))

    async def writer() -> None:
        while not stop.is_set():
            try:
                reply = await client.CreateRun(rs.CreateRunRequest(run=run_input(env)), timeout=10)
            except grpc.aio.AioRpcError as exc:
                refused[exc.code()] += 1
                await asyncio.sleep(0.05)
                continue
            created.append(reply.run.id)
            await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(reader(i * 7)) for i in range(READERS)]
    tasks += [asyncio.create_task(writer()) for _ in range(WRITERS)]
    try:
        await asyncio.sleep(1.0)
        with cluster.suspended("replica"):
            hung_at = time.monotonic()
            await asyncio.sleep(4.0)
            resumed_at = time.monotonic()
        await asyncio.sleep(2.0)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)

    during = [r for r in reads if r[0] > hung_at + 1.0 and r[1] < resumed_at]
    after = [r for r in reads if r[0] > resumed_at + 1.0]
    print(
        f"\nreplica hung {resumed_at - hung_at:.1f}s under {READERS} readers: {len(reads)} reads "
        f"answered ({len(during)} while hung, {len(after)} after), refused {dict(refused)}, "
        f"{len(created)} runs created"
    )
    assert set(refused) <= RETRYABLE, refused
    assert during, "reads keep answering (from the writer) while the replica hangs"
    assert after, "reads answer again once the replica is back"
    assert created, "writes go on"
    # Every acknowledged run is there exactly once (runs' primary key: id).
    stored = await rows(
        cluster.admin_writer_dsn, "SELECT id FROM runs WHERE environment_id = $1", env
    )
    ids = [row["id"] for row in stored]
    assert len(ids) == len(set(ids))
    acknowledged = {body_of(run_id) for run_id in seeded + created}
    assert acknowledged <= set(ids)
    # A run nobody was told about can only come from a write that ended in an error.
    assert len(ids) - len(acknowledged) <= sum(refused.values())
