"""The run store's data layer (services.runstore.tables.RunTables) against a real Postgres."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from datetime import UTC, datetime, timedelta, timezone

import asyncpg
import pytest
from google.protobuf import timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

from runops.common.v1 import common_pb2
from runops.kit.ids import Residency, mint_body
from services.runstore.records import _epoch_parts
from services.runstore.rows import BatchRow, ItemRow, RunRow, SealOutcome
from services.runstore.tables import BatchNotAccepting, RunTables

tables = RunTables()


def new_id() -> str:
    return mint_body(Residency.NEW)


def new_env() -> str:
    return "env_" + new_id()


def run_row(env: str, **changes: object) -> RunRow:
    row = RunRow(
        id=new_id(),
        environment_id=env,
        organization_id="org_1",
        project_id="proj_1",
        task_identifier="email/send",
        payload=b'{"to":"a@b"}',
        payload_type="application/json",
    )
    return dataclasses.replace(row, **changes)  # type: ignore[arg-type]


async def make_batch(
    pool: asyncpg.Pool, env: str, run_count: int, *, waitpoint: bool = False
) -> str:
    created = await tables.create_batch(
        pool,
        BatchRow(
            id=new_id(),
            environment_id=env,
            organization_id="org_1",
            project_id="proj_1",
            run_count=run_count,
            parent_run_id="run_parent" if waitpoint else None,
            resume_parent_on_completion=waitpoint,
            waitpoint_id=new_id() if waitpoint else None,
        ),
    )
    assert created.batch is not None
    return created.batch.id


def items(env: str, indexes: range | list[int]) -> list[ItemRow]:
    return [ItemRow(i, run_row(env)) for i in indexes]


async def accept_all(pool: asyncpg.Pool, batch_id: str, env: str, chunk: list[ItemRow]) -> None:
    async with pool.acquire() as conn:
        await tables.accept_batch_items(conn, batch_id, env, chunk)


async def seal(pool: asyncpg.Pool, batch_id: str) -> common_pb2.Batch:
    async with pool.acquire() as conn:
        result = await tables.seal_batch(conn, batch_id)
    assert result.outcome is SealOutcome.SEALED, result
    assert result.batch is not None
    return result.batch


async def complete(pool: asyncpg.Pool, run_id: str, *, fail: bool = False) -> None:
    async with pool.acquire() as conn:
        error = common_pb2.RunError(code="BOOM", message="x") if fail else None
        done = await tables.complete_run(conn, run_id, output=b"ok", error=error)
    assert done is not None
    assert done.changed


# -- runs ---------------------------------------------------------------------------------------


async def test_create_runs_one_statement_in_order(pool: asyncpg.Pool) -> None:
    env = new_env()
    shown = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    rows = [
        run_row(env, tags=("a", "b"), created_at=shown),
        run_row(env).failed("PAYLOAD_TOO_LARGE", "payload is 20 MiB"),
        run_row(env, idempotency_key="k-cancelled").cancelled("user asked"),
        run_row(env, delay_until=shown + timedelta(days=3650), status="DELAYED"),
    ]
    results = await tables.create_runs(pool, rows)
    assert [r.run.id for r in results if r.run] == [row.id for row in rows]
    assert not any(r.is_cached for r in results)
    first, failed, cancelled, delayed = (r.run for r in results)
    assert first is not None
    assert failed is not None
    assert cancelled is not None
    assert delayed is not None
    assert first.created_at.ToDatetime(UTC) == shown
    assert first.friendly_id == f"run_{rows[0].id}"
    assert first.residency == common_pb2.RESIDENCY_NEW
    assert list(first.tags) == ["a", "b"]
    assert first.status == common_pb2.RUN_STATUS_PENDING
    assert failed.status == common_pb2.RUN_STATUS_SYSTEM_FAILURE
    assert failed.error.code == "PAYLOAD_TOO_LARGE"
    assert failed.HasField("completed_at")
    assert cancelled.status == common_pb2.RUN_STATUS_CANCELED
    assert cancelled.error.code == "TASK_RUN_CANCELLED"
    # A run created final never claims its key.
    assert cancelled.idempotency_key == ""
    assert delayed.status == common_pb2.RUN_STATUS_DELAYED

    # A replay of the same ids (a drainer retry) returns the same runs, cached.
    again = await tables.create_runs(pool, rows)
    assert [(r.run.id if r.run else None, r.is_cached) for r in again] == [
        (row.id, True) for row in rows
    ]
    # The same id in another environment is a conflict, not a leak of the other run.
    stolen = await tables.create_runs(pool, [dataclasses.replace(rows[0], environment_id="x")])
    assert stolen[0].run is None
    assert stolen[0].conflict == "runs_pkey"


async def test_create_runs_answers_what_a_read_returns(pool: asyncpg.Pool) -> None:
    """The created runs' answers are built from the input rows (not read back): each must equal
    the stored run as a read decodes it, whatever fields the row sets."""
    env = new_env()
    shown = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    full = {
        "payload": b"\x00\xffbytes",
        "metadata": '{"m": 1}',
        "metadata_type": "application/json",
        "tags": ("a", "b"),
        "queue": "q",
        "concurrency_key": "ck",
        "idempotency_key": "key-1",
        "idempotency_key_expires_at": shown + timedelta(days=30),
        "ttl_ms": 60_000,
        "max_attempts": 7,
        "machine_preset": "large-1x",
        "lock_to_version": "v1",
        "worker_version": "v2",
        "priority_ms": 1500,
        "is_test": True,
        "options": '{"one_time_use_token": "t"}',
        "parent_run_id": "parent1",
        "root_run_id": "root1",
        "resume_parent_on_completion": True,
        "created_at": shown,
    }
    rows = [
        run_row(env),
        run_row(env, **full),
        run_row(env, **{**full, "idempotency_key": "key-2"}).failed("E_FAIL", "failed early"),
        run_row(env, **{**full, "idempotency_key": "key-3"}).cancelled("user asked"),
        run_row(env, delay_until=shown + timedelta(days=3650), status="DELAYED", ttl_ms=0),
    ]
    results = await tables.create_runs(pool, rows)
    assert not any(r.is_cached for r in results)
    for row, result in zip(rows, results, strict=True):
        assert result.run == await tables.get_run(pool, row.id, env), row
    # A chunk whose fields all hold RunRow's defaults sends them as NULL arrays: the database
    # must still store the defaults.
    plain = run_row(env, payload=b"", payload_type="")
    [result] = await tables.create_runs(pool, [plain])
    assert result.run == await tables.get_run(pool, plain.id, env)
    assert result.run is not None
    assert result.run.payload == b""
    assert result.run.tags == []


@given(
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from([None, UTC, timezone(timedelta(hours=-7, minutes=-30))]),
    )
)
def test_timestamps_are_set_as_from_datetime_sets_them(value: datetime) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(value)
    assert _epoch_parts(value) == (expected.seconds, expected.nanos)


async def test_idempotency_key_cached_then_expired(pool: asyncpg.Pool) -> None:
    env = new_env()
    future = datetime.now(UTC) + timedelta(days=1)
    first = run_row(env, idempotency_key="k1", idempotency_key_expires_at=future)
    [created] = await tables.create_runs(pool, [first])
    assert created.run is not None
    assert not created.is_cached

    # Same key twice in one request and once more later: the first run, cached.
    results = await tables.create_runs(
        pool, [run_row(env, idempotency_key="k1"), run_row(env, idempotency_key="k1")]
    )
    assert [(r.run.id if r.run else None, r.is_cached) for r in results] == [
        (first.id, True),
        (first.id, True),
    ]
    found = await tables.find_run_by_idempotency_key(pool, env, "email/send", "k1")
    assert found is not None
    assert found.id == first.id
    # Another task or environment does not share the key.
    other = await tables.create_runs(
        pool, [run_row(env, task_identifier="t2", idempotency_key="k1")]
    )
    assert not other[0].is_cached

    # Expired: cleared, and a fresh run holds the key.
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE runs SET idempotency_key_expires_at = now() - interval '1 second'"
            " WHERE id = $1",
            first.id,
        )
    assert await tables.find_run_by_idempotency_key(pool, env, "email/send", "k1") is None
    replacement = run_row(env, idempotency_key="k1", idempotency_key_expires_at=future)
    [fresh] = await tables.create_runs(pool, [replacement])
    assert fresh.run is not None
    assert fresh.run.id == replacement.id
    assert not fresh.is_cached
    old = await tables.get_run(pool, first.id)
    assert old is not None
    assert old.idempotency_key == ""

    assert await tables.reset_idempotency_key(pool, env, "email/send", "k1") == 1
    assert await tables.find_run_by_idempotency_key(pool, env, "email/send", "k1") is None


async def test_concurrent_creates_with_one_key_make_one_run(pool: asyncpg.Pool) -> None:
    env = new_env()
    expired_holder = run_row(env, idempotency_key="k", idempotency_key_expires_at=None)
    await tables.create_runs(pool, [expired_holder])
    for round_ in range(2):
        if round_ == 1:
            # Second round: the holder has expired; still exactly one replacement.
            async with pool.acquire() as conn:
                await conn.execute(
                    "UPDATE runs SET idempotency_key_expires_at = now() - interval '1 s'"
                    " WHERE environment_id = $1 AND idempotency_key = 'k'",
                    env,
                )
        rows = [run_row(env, idempotency_key="k") for _ in range(8)]
        results = await asyncio.gather(*(tables.create_runs(pool, [row]) for row in rows))
        ids = {result.run.id for [result] in results if result.run is not None}
        assert len(ids) == 1
        assert sum(not result.is_cached for [result] in results) == (0 if round_ == 0 else 1)
    async with pool.acquire() as conn:
        holders = await conn.fetchval(
            "SELECT count(*) FROM runs WHERE environment_id = $1 AND idempotency_key = 'k'", env
        )
        total = await conn.fetchval("SELECT count(*) FROM runs WHERE environment_id = $1", env)
    assert holders == 1
    assert total == 2  # the original and its one replacement


async def test_run_updates_and_environment_isolation(pool: asyncpg.Pool) -> None:
    env = new_env()
    row = run_row(env, tags=("a",), status="DELAYED", delay_until=datetime.now(UTC))
    await tables.create_runs(pool, [row])
    assert await tables.get_run(pool, row.id, "env_other") is None
    assert await tables.add_run_tags(pool, row.id, "env_other", ["x"]) is None
    tagged = await tables.add_run_tags(pool, row.id, env, ["b", "a", "c", "b"])
    assert tagged is not None
    assert list(tagged.tags) == ["a", "b", "c"]
    meta = await tables.update_run_metadata(pool, row.id, env, '{"p":1}', "application/json")
    assert meta is not None
    assert meta.metadata == '{"p":1}'
    later = datetime(2030, 1, 1, tzinfo=UTC)
    moved = await tables.reschedule_run(pool, row.id, env, later)
    assert moved is not None
    assert moved.delay_until.ToDatetime(UTC) == later
    async with pool.acquire() as conn:
        assert await tables.cancel_run(conn, row.id, "env_other", "no") is None
        cancelled = await tables.cancel_run(conn, row.id, env, "stop")
        assert cancelled is not None
        assert cancelled.changed
        assert cancelled.run.status == common_pb2.RUN_STATUS_CANCELED
        again = await tables.cancel_run(conn, row.id, env, "stop")
        assert again is not None
        assert not again.changed
    # Not DELAYED any more: cannot be rescheduled.
    assert await tables.reschedule_run(pool, row.id, env, later) is None


# -- batches ------------------------------------------------------------------------------------


async def test_create_batch_is_idempotent_per_environment(pool: asyncpg.Pool) -> None:
    env = new_env()
    row = BatchRow(
        id=new_id(),
        environment_id=env,
        organization_id="org_1",
        project_id="proj_1",
        run_count=3,
        idempotency_key="bk",
        task_identifiers=("email/send",),
        waitpoint_id=new_id(),
        resume_parent_on_completion=True,
        parent_run_id="run_p",
    )
    created = await tables.create_batch(pool, row)
    assert created.batch is not None
    assert not created.is_cached
    assert created.batch.waitpoint_id.startswith("wp_")
    replay = await tables.create_batch(pool, dataclasses.replace(row, id=new_id()))
    assert replay.is_cached
    assert replay.batch is not None
    assert replay.batch.id == row.id
    elsewhere = await tables.create_batch(
        pool, dataclasses.replace(row, id=new_id(), environment_id=new_env(), waitpoint_id=None)
    )
    assert not elsewhere.is_cached
    assert await tables.get_batch(pool, row.id, "env_other") is None
    waitpoint = await tables.get_waitpoint(pool, row.waitpoint_id or "")
    assert waitpoint is not None
    assert waitpoint.status == common_pb2.WAITPOINT_STATUS_PENDING


async def test_concurrent_overlapping_chunks_write_each_index_once(pool: asyncpg.Pool) -> None:
    env = new_env()
    batch_id = await make_batch(pool, env, 1000)
    rng = random.Random(8)
    chunks: list[list[ItemRow]] = []
    for n in range(8):
        # Every chunk covers a different, overlapping stretch; together they cover 0..999.
        start = n * 110
        indexes = list(range(start, min(1000, start + 300)))
        if n == 7:
            indexes = list(range(700, 1000))
        rng.shuffle(indexes)
        chunks.append(items(env, indexes))

    async def accept(chunk: list[ItemRow]) -> tuple[int, int]:
        async with pool.acquire() as conn:
            result = await tables.accept_batch_items(conn, batch_id, env, chunk)
        assert [a.index for a in result.items] == [i.index for i in chunk]
        return sum(not a.duplicate for a in result.items), result.accepted_count

    outcomes = await asyncio.gather(*(accept(chunk) for chunk in chunks))
    assert sum(new for new, _ in outcomes) == 1000
    async with pool.acquire() as conn:
        counts = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM batch_items WHERE batch_id = $1) AS items,"
            " (SELECT count(DISTINCT index) FROM batch_items WHERE batch_id = $1) AS indexes,"
            " (SELECT count(*) FROM runs WHERE batch_id = $1) AS runs,"
            " (SELECT count(DISTINCT batch_index) FROM runs WHERE batch_id = $1) AS run_indexes",
            batch_id,
        )
        # Duplicates report the run written the first time.
        again = await tables.accept_batch_items(conn, batch_id, env, items(env, [5, 999, 5]))
        first_runs: dict[int, str] = {
            r["index"]: r["run_id"]
            for r in await conn.fetch(
                "SELECT index, run_id FROM batch_items WHERE batch_id = $1 AND index IN (5, 999)",
                batch_id,
            )
        }
    assert counts is not None
    assert dict(counts) == {"items": 1000, "indexes": 1000, "runs": 1000, "run_indexes": 1000}
    batch = await tables.get_batch(pool, batch_id)
    assert batch is not None
    assert batch.accepted_count == 1000
    assert [(a.index, a.run_id, a.duplicate) for a in again.items] == [
        (5, f"run_{first_runs[5]}", True),
        (999, f"run_{first_runs[999]}", True),
        (5, f"run_{first_runs[5]}", True),
    ]
    assert again.accepted_count == 1000

    runs, after = await tables.list_batch_runs(pool, batch_id, env, limit=400)
    seen = [r.batch_index for r in runs]
    while after is not None:
        page, after = await tables.list_batch_runs(
            pool, batch_id, env, after_index=after, limit=400
        )
        seen += [r.batch_index for r in page]
    assert seen == list(range(1000))
    assert (await tables.list_batch_runs(pool, batch_id, "env_other"))[0] == []


async def test_accept_refusals(pool: asyncpg.Pool) -> None:
    env = new_env()
    batch_id = await make_batch(pool, env, 2)
    async with pool.acquire() as conn:
        result = await tables.accept_batch_items(conn, batch_id, env, items(env, [0, 7]))
        assert result.out_of_range == [7]
        assert result.accepted_count == 1
        with pytest.raises(BatchNotAccepting) as missing:
            await tables.accept_batch_items(conn, batch_id, "env_other", items(env, [1]))
        assert missing.value.batch is None
        await tables.accept_batch_items(conn, batch_id, env, items(env, [1]))
        await tables.seal_batch(conn, batch_id)
        with pytest.raises(BatchNotAccepting) as sealed:
            await tables.accept_batch_items(conn, batch_id, env, items(env, [1]))
        assert sealed.value.batch is not None
        assert sealed.value.batch.sealed


async def test_eight_concurrent_seals_one_seals(pool: asyncpg.Pool) -> None:
    env = new_env()
    batch_id = await make_batch(pool, env, 10)

    async def try_seal() -> SealOutcome:
        async with pool.acquire() as conn:
            return (await tables.seal_batch(conn, batch_id)).outcome

    async with pool.acquire() as conn:
        await tables.accept_batch_items(conn, batch_id, env, items(env, range(9)))
        mismatch = await tables.seal_batch(conn, batch_id)
        assert mismatch.outcome is SealOutcome.COUNT_MISMATCH
        assert mismatch.batch is not None
        assert mismatch.batch.accepted_count == 9
        await tables.accept_batch_items(conn, batch_id, env, items(env, [9]))
    outcomes = await asyncio.gather(*(try_seal() for _ in range(8)))
    assert outcomes.count(SealOutcome.SEALED) == 1
    assert outcomes.count(SealOutcome.ALREADY_SEALED) == 7
    batch = await tables.get_batch(pool, batch_id)
    assert batch is not None
    assert batch.sealed
    assert batch.status == common_pb2.BATCH_STATUS_PROCESSING
    assert batch.HasField("processing_started_at")
    assert batch.HasField("sealed_at")
    assert batch.successful_run_count == 10
    assert batch.failed_run_count == 0
    async with pool.acquire() as conn:
        assert (await tables.seal_batch(conn, "nope")).outcome is SealOutcome.NOT_FOUND


async def test_missing_ranges_of_a_100k_batch(pool: asyncpg.Pool) -> None:
    env = new_env()
    batch_id = await make_batch(pool, env, 100_000)
    holes = [(0, 3), (500, 501), (49_990, 50_100), (99_999, 100_000)]
    present = [i for i in range(100_000) if not any(start <= i < end for start, end in holes)]
    async with pool.acquire() as conn:
        # Item rows straight in: this test is about the range query, not the accept path.
        await conn.execute(
            "INSERT INTO batch_items (batch_id, index, run_id)"
            " SELECT $1, i, 'r' || i FROM unnest($2::int[]) AS i",
            batch_id,
            present,
        )
        await conn.execute(
            "UPDATE batches SET accepted_count = $2 WHERE id = $1", batch_id, len(present)
        )
    missing = await tables.missing_ranges(pool, batch_id, env)
    assert missing is not None
    assert missing.ranges == holes
    assert not missing.truncated
    assert missing.accepted_count == len(present)
    capped = await tables.missing_ranges(pool, batch_id, env, limit=2)
    assert capped is not None
    assert capped.ranges == holes[:2]
    assert capped.truncated
    assert await tables.missing_ranges(pool, batch_id, "env_other") is None
    empty_batch = await make_batch(pool, env, 5)
    untouched = await tables.missing_ranges(pool, empty_batch)
    assert untouched is not None
    assert untouched.ranges == [(0, 5)]


async def test_batch_completes_and_its_waitpoint_too(pool: asyncpg.Pool) -> None:
    env = new_env()
    batch_id = await make_batch(pool, env, 3, waitpoint=True)
    chunk = items(env, range(3))
    await accept_all(pool, batch_id, env, chunk)
    await complete(pool, chunk[0].run.id if chunk[0].run else "")  # before the seal: counted
    sealed = await seal(pool, batch_id)
    assert sealed.status == common_pb2.BATCH_STATUS_PROCESSING
    assert sealed.HasField("processing_completed_at")
    await complete(pool, chunk[1].run.id if chunk[1].run else "", fail=True)
    async with pool.acquire() as conn:
        last = await tables.complete_run(conn, chunk[2].run.id if chunk[2].run else "")
    assert last is not None
    assert last.batch is not None
    assert last.batch.status == common_pb2.BATCH_STATUS_COMPLETED
    assert last.batch.completed_run_count == 3
    waitpoint = await tables.get_waitpoint(pool, last.batch.waitpoint_id.removeprefix("wp_"))
    assert waitpoint is not None
    assert waitpoint.status == common_pb2.WAITPOINT_STATUS_COMPLETED
    assert not waitpoint.output_is_error


async def test_some_items_failed_is_partial_then_completed(pool: asyncpg.Pool) -> None:
    env = new_env()
    batch_id = await make_batch(pool, env, 3, waitpoint=True)
    chunk = items(env, range(3))
    chunk[1] = ItemRow(1, run_row(env).failed("PAYLOAD_TOO_LARGE", "too big"))
    await accept_all(pool, batch_id, env, chunk)
    sealed = await seal(pool, batch_id)
    assert sealed.status == common_pb2.BATCH_STATUS_PARTIAL_FAILED
    assert (sealed.successful_run_count, sealed.failed_run_count) == (2, 1)
    assert sealed.completed_run_count == 1
    await complete(pool, chunk[0].run.id if chunk[0].run else "")
    await complete(pool, chunk[2].run.id if chunk[2].run else "")
    batch = await tables.get_batch(pool, batch_id)
    assert batch is not None
    assert batch.status == common_pb2.BATCH_STATUS_COMPLETED
    assert batch.failed_run_count == 1


async def test_every_item_failed_aborts_and_completes_the_waitpoint(pool: asyncpg.Pool) -> None:
    env = new_env()
    batch_id = await make_batch(pool, env, 2, waitpoint=True)
    chunk = [ItemRow(i, run_row(env).failed("PAYLOAD_TOO_LARGE", "too big")) for i in range(2)]
    await accept_all(pool, batch_id, env, chunk)
    sealed = await seal(pool, batch_id)
    assert sealed.status == common_pb2.BATCH_STATUS_ABORTED
    assert await tables.aborted_reason(pool, batch_id) == ("EVERY_ITEM_FAILED", "every item failed")
    waitpoint = await tables.get_waitpoint(pool, sealed.waitpoint_id.removeprefix("wp_"))
    assert waitpoint is not None
    assert waitpoint.status == common_pb2.WAITPOINT_STATUS_COMPLETED
    assert waitpoint.output_is_error
    async with pool.acquire() as conn:
        again = await tables.seal_batch(conn, batch_id)
    assert again.outcome is SealOutcome.ALREADY_SEALED


async def test_linked_items_count_toward_completion(pool: asyncpg.Pool) -> None:
    env = new_env()
    done, running = run_row(env), run_row(env)
    await tables.create_runs(pool, [done, running])
    await complete(pool, done.id)
    batch_id = await make_batch(pool, env, 5, waitpoint=True)
    chunk = [
        ItemRow(0, existing_run_id=done.id),  # final already: counts at once
        ItemRow(1, existing_run_id=running.id),  # counts when it completes
        ItemRow(2, existing_run_id=running.id),  # two items, one run: both count
        # Two items of one chunk with one key: one run, both linked to it.
        ItemRow(3, run_row(env, idempotency_key="same")),
        ItemRow(4, run_row(env, idempotency_key="same")),
    ]
    async with pool.acquire() as conn:
        accepted = await tables.accept_batch_items(conn, batch_id, env, chunk)
    by_index = {a.index: a.run_id for a in accepted.items}
    assert by_index[0] == f"run_{done.id}"
    assert by_index[1] == by_index[2] == f"run_{running.id}"
    assert by_index[3] == by_index[4]
    assert accepted.accepted_count == 5
    sealed = await seal(pool, batch_id)
    assert sealed.completed_run_count == 1
    assert sealed.status == common_pb2.BATCH_STATUS_PROCESSING
    await complete(pool, running.id)
    await complete(pool, by_index[3].removeprefix("run_"))
    batch = await tables.get_batch(pool, batch_id)
    assert batch is not None
    assert batch.completed_run_count == 5
    assert batch.status == common_pb2.BATCH_STATUS_COMPLETED


async def test_all_linked_batch_completes_at_seal(pool: asyncpg.Pool) -> None:
    env = new_env()
    done = run_row(env)
    await tables.create_runs(pool, [done])
    await complete(pool, done.id)
    batch_id = await make_batch(pool, env, 2, waitpoint=True)
    await accept_all(pool, batch_id, env, [ItemRow(i, existing_run_id=done.id) for i in range(2)])
    sealed = await seal(pool, batch_id)
    assert sealed.status == common_pb2.BATCH_STATUS_COMPLETED
    waitpoint = await tables.get_waitpoint(pool, sealed.waitpoint_id.removeprefix("wp_"))
    assert waitpoint is not None
    assert waitpoint.status == common_pb2.WAITPOINT_STATUS_COMPLETED


async def test_reaper_aborts_a_stale_batch_once(pool: asyncpg.Pool) -> None:
    env = new_env()
    stale = await make_batch(pool, env, 7, waitpoint=True)
    fresh = await make_batch(pool, env, 7)
    await accept_all(pool, stale, env, items(env, range(3)))
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE batches SET created_at = now() - interval '2 hours' WHERE id = $1", stale
        )
        await conn.execute("DELETE FROM runstore_leases")

    async def step(holder: str) -> list[str] | None:
        return await tables.reap_unsealed_batches(
            pool,
            holder=holder,
            seal_timeout=timedelta(minutes=30),
            lease_ttl=timedelta(seconds=30),
        )

    first, second = await asyncio.gather(step("a"), step("b"))
    results = [r for r in (first, second) if r is not None]
    # Exactly one of them held the lease, and it aborted the stale batch (only).
    assert len(results) == 1
    assert stale in results[0]
    assert fresh not in results[0]
    holder = "a" if first is not None else "b"
    other = "b" if holder == "a" else "a"
    # Its lease holds against the other, and a second step finds nothing more to abort.
    assert await step(other) is None
    assert await step(holder) == []
    await tables.release_reaper_lease(pool, holder)
    assert await step(other) == []

    batch = await tables.get_batch(pool, stale)
    assert batch is not None
    assert batch.status == common_pb2.BATCH_STATUS_ABORTED
    reason = await tables.aborted_reason(pool, stale)
    assert reason is not None
    assert reason[0] == "SEAL_TIMEOUT"
    assert "expected 7 items, 3 accepted" in reason[1]
    waitpoint = await tables.get_waitpoint(pool, batch.waitpoint_id.removeprefix("wp_"))
    assert waitpoint is not None
    assert waitpoint.output_is_error
    assert b"expected 7 items" in waitpoint.output
    async with pool.acquire() as conn:
        assert (await tables.seal_batch(conn, stale)).outcome is SealOutcome.ABORTED
        with pytest.raises(BatchNotAccepting):
            await tables.accept_batch_items(conn, stale, env, items(env, [5]))
    assert (await tables.get_batch(pool, fresh) or common_pb2.Batch()).status == (
        common_pb2.BATCH_STATUS_PENDING
    )
