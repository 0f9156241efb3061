"""What the drainer writes without decoding: an entry nothing changed while buffered goes to the
run store as its snapshot bytes as accepted, plus the creation time its caller was shown; every
entry writes exactly the RunInput the decoding path builds. Entries buffered before this drainer
(written by the earlier accept, field by field) drain through the production writer into a real
run store, as the runs their callers were shown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest

from runops.kit.ids import body_of
from runops.kit.redis import RedisClient
from runops.localstack import LocalStack
from runops.localstack.settings import INTERNAL_TOKEN
from runops.runstore.client import RunStoreClient
from runops.runstore.v1 import runstore_pb2 as rs
from services.mollifier.buffer import MollifierBuffer
from services.mollifier.drainer.drainer import (
    DRAIN_FAILED_CODE,
    Drainer,
    DrainItem,
    WriteResult,
    WriteStatus,
)
from services.mollifier.drainer.writer import RunStoreWriter
from services.mollifier.entries import BufferedEntry, to_ms
from tests.mollifier.helpers import now, snapshot
from tests.mollifier.service_harness import RunStoreOnPort, run_rows
from tests.runstore.harness import new_env

MAX_ATTEMPTS = 3


class Capture:
    def __init__(self) -> None:
        self.items: dict[str, DrainItem] = {}

    async def create_runs(self, items: Sequence[DrainItem]) -> Sequence[WriteResult]:
        self.items.update((item.popped.run_id, item) for item in items)
        return [WriteResult(WriteStatus.OK)] * len(items)


def decoded_input(entry: BufferedEntry, at: datetime) -> rs.RunInput:
    """The RunInput the drainer built by decoding every entry (before it wrote bytes)."""
    run = entry.run_input(at)
    if entry.created_at is not None:
        run.created_at.FromDatetime(entry.created_at)
    if entry.attempts >= MAX_ATTEMPTS:
        run.failed.code = DRAIN_FAILED_CODE
        run.failed.message = (
            f"buffered run not written after {entry.attempts} attempts: "
            f"{entry.error or 'the run could not be written'}"
        )
    elif entry.cancelled:
        run.cancelled.reason = entry.cancel_reason
    return run


async def test_every_entry_writes_what_decoding_it_builds(
    buffer: MollifierBuffer, redis: RedisClient
) -> None:
    env = "env_wire"
    created = now() - timedelta(seconds=5)
    snaps = {
        "plain": snapshot(env),
        "keyed": snapshot(env, idempotency_key="live"),
        "key_expired": snapshot(env, idempotency_key="gone", key_ttl=timedelta(seconds=1)),
        "key_reset": snapshot(env, idempotency_key="reset"),
        "tagged": snapshot(env, tags=("a",)),
        "metadata": snapshot(env),
        "delayed": snapshot(env),
        "cancelled": snapshot(env),
        "out_of_attempts": snapshot(env),
        "created_at_unreadable": snapshot(env),
        "epoch_created_at": snapshot(env),
    }
    for snap in snaps.values():
        await buffer.accept(snap, created_at=created)
    await buffer.add_tags(env, snaps["tagged"].run_id, ["b"])
    await buffer.set_metadata(env, snaps["metadata"].run_id, '{"x":1}', "application/json")
    await buffer.reschedule(env, snaps["delayed"].run_id, created + timedelta(hours=1))
    await buffer.cancel(env, snaps["cancelled"].run_id, "no longer needed")
    await buffer.reset_idempotency_key(env, "send-email", "reset")
    entry_key = buffer.keys(env).entry
    await redis.hset(entry_key(snaps["out_of_attempts"].run_id), "attempts", str(MAX_ATTEMPTS))
    await redis.hset(entry_key(snaps["created_at_unreadable"].run_id), "created_at", "soon")
    await redis.hset(entry_key(snaps["epoch_created_at"].run_id), "created_at", "0")

    writer = Capture()
    drainer = Drainer(buffer, writer, max_attempts=MAX_ATTEMPTS)
    report = await drainer.tick()
    assert report.popped == len(snaps)
    at = datetime.now(UTC)
    for name, snap in snaps.items():
        item = writer.items[snap.run_id]
        assert item.run == decoded_input(item.entry, at), name
    plain = writer.items[snaps["plain"].run_id]
    assert plain.wire.startswith(snaps["plain"].SerializeToString()), "sent as accepted"
    assert plain.run.created_at.ToDatetime(tzinfo=UTC) == created
    assert writer.items[snaps["keyed"].run_id].run.options.idempotency_key == "live"
    assert writer.items[snaps["key_expired"].run_id].run.options.idempotency_key == ""
    assert writer.items[snaps["key_reset"].run_id].run.options.idempotency_key == ""
    assert list(writer.items[snaps["tagged"].run_id].run.options.tags) == ["a", "b"]
    assert writer.items[snaps["out_of_attempts"].run_id].run.failed.code == DRAIN_FAILED_CODE
    assert writer.items[snaps["cancelled"].run_id].run.HasField("cancelled")
    assert not writer.items[snaps["created_at_unreadable"].run_id].run.HasField("created_at")
    epoch = writer.items[snaps["epoch_created_at"].run_id].run
    assert epoch.HasField("created_at")
    assert epoch.created_at.ToMilliseconds() == 0


# -- entries buffered before this drainer, into a real run store ---------------------------------


@pytest.fixture
async def run_store(stack: LocalStack) -> AsyncIterator[RunStoreClient]:
    server = RunStoreOnPort(stack)
    await server.start()
    try:
        async with RunStoreClient(server.target, token=INTERNAL_TOKEN) as client:
            yield client
    finally:
        await server.stop()


async def buffer_as_before(
    buffer: MollifierBuffer, redis: RedisClient, snap: rs.RunInput, created_at: datetime
) -> None:
    """What the accept of the previous release left in Redis, written field by field."""
    keys = buffer.keys(snap.environment_id)
    await redis.hset(
        keys.entry(snap.run_id),
        mapping={
            "id": snap.run_id,
            "input": snap.SerializeToString(),
            "org": snap.organization_id,
            "env": snap.environment_id,
            "created_at": str(to_ms(created_at)),
            "status": "QUEUED",
            "attempts": "0",
        },
    )
    await redis.rpush(keys.queue, snap.run_id)
    await redis.hset(buffer.global_keys.environments, snap.environment_id, snap.organization_id)


async def test_entries_buffered_before_the_upgrade_drain_as_the_runs_shown(
    stack: LocalStack, run_store: RunStoreClient, buffer: MollifierBuffer, redis: RedisClient
) -> None:
    env = new_env()
    created = now() - timedelta(seconds=3)
    snaps = [snapshot(env) for _ in range(20)]
    for snap in snaps:
        await buffer_as_before(buffer, redis, snap, created)
    tagged, cancelled = snaps[0], snaps[1]
    await buffer.add_tags(env, tagged.run_id, ["late"])
    await buffer.cancel(env, cancelled.run_id, "stop")

    drainer = Drainer(buffer, RunStoreWriter(run_store), max_attempts=MAX_ATTEMPTS)
    report = await drainer.tick()
    assert (report.popped, report.written, report.requeued) == (20, 20, 0)
    rows = await run_rows(stack, env)
    assert set(rows) == {body_of(snap.run_id) for snap in snaps}, "every run, once"
    assert all(row["created_at"] == created for row in rows.values())
    assert list(rows[body_of(tagged.run_id)]["tags"]) == ["late"]
    assert rows[body_of(cancelled.run_id)]["status"] == "CANCELED"
    assert all(row["status"] != "SYSTEM_FAILURE" for row in rows.values())
    assert (await buffer.stats(env)).depth == 0


async def test_a_corrupt_snapshot_does_not_hold_back_its_tick(
    stack: LocalStack, run_store: RunStoreClient, buffer: MollifierBuffer, redis: RedisClient
) -> None:
    # Sent undecoded, a snapshot Redis holds corrupt fails the whole CreateRuns: the writer
    # then writes the others, and the corrupt one is refused for good (left DRAINING).
    env = new_env()
    snaps = [snapshot(env) for _ in range(5)]
    for snap in snaps:
        await buffer_as_before(buffer, redis, snap, now())
    corrupt = snaps[2]
    await redis.hset(buffer.keys(env).entry(corrupt.run_id), "input", b"\xff\xff\xff\xff")

    drainer = Drainer(buffer, RunStoreWriter(run_store), max_attempts=MAX_ATTEMPTS)
    first = await drainer.tick()
    assert (first.popped, first.written, first.requeued) == (5, 4, 1)
    assert set(await run_rows(stack, env)) == {
        body_of(snap.run_id) for snap in snaps if snap is not corrupt
    }
    # Its last attempt decodes it, fails, and leaves it DRAINING (recovery brings it back).
    second = await drainer.tick()
    assert (second.popped, second.written) == (1, 0)
    stats = await buffer.stats(env)
    assert (stats.depth, stats.draining) == (0, 1)


class LeanRunStore:
    """Answers CreateRuns the lean way (`created` columns), as a run store with IDS does."""

    def __init__(self) -> None:
        self.requests: list[rs.CreateRunsRequest] = []

    async def create_runs_serialized(self, runs: Sequence[bytes]) -> rs.CreateRunsResponse:
        request = rs.CreateRunsRequest.FromString(
            b"".join(rs.CreateRunsRequest(runs=[rs.RunInput.FromString(r)]).SerializeToString()
                     for r in runs)
        )  # fmt: skip
        self.requests.append(request)
        response = rs.CreateRunsResponse()
        created = response.created
        for i, run in enumerate(request.runs):
            if run.payload == b"bad":
                created.friendly_id.append("")
                created.errors[i].code = 3
                created.errors[i].reason = "BAD"
            elif run.payload == b"busy":
                created.friendly_id.append("")
                created.errors[i].code = 14
                created.errors[i].reason = "BUSY"
            else:
                created.friendly_id.append(run.run_id)
            created.created_at_us.append(0)
            created.is_cached.append(False)
        return response


async def test_the_lean_answer_is_read_by_position(
    buffer: MollifierBuffer, redis: RedisClient
) -> None:
    env = "env_lean"
    snaps = [snapshot(env) for _ in range(4)]
    snaps[1].payload, snaps[3].payload = b"bad", b"busy"
    for snap in snaps:
        await buffer.accept(snap, created_at=now())
    store = LeanRunStore()
    writer = Capture()
    report = await Drainer(buffer, writer, max_attempts=MAX_ATTEMPTS).tick()
    items = [writer.items[snap.run_id] for snap in snaps]
    results = await RunStoreWriter(store).create_runs(items)  # type: ignore[arg-type]
    assert [r.status for r in results] == [
        WriteStatus.OK, WriteStatus.PERMANENT, WriteStatus.OK, WriteStatus.RETRYABLE
    ]  # fmt: skip
    assert results[1].message.startswith("BAD")
    assert report.popped == 4
