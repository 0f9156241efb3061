"""Raw bulk-insert floors (spec §7): what asyncpg alone writes per second into the run store's
tables, measured in the same run on the same database as the figure it stands beside.

- items: a batch's `batch_items` rows and their `runs` (what AcceptBatchItems writes), as one
  `unnest` INSERT … ON CONFLICT DO NOTHING statement per chunk, or as COPY
  (`copy_records_to_table`) of both tables in one transaction per chunk;
- runs: `runs` rows alone (what CreateRuns writes for the mollifier's drainer), the same two ways.

The columns are those a benchmark run has a value for; the rest take their defaults, which are
what the service writes for them (no tags, options {}, ...). `write_runs` / `write_items` write
one chunk (the run store's timed floors call them per call); `insert` writes N rows, `chunk` a
statement, `in_flight` statements at once on a pool of that many connections, and `measure` runs
it in a load-generator process of its own (`python -m runops.bench.floors --loadgen-worker`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg

from runops.bench import program
from runops.bench.loadgen import in_subprocess, worker_main
from runops.kit.ids import Residency, mint_body

Method = Literal["unnest", "copy"]
MODULE = "runops.bench.floors"
# A statement's rows and the statements in flight, unless a benchmark says otherwise.
CHUNK, IN_FLIGHT = 1000, 2
ORG, PROJECT = "org_bench", "proj_bench"
TASK = "bench/send-email"
QUEUE = "task/bench/send-email"
PAYLOAD_TYPE = "application/json"
MAX_ATTEMPTS = 3

RUN_COLUMNS = (
    "id", "environment_id", "organization_id", "project_id", "task_identifier", "status",
    "payload", "payload_type", "queue", "max_attempts", "created_at", "updated_at",
)  # fmt: skip
ITEM_RUN_COLUMNS = (*RUN_COLUMNS, "batch_id", "batch_index")
ITEM_COLUMNS = ("batch_id", "index", "run_id")
INSERT_RUNS = """
INSERT INTO runs (id, environment_id, organization_id, project_id, task_identifier, status,
    payload, payload_type, queue, max_attempts, created_at, updated_at)
SELECT r.id, $2, $3, $4, $5, 'PENDING', r.payload, $6, $7, $8, coalesce(r.created_at, now()),
    now()
FROM unnest($1::text[], $9::bytea[], $10::timestamptz[]) AS r(id, payload, created_at)
ON CONFLICT DO NOTHING
"""
INSERT_ITEMS = """
WITH items AS (
    INSERT INTO batch_items (batch_id, index, run_id)
    SELECT $1, i.index, i.id FROM unnest($2::int[], $3::text[]) AS i(index, id)
    ON CONFLICT (batch_id, index) DO NOTHING
    RETURNING index, run_id
)
INSERT INTO runs (id, environment_id, organization_id, project_id, task_identifier, status,
    payload, payload_type, queue, max_attempts, created_at, updated_at, batch_id, batch_index)
SELECT i.run_id, $4, $5, $6, $7, 'PENDING', r.payload, $8, $9, $10, now(), now(), $1, i.index
FROM items i JOIN unnest($2::int[], $11::bytea[]) AS r(index, payload) USING (index)
ON CONFLICT DO NOTHING
"""
INSERT_BATCH = """
INSERT INTO batches (id, environment_id, organization_id, project_id, run_count)
VALUES ($1, $2, $3, $4, $5)
"""


def payload(index: int, size: int) -> bytes:
    """A JSON payload of exactly `size` bytes (>= 16)."""
    head = b'{"i":%d,"p":"' % index
    return head + b"x" * max(0, size - len(head) - 2) + b'"}'


async def create_batch(dsn: str, environment_id: str, run_count: int) -> str:
    """A batch row for the items floor to write into (batch_items references it)."""
    batch_id = mint_body(Residency.NEW)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(INSERT_BATCH, batch_id, environment_id, ORG, PROJECT, run_count)
    finally:
        await conn.close()
    return batch_id


def run_record(id_: str, environment_id: str, body: bytes, now: datetime) -> tuple[object, ...]:
    """A run's RUN_COLUMNS values (COPY)."""
    return (
        id_,
        environment_id,
        ORG,
        PROJECT,
        TASK,
        "PENDING",
        body,
        PAYLOAD_TYPE,
        QUEUE,
        MAX_ATTEMPTS,
        now,
        now,
    )


async def write_runs(
    pool: asyncpg.Pool,
    method: Method,
    environment_id: str,
    ids: Sequence[str],
    payloads: Sequence[bytes],
    *,
    created_at: Sequence[datetime] | None = None,
) -> str:
    """One chunk of `runs` rows; the statement's status ("INSERT 0 N" / "COPY N"). `created_at`:
    each run's (a pre-minted run carries it, as the drainer's CreateRuns does); the unnest INSERT
    takes the statement's now() without it (NULL pads the unnest)."""
    if method == "unnest":
        status: str = await pool.execute(
            INSERT_RUNS, ids, environment_id, ORG, PROJECT, TASK, PAYLOAD_TYPE, QUEUE,
            MAX_ATTEMPTS, payloads, created_at,
        )  # fmt: skip
        return status
    now = datetime.now(UTC)
    records = [
        run_record(id_, environment_id, p, now) for id_, p in zip(ids, payloads, strict=True)
    ]
    status = await pool.copy_records_to_table("runs", records=records, columns=RUN_COLUMNS)
    return status


async def write_items(
    pool: asyncpg.Pool,
    method: Method,
    batch_id: str,
    environment_id: str,
    indexes: Sequence[int],
    ids: Sequence[str],
    payloads: Sequence[bytes],
) -> str:
    """One chunk of `batch_items` rows and their runs; the status of the runs' statement."""
    if method == "unnest":
        status: str = await pool.execute(
            INSERT_ITEMS, batch_id, indexes, ids, environment_id, ORG, PROJECT, TASK,
            PAYLOAD_TYPE, QUEUE, MAX_ATTEMPTS, payloads,
        )  # fmt: skip
        return status
    now = datetime.now(UTC)
    async with pool.acquire() as conn, conn.transaction():
        await conn.copy_records_to_table(
            "batch_items",
            records=[(batch_id, i, id_) for i, id_ in zip(indexes, ids, strict=True)],
            columns=ITEM_COLUMNS,
        )
        status = await conn.copy_records_to_table(
            "runs",
            records=[
                (*run_record(id_, environment_id, p, now), batch_id, i)
                for i, id_, p in zip(indexes, ids, payloads, strict=True)
            ],
            columns=ITEM_RUN_COLUMNS,
        )
    return status


async def insert(
    dsn: str,
    *,
    method: Method,
    rows: int,
    chunk: int,
    in_flight: int,
    payload_bytes: int,
    environment_id: str,
    batch_id: str | None,
) -> float:
    """Write `rows` rows (items + runs when `batch_id` is given, else runs) and return the
    seconds it took (the pool is opened before the clock starts)."""
    pool = await asyncpg.create_pool(dsn, min_size=in_flight, max_size=in_flight)
    assert pool is not None
    starts = iter(range(0, rows, chunk))

    async def one(first: int) -> None:
        indexes = list(range(first, min(first + chunk, rows)))
        ids = [mint_body(Residency.NEW) for _ in indexes]
        payloads = [payload(i, payload_bytes) for i in indexes]
        if batch_id is None:
            await write_runs(pool, method, environment_id, ids, payloads)
        else:
            await write_items(pool, method, batch_id, environment_id, indexes, ids, payloads)

    async def worker() -> None:
        for first in starts:
            await one(first)

    try:
        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return time.perf_counter() - began
    finally:
        await pool.close()


async def measure(
    dsn: str,
    *,
    method: Method,
    rows: int,
    payload_bytes: int,
    environment_id: str,
    batch_id: str | None,
) -> float:
    """`insert` with CHUNK rows a statement, IN_FLIGHT in flight, in a load-generator process of
    its own (so it shares no event loop with the bench): the seconds it took."""
    spec = {
        "dsn": dsn, "method": method, "rows": rows, "payload_bytes": payload_bytes,
        "environment_id": environment_id, "batch_id": batch_id,
    }  # fmt: skip
    return float((await in_subprocess(MODULE, spec))["seconds"])


async def _work(spec: dict[str, Any]) -> dict[str, Any]:
    seconds = await insert(
        spec["dsn"], method=spec["method"], rows=int(spec["rows"]), chunk=CHUNK,
        in_flight=IN_FLIGHT, payload_bytes=int(spec["payload_bytes"]),
        environment_id=spec["environment_id"], batch_id=spec["batch_id"],
    )  # fmt: skip
    return {"seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = program.parser(MODULE, __doc__)
    if not parser.parse_args(argv).loadgen_worker:
        parser.error("runs only as the load generator of `measure` (--loadgen-worker)")
    worker_main(_work)


if __name__ == "__main__":
    main()
