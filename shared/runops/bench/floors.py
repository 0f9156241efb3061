"""Raw bulk-insert floors (spec §7): what asyncpg alone writes per second into the run store's
tables, measured in the same run on the same database as the figure it stands beside.

- items: a batch's `batch_items` rows and their `runs` (what AcceptBatchItems writes), as one
  `unnest` INSERT … ON CONFLICT DO NOTHING statement per chunk, or as COPY
  (`copy_records_to_table`) of both tables in one transaction per chunk;
- runs: `runs` rows alone (what CreateRuns writes for the mollifier's drainer), the same two ways.

The columns are those a benchmark run has a value for; the rest take their defaults, which are
what the service writes for them (no tags, options {}, ...). `chunk` rows a statement, `in_flight`
statements at once on a pool of that many connections.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Literal

import asyncpg

from runops.kit.ids import Residency, mint_body

Method = Literal["unnest", "copy"]
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
SELECT r.id, $2, $3, $4, $5, 'PENDING', r.payload, $6, $7, $8, now(), now()
FROM unnest($1::text[], $9::bytea[]) AS r(id, payload)
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
        env = environment_id
        if method == "unnest":
            if batch_id is None:
                await pool.execute(
                    INSERT_RUNS, ids, env, ORG, PROJECT, TASK, PAYLOAD_TYPE, QUEUE, MAX_ATTEMPTS,
                    payloads,
                )  # fmt: skip
            else:
                await pool.execute(
                    INSERT_ITEMS, batch_id, indexes, ids, env, ORG, PROJECT, TASK, PAYLOAD_TYPE,
                    QUEUE, MAX_ATTEMPTS, payloads,
                )  # fmt: skip
            return
        now = datetime.now(UTC)
        runs = [
            (
                id_,
                env,
                ORG,
                PROJECT,
                TASK,
                "PENDING",
                p,
                PAYLOAD_TYPE,
                QUEUE,
                MAX_ATTEMPTS,
                now,
                now,
            )
            for id_, p in zip(ids, payloads, strict=True)
        ]
        async with pool.acquire() as conn, conn.transaction():
            if batch_id is None:
                await conn.copy_records_to_table("runs", records=runs, columns=RUN_COLUMNS)
                return
            await conn.copy_records_to_table(
                "batch_items",
                records=[(batch_id, i, id_) for i, id_ in zip(indexes, ids, strict=True)],
                columns=ITEM_COLUMNS,
            )
            await conn.copy_records_to_table(
                "runs",
                records=[(*run, batch_id, i) for run, i in zip(runs, indexes, strict=True)],
                columns=ITEM_RUN_COLUMNS,
            )

    async def worker() -> None:
        for first in starts:
            await one(first)

    try:
        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return time.perf_counter() - began
    finally:
        await pool.close()
