"""The drainer's retry rules against the REAL run store made to fail (spec §4; docs/mollifier.md,
Tested failure modes): real Redis, a run store of this module's own on the session's Postgres,
the production writer (`RunStoreWriter`), the default backoff (100 ms doubling to 5 s).

- The run store stopped: every tick is requeued without counting an attempt, ticks back off on
  the schedule, and once it is back every entry is written as the run it was (not a failure).
- One run's row locked by another transaction (its insert hits the statement timeout, a
  transient refusal the run store answers itself) while its tick-mates are written: that run
  counts an attempt per tick; after 3 it is failed and written as a SYSTEM_FAILURE run once the
  lock goes.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Sequence

import asyncpg
import pytest

from runops.kit.ids import body_of
from runops.kit.redis import RedisClient, RedisSettings, connect_redis
from runops.localstack import LocalStack
from runops.localstack.settings import INTERNAL_TOKEN, database
from runops.runstore.client import RunStoreClient
from runops.runstore.v1 import runstore_pb2 as rs
from services.mollifier.buffer import MollifierBuffer
from services.mollifier.drainer.drainer import (
    DRAIN_FAILED_CODE,
    Drainer,
    DrainItem,
    WriteResult,
)
from services.mollifier.drainer.writer import RunStoreWriter
from services.mollifier.entries import EntryStatus
from tests.harness import until
from tests.mollifier.helpers import accept_all, snapshot
from tests.mollifier.service_harness import RunStoreOnPort
from tests.runstore.harness import new_env

# The run store's statement timeout here: a locked row refuses its insert quickly.
STATEMENT_TIMEOUT = 0.3
# Ticks are a take, a CreateRuns and a requeue on loopback; a loaded 2-core machine adds some.
SLACK = 0.5


class RecordingWriter:
    """The production writer, with the time of each call (the drainer's retry schedule)."""

    def __init__(self, writer: RunStoreWriter) -> None:
        self._writer = writer
        self.calls: list[float] = []

    async def create_runs(self, items: Sequence[DrainItem]) -> Sequence[WriteResult]:
        self.calls.append(time.monotonic())
        return await self._writer.create_runs(items)


@pytest.fixture
async def run_store(stack: LocalStack) -> AsyncIterator[RunStoreOnPort]:
    timeout = {"statement_timeout_seconds": STATEMENT_TIMEOUT}
    server = RunStoreOnPort(
        stack,
        controlplane_db=database(stack.controlplane_db, **timeout),
        runops_db=database(stack.runops_db, **timeout),
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def redis_client(stack: LocalStack) -> AsyncIterator[RedisClient]:
    client = await connect_redis(RedisSettings(url=stack.redis_url))
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def client(run_store: RunStoreOnPort) -> AsyncIterator[RunStoreClient]:
    async with RunStoreClient(run_store.target, token=INTERNAL_TOKEN) as made:
        yield made


@pytest.fixture
def drain_buffer(redis_client: RedisClient, prefix: str) -> MollifierBuffer:
    return MollifierBuffer(redis_client, prefix=prefix, ack_grace_seconds=60)


async def _run_rows(stack: LocalStack, run_ids: Sequence[str]) -> dict[str, asyncpg.Record]:
    """body -> (status, error_code, error_message) of each run, read on both writers directly."""
    bodies = [body_of(run_id) for run_id in run_ids]
    found: dict[str, asyncpg.Record] = {}
    for db in (stack.controlplane_db, stack.runops_db):
        conn = await asyncpg.connect(db.admin_writer_dsn)
        try:
            for row in await conn.fetch(
                "SELECT id, status, error_code, error_message FROM runs WHERE id = ANY($1::text[])",
                bodies,
            ):
                found[row["id"]] = row
        finally:
            await conn.close()
    return found


def _as_given(row: asyncpg.Record) -> bool:
    """Written as the run it was: not a failure."""
    return row["status"] != "SYSTEM_FAILURE" and row["error_code"] is None


async def test_a_stopped_run_store_backs_off_on_schedule_and_costs_no_attempt(
    stack: LocalStack,
    run_store: RunStoreOnPort,
    client: RunStoreClient,
    drain_buffer: MollifierBuffer,
) -> None:
    env = new_env()
    snaps = [snapshot(env) for _ in range(3)]
    await accept_all(drain_buffer, snaps)
    await run_store.stop()

    writer = RecordingWriter(RunStoreWriter(client))
    drainer = Drainer(drain_buffer, writer, idle_seconds=0.01)
    assert (drainer.backoff.base, drainer.backoff.cap) == (0.1, 5.0)  # the spec's schedule
    task = asyncio.create_task(drainer.run())
    try:
        # 100 ms doubling: 0.1 0.2 0.4 0.8 1.6 3.2, then held at the 5 s cap.
        expected = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0]

        async def tried() -> bool:
            return len(writer.calls) > len(expected)

        await until(tried, limit=sum(expected) + 10 * SLACK, interval=0.02)
        gaps = [b - a for a, b in itertools.pairwise(writer.calls)]
        for gap, nominal in zip(gaps, expected, strict=False):
            assert nominal <= gap <= nominal + SLACK, (gaps, expected)
        # An outage is not the runs' fault: no attempt counted, nothing failed.
        for snap in snaps:
            entry = await drain_buffer.get(env, snap.run_id)
            assert entry is not None
            assert entry.attempts == 0
            assert entry.status is not EntryStatus.FAILED
            assert "write failed" in entry.error

        await run_store.start()

        async def drained() -> bool:
            return not await drain_buffer.environments()

        await until(drained, limit=30, interval=0.05)
    finally:
        drainer.request_stop()
        await asyncio.wait_for(task, 10)
    rows = await _run_rows(stack, [snap.run_id for snap in snaps])
    assert set(rows) == {body_of(snap.run_id) for snap in snaps}
    assert all(_as_given(row) for row in rows.values()), "written as the runs they were"
    assert drainer.failures == 0, "the backoff resets once a write goes through"


async def _hold_row(conn: asyncpg.Connection, template_id: str, run_id: str) -> None:
    """Inside the open transaction of `conn`: an uncommitted copy of run `template_id` under the
    id `run_id`. Until it ends, another insert of `run_id` waits on it (here: its statement
    times out)."""
    await conn.execute(
        "CREATE TEMP TABLE held ON COMMIT DROP AS SELECT * FROM runs WHERE id = $1", template_id
    )
    await conn.execute("UPDATE held SET id = $1", run_id)
    await conn.execute("INSERT INTO runs SELECT * FROM held")


async def test_a_run_refused_three_times_is_written_as_a_system_failure(
    stack: LocalStack,
    client: RunStoreClient,
    drain_buffer: MollifierBuffer,
) -> None:
    env = new_env()
    template = await client.create_run(snapshot(env))
    poison = snapshot(env)
    held = await asyncpg.connect(stack.runops_db.admin_writer_dsn)
    lock = held.transaction()
    await lock.start()
    drainer = Drainer(drain_buffer, RunStoreWriter(client), max_attempts=3)
    others: list[rs.RunInput] = []
    try:
        await _hold_row(held, template.run.id, body_of(poison.run_id))
        await accept_all(drain_buffer, [poison])
        for attempt in (1, 2, 3):
            # Each tick carries the locked run (first: requeued to the front) and a fresh one.
            fresh = snapshot(env)
            others.append(fresh)
            await accept_all(drain_buffer, [fresh])
            report = await drainer.tick()
            assert (report.popped, report.written, report.requeued) == (2, 1, 1)
            entry = await drain_buffer.get(env, poison.run_id)
            assert entry is not None
            assert (entry.status, entry.attempts) == (EntryStatus.QUEUED, attempt)
            assert "STATEMENT_TIMEOUT" in entry.error
            assert not (await _run_rows(stack, [poison.run_id])), "nothing of it written yet"
    finally:
        await lock.rollback()
        await held.close()

    # Out of attempts: the next tick writes it as a SYSTEM_FAILURE run and fails the entry.
    report = await drainer.tick()
    assert (report.popped, report.failed) == (1, 1)
    entry = await drain_buffer.get(env, poison.run_id)
    assert entry is not None
    assert entry.status is EntryStatus.FAILED
    rows = await _run_rows(stack, [poison.run_id, *(o.run_id for o in others)])
    failed = rows[body_of(poison.run_id)]
    assert failed["status"] == "SYSTEM_FAILURE"
    assert failed["error_code"] == DRAIN_FAILED_CODE
    assert "after 3 attempts" in failed["error_message"]
    assert all(_as_given(rows[body_of(o.run_id)]) for o in others)
    assert (await drainer.tick()).popped == 0  # nothing left (and the environment forgotten)
    assert not await drain_buffer.environments()


async def test_a_lone_refused_run_is_an_outage_not_an_attempt(
    stack: LocalStack,
    client: RunStoreClient,
    drain_buffer: MollifierBuffer,
) -> None:
    """Nothing of its tick could be written: the refusal may be the database's, not the run's,
    so no attempt is counted (a database-wide stall must not turn runs into failures)."""
    env = new_env()
    template = await client.create_run(snapshot(env))
    poison = snapshot(env)
    held = await asyncpg.connect(stack.runops_db.admin_writer_dsn)
    lock = held.transaction()
    await lock.start()
    drainer = Drainer(drain_buffer, RunStoreWriter(client), max_attempts=3)
    try:
        await _hold_row(held, template.run.id, body_of(poison.run_id))
        await accept_all(drain_buffer, [poison])
        for _ in range(4):
            report = await drainer.tick()
            assert (report.popped, report.written, report.requeued) == (1, 0, 1)
        entry = await drain_buffer.get(env, poison.run_id)
        assert entry is not None
        assert (entry.status, entry.attempts) == (EntryStatus.QUEUED, 0)
    finally:
        await lock.rollback()
        await held.close()
    report = await drainer.tick()
    assert report.written == 1
    assert _as_given((await _run_rows(stack, [poison.run_id]))[body_of(poison.run_id)])
