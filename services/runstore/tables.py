"""The run store's data layer for ONE database (LEGACY or NEW; the service routes between two).

`RunTables` methods take an asyncpg connection (or, for single statements, a pool); the ones
that need a transaction open it on the connection they are given. Ids are friendly-id bodies
(`run_<body>` → `<body>`); results are `runops.common.v1` messages with friendly ids filled in.
Refusals the service must answer come back as values (None, an outcome) or as the exceptions
below, never as a half-written change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

import asyncpg

from runops.common.v1 import common_pb2
from runops.kit.ids import NEW_BODY_SQL_PATTERN, RUN
from runops.kit.limits import MAX_MISSING_RANGES
from runops.runstore.v1 import runstore_pb2 as rs
from services.runstore import sql
from services.runstore.columns import CreatedRuns, ItemChunk, RunChunk
from services.runstore.records import (
    batch_from_record,
    run_from_record,
    waitpoint_from_record,
)
from services.runstore.rows import (
    AcceptedItems,
    BatchRow,
    CreatedBatch,
    CreatedRun,
    FinalizedRun,
    ItemKinds,
    ItemRow,
    MissingRanges,
    RunRow,
    SealOutcome,
    SealResult,
)

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
Queryable = Connection | asyncpg.Pool

REAPER_LEASE = "batch-seal-reaper"
EXPIRY_LEASE = "run-ttl-expiry"


class BatchNotAccepting(Exception):
    """The batch takes no more items: missing (batch None), sealed, or not PENDING."""

    def __init__(self, batch: common_pb2.Batch | None) -> None:
        self.batch = batch
        state = "not found" if batch is None else common_pb2.BatchStatus.Name(batch.status)
        super().__init__(f"batch does not accept items: {state}")


class TransientConflict(Exception):
    """A concurrent change made this write impossible to finish as asked; retrying it is safe
    (nothing was written)."""


class _Rollback(Exception):
    pass


# -- the tables ---------------------------------------------------------------------------------


class RunTables:
    """Runs, batches, batch items and waitpoints in one database."""

    # -- runs -----------------------------------------------------------------------------------
    async def create_runs(self, db: Queryable, rows: Sequence[RunRow]) -> list[CreatedRun]:
        """`write_runs` of these rows, answered whole."""
        chunk = RunChunk.from_rows(rows)
        return (await self.write_runs(db, chunk)).results(chunk)

    async def write_runs(self, db: Queryable, runs: RunChunk) -> CreatedRuns:
        """Writes every run in one statement; results in request order. A run whose
        (environment, task, idempotency key) a live run holds is that run with is_cached (an
        expired holder loses the key and a fresh run is made, atomically); a run whose id exists
        already (a replay) is the existing run with is_cached."""
        created = CreatedRuns.empty(runs.count)
        ids = runs.ids
        pending = list(range(runs.count))
        # A conflicting insert that rolled back leaves nothing to return: write those again.
        for _ in range(3):
            inserted = await db.fetch(sql.INSERT_RUNS, *runs.take(pending).params())
            fresh = {record["id"]: record for record in inserted}
            missing: list[int] = []
            for k in pending:
                record = fresh.pop(ids[k], None)
                if record is None:
                    missing.append(k)
                else:
                    created.records[k] = record
                    created.ids[k] = ids[k]
                    created.created_at_us[k] = record["created_at_us"]
            if not missing:
                break
            found = await db.fetch(
                sql.SELECT_RUNS_FOR_INPUTS,
                [ids[k] for k in missing],
                [runs.value("environment_id", k) for k in missing],
                [runs.value("task_identifier", k) for k in missing],
                [runs.value("idempotency_key", k) for k in missing],
                [runs.value("status", k) for k in missing],
            )
            by_position = {record["ord"] - 1: record for record in found}
            pending = []
            for position, k in enumerate(missing):
                record = by_position.get(position)
                if record is None:
                    pending.append(k)
                elif record["same_id"] and record["environment_id"] != runs.value(
                    "environment_id", k
                ):
                    created.conflicts[k] = "runs_pkey"
                else:
                    created.cached(k, run_from_record(record))
            if not pending:
                break
        else:
            raise TransientConflict("idempotency key holders kept changing; retry")
        return created

    async def get_run(
        self, db: Queryable, run_id: str, environment_id: str | None = None
    ) -> common_pb2.Run | None:
        record = await db.fetchrow(sql.SELECT_RUN, run_id, environment_id)
        return None if record is None else run_from_record(record)

    async def find_run_by_idempotency_key(
        self, db: Queryable, environment_id: str, task_identifier: str, key: str
    ) -> common_pb2.Run | None:
        """The live (unexpired) run holding the key."""
        record = await db.fetchrow(
            sql.SELECT_RUN_BY_IDEMPOTENCY_KEY, environment_id, task_identifier, key
        )
        return None if record is None else run_from_record(record)

    async def list_batch_runs(
        self,
        db: Queryable,
        batch_id: str,
        environment_id: str | None = None,
        *,
        after_index: int = -1,
        limit: int = 100,
    ) -> tuple[list[common_pb2.Run], int | None]:
        """A page of the batch's item runs by index after `after_index`, and the index to pass
        for the next page (None at the end). A linked run in the other database is skipped."""
        records = await db.fetch(
            sql.SELECT_BATCH_RUNS, batch_id, after_index, limit, environment_id
        )
        runs = [run_from_record(record) for record in records]
        more = len(records) == limit
        return runs, records[-1]["item_index"] if more else None

    async def list_batch_items(
        self,
        db: Queryable,
        batch_id: str,
        environment_id: str,
        *,
        after_index: int = -1,
        limit: int = 100,
    ) -> tuple[list[common_pb2.Run | None], dict[int, str], int | None] | None:
        """A page of the batch's items by index after `after_index`: their runs (None where the
        run lives in the other database), those positions' run ids, and the index to pass for
        the next page (None at the end). None: no such batch in this environment."""
        records = await db.fetch(
            sql.SELECT_BATCH_ITEM_RUNS, batch_id, after_index, limit, environment_id
        )
        if not records and await self.get_batch(db, batch_id, environment_id) is None:
            return None
        runs: list[common_pb2.Run | None] = []
        missing: dict[int, str] = {}
        for position, record in enumerate(records):
            if record["id"] is None:
                missing[position] = record["item_run_id"]
                runs.append(None)
            else:
                runs.append(run_from_record(record))
        more = len(records) == limit
        return runs, missing, records[-1]["item_index"] if more else None

    async def list_item_outcomes(
        self,
        db: Queryable,
        batch_id: str,
        environment_id: str,
        kinds: ItemKinds,
        *,
        after_index: int = -1,
        limit: int = 100,
    ) -> tuple[list[rs.BatchItemRecord], int | None] | None:
        """A page of the batch's items of `kinds` by index after `after_index`, and the index
        to pass for the next page (None at the end). None: no such batch in this environment."""
        records = await db.fetch(
            sql.SELECT_BATCH_ITEM_OUTCOMES,
            batch_id,
            after_index,
            limit,
            kinds.pre_failed,
            kinds.linked,
            kinds.created,
            environment_id,
        )
        if not records and await self.get_batch(db, batch_id, environment_id) is None:
            return None
        items = [
            rs.BatchItemRecord(
                index=record["item_index"],
                run_id=f"{RUN}_{record['run_id']}",
                linked=record["linked"],
                pre_failed=record["pre_failed"],
                error_code=record["error_code"] or "",
            )
            for record in records
        ]
        more = len(records) == limit
        return items, records[-1]["item_index"] if more else None

    async def get_runs(
        self, db: Queryable, run_ids: Sequence[str], environment_id: str
    ) -> dict[str, common_pb2.Run]:
        records = await db.fetch(sql.SELECT_RUNS_BY_IDS, list(run_ids), environment_id)
        return {record["id"]: run_from_record(record) for record in records}

    async def complete_run(
        self,
        conn: Connection,
        run_id: str,
        environment_id: str | None = None,
        *,
        output: bytes = b"",
        output_type: str = "",
        error: common_pb2.RunError | None = None,
    ) -> FinalizedRun | None:
        """Success (output) or failure (error); counts it in every batch that waits on it, in
        the same statement. None: no such run."""
        outcome: tuple[str, str | None, str, bytes | None, str]
        if error is None:
            outcome = ("COMPLETED_SUCCESSFULLY", None, "", output, output_type)
        else:
            outcome = ("COMPLETED_WITH_ERRORS", error.code, error.message, None, "")
        return await self._finalize(conn, run_id, environment_id, *outcome)

    async def cancel_run(
        self, conn: Connection, run_id: str, environment_id: str | None, reason: str
    ) -> FinalizedRun | None:
        return await self._finalize(
            conn, run_id, environment_id, "CANCELED", "TASK_RUN_CANCELLED", reason, None, ""
        )

    async def _finalize(
        self,
        conn: Connection,
        run_id: str,
        environment_id: str | None,
        status: str,
        error_code: str | None,
        error_message: str,
        output: bytes | None,
        output_type: str,
    ) -> FinalizedRun | None:
        async with conn.transaction():
            record = await conn.fetchrow(
                sql.FINALIZE_RUN,
                run_id,
                environment_id,
                status,
                error_code,
                error_message,
                output,
                output_type,
            )
            changed = record is not None
            if record is None:
                record = await conn.fetchrow(sql.SELECT_RUN, run_id, environment_id)
                if record is None:
                    return None
            batch = None
            if record["batch_id"] is not None:
                batch_record = await conn.fetchrow(sql.SELECT_BATCH, record["batch_id"], None)
                batch = None if batch_record is None else batch_from_record(batch_record)
        return FinalizedRun(run_from_record(record), batch, changed)

    async def lock_idempotency_keys(
        self, conn: Connection, keys: Sequence[tuple[str, str, str]]
    ) -> None:
        """Holds a lock per (environment, task, key) until `conn`'s transaction ends; a second
        holder of any of them waits."""
        await conn.execute(
            sql.LOCK_IDEMPOTENCY_KEYS,
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
        )

    async def reset_idempotency_key(
        self, db: Queryable, environment_id: str, task_identifier: str, key: str
    ) -> int:
        """Releases the key (expired or not); how many runs held it."""
        status = await db.execute(sql.RESET_IDEMPOTENCY_KEY, environment_id, task_identifier, key)
        return int(status.rsplit(" ", 1)[1])

    async def add_run_tags(
        self, db: Queryable, run_id: str, environment_id: str | None, tags: Sequence[str]
    ) -> common_pb2.Run | None:
        record = await db.fetchrow(sql.ADD_RUN_TAGS, run_id, environment_id, list(tags))
        return None if record is None else run_from_record(record)

    async def update_run_metadata(
        self,
        db: Queryable,
        run_id: str,
        environment_id: str | None,
        metadata: str,
        metadata_type: str,
    ) -> common_pb2.Run | None:
        record = await db.fetchrow(
            sql.UPDATE_RUN_METADATA, run_id, environment_id, metadata, metadata_type
        )
        return None if record is None else run_from_record(record)

    async def reschedule_run(
        self, db: Queryable, run_id: str, environment_id: str | None, delay_until: datetime
    ) -> common_pb2.Run | None:
        """None: no such run, or it is not DELAYED (get_run tells which)."""
        record = await db.fetchrow(sql.RESCHEDULE_RUN, run_id, environment_id, delay_until)
        return None if record is None else run_from_record(record)

    # -- batches --------------------------------------------------------------------------------
    async def create_batch(self, db: Queryable, row: BatchRow) -> CreatedBatch:
        """The batch (and its waitpoint), or the one its environment's idempotency key (or its
        id: a replay) made already, with is_cached."""
        record = await db.fetchrow(
            sql.INSERT_BATCH,
            row.id,
            row.environment_id,
            row.organization_id,
            row.project_id,
            row.run_count,
            row.idempotency_key,
            list(row.task_identifiers),
            row.parent_run_id,
            row.resume_parent_on_completion,
            row.waitpoint_id,
            row.created_at,
        )
        if record is not None:
            return CreatedBatch(batch_from_record(record))
        existing = await db.fetchrow(
            sql.SELECT_BATCH_FOR_INPUT, row.id, row.environment_id, row.idempotency_key
        )
        if existing is None:
            raise TransientConflict("the batch holding this key was just removed; retry")
        if existing["same_id"] and existing["environment_id"] != row.environment_id:
            return CreatedBatch(None, conflict="batches_pkey")
        return CreatedBatch(batch_from_record(existing), is_cached=True)

    async def batch_by_idempotency_key(
        self, db: Queryable, environment_id: str, key: str
    ) -> common_pb2.Batch | None:
        record = await db.fetchrow(sql.SELECT_BATCH_BY_IDEMPOTENCY_KEY, environment_id, key)
        return None if record is None else batch_from_record(record)

    async def get_batch(
        self, db: Queryable, batch_id: str, environment_id: str | None = None
    ) -> common_pb2.Batch | None:
        record = await db.fetchrow(sql.SELECT_BATCH, batch_id, environment_id)
        return None if record is None else batch_from_record(record)

    async def get_waitpoint(
        self, db: Queryable, waitpoint_id: str, environment_id: str | None = None
    ) -> common_pb2.Waitpoint | None:
        record = await db.fetchrow(sql.SELECT_WAITPOINT, waitpoint_id, environment_id)
        return None if record is None else waitpoint_from_record(record)

    async def accept_batch_items(
        self,
        conn: Connection,
        batch_id: str,
        environment_id: str,
        items: ItemChunk | Sequence[ItemRow],
    ) -> AcceptedItems:
        """A chunk → batch-item rows plus their runs, in one transaction (one statement, plus
        one read when some indexes were present already, plus one when items lost their
        idempotency key to a live run and link to it). Safe with concurrent overlapping chunks:
        no index is written twice. Raises BatchNotAccepting (nothing written)."""
        chunk = items if isinstance(items, ItemChunk) else ItemChunk.from_rows(items)
        indexes = chunk.indexes
        try:
            async with conn.transaction():
                record = await conn.fetchrow(
                    sql.ACCEPT_BATCH_ITEMS,
                    batch_id,
                    environment_id,
                    *chunk.runs.params(indexes, chunk.existing_run_id, chunk.existing_run_final),
                )
                if record is None:
                    raise _Rollback
                written = dict(
                    zip(record["inserted_indexes"], record["inserted_run_ids"], strict=True)
                )
                if record["key_held"]:
                    written.update(
                        await self._link_key_holders(
                            conn, batch_id, environment_id, chunk, record["key_held"]
                        )
                    )
                run_count: int = record["run_count"]
                present = {index for index in indexes if index not in written and index < run_count}
                existing: dict[int, str] = {}
                if present:
                    found = await conn.fetch(sql.SELECT_BATCH_ITEMS, batch_id, sorted(present))
                    existing = {r["index"]: r["run_id"] for r in found}
        except _Rollback:
            raise BatchNotAccepting(await self.get_batch(conn, batch_id, environment_id)) from None
        accepted = AcceptedItems([], [], [], record["accepted_count"], run_count, [])
        if len(written) == len(indexes) and max(indexes) < run_count:
            # Every item new (most chunks): the answer is the statement's, in request order.
            accepted.indexes.extend(indexes)
            accepted.run_ids.extend([f"{RUN}_{written[index]}" for index in indexes])
            accepted.duplicates.extend([False] * len(indexes))
            return accepted
        for index in indexes:
            if index >= run_count:
                accepted.out_of_range.append(index)
                continue
            if index in written:
                # A repeated index of this chunk is a duplicate of its first occurrence.
                existing[index] = written.pop(index)
                accepted.duplicates.append(False)
            else:
                accepted.duplicates.append(True)
            accepted.indexes.append(index)
            accepted.run_ids.append(f"{RUN}_{existing[index]}")
        return accepted

    async def _link_key_holders(
        self,
        conn: Connection,
        batch_id: str,
        environment_id: str,
        items: ItemChunk,
        held: Sequence[int],
    ) -> dict[int, str]:
        first: dict[int, int] = {}
        for k, index in enumerate(items.indexes):
            first.setdefault(index, k)
        wanted = [first[index] for index in held]
        records = await conn.fetch(
            sql.LINK_KEY_HOLDERS,
            batch_id,
            environment_id,
            [items.indexes[k] for k in wanted],
            [items.runs.value("task_identifier", k) for k in wanted],
            [items.runs.value("idempotency_key", k) for k in wanted],
        )
        if len(records) != len(wanted):
            # The holder lost the key in between (reset): nothing of this chunk stays written.
            raise TransientConflict("an idempotency key holder changed during the accept; retry")
        return {record["index"]: record["run_id"] for record in records}

    async def missing_ranges(
        self,
        db: Queryable,
        batch_id: str,
        environment_id: str | None = None,
        *,
        limit: int = MAX_MISSING_RANGES,
    ) -> MissingRanges | None:
        """The index ranges no item row covers yet, computed in SQL. None: no such batch."""
        record = await db.fetchrow(sql.MISSING_RANGES, batch_id, environment_id, limit + 1)
        if record is None:
            return None
        ranges = list(zip(record["starts"], record["ends"], strict=True))
        return MissingRanges(
            ranges[:limit], len(ranges) > limit, record["run_count"], record["accepted_count"]
        )

    async def seal_batch(
        self, conn: Connection, batch_id: str, environment_id: str | None = None
    ) -> SealResult:
        """Seals when unsealed, PENDING and every item is accepted; exactly one of any number of
        concurrent calls seals. Completion bookkeeping happens in the same statement."""
        record = await conn.fetchrow(sql.SEAL_BATCH, batch_id, environment_id)
        if record is not None:
            return SealResult(SealOutcome.SEALED, batch_from_record(record))
        current = await conn.fetchrow(sql.SELECT_BATCH, batch_id, environment_id)
        if current is None:
            return SealResult(SealOutcome.NOT_FOUND, None)
        batch = batch_from_record(current)
        if current["sealed"]:
            return SealResult(SealOutcome.ALREADY_SEALED, batch)
        if current["status"] == "ABORTED":
            return SealResult(SealOutcome.ABORTED, batch)
        return SealResult(SealOutcome.COUNT_MISMATCH, batch)

    async def aborted_reason(self, db: Queryable, batch_id: str) -> tuple[str, str] | None:
        """Why the batch was aborted (SEAL_TIMEOUT or EVERY_ITEM_FAILED) and the message."""
        record = await db.fetchrow(sql.SELECT_BATCH, batch_id, None)
        if record is None or record["aborted_reason"] is None:
            return None
        return record["aborted_reason"], record["error_message"]

    # -- links to runs of the other database ---------------------------------------------------
    async def live_key_holders(
        self, db: Queryable, keys: Sequence[tuple[str, str, str]]
    ) -> dict[int, common_pb2.Run]:
        """The live run holding each (environment, task, key), by position in `keys`."""
        if not keys:
            return {}
        records = await db.fetch(
            sql.SELECT_LIVE_KEY_HOLDERS,
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
        )
        return {record["ord"] - 1: run_from_record(record) for record in records}

    async def final_run_ids(self, db: Queryable, run_ids: Sequence[str]) -> set[str]:
        """Those of `run_ids` (bodies) that are runs here in a final status."""
        if not run_ids:
            return set()
        records = await db.fetch(sql.SELECT_FINAL_RUN_IDS, list(run_ids))
        return {record["id"] for record in records}

    async def run_finality(self, db: Queryable, run_ids: Sequence[str]) -> dict[str, bool]:
        """Those of `run_ids` that are runs here -> whether each is final."""
        records = await db.fetch(sql.SELECT_RUN_FINALITY, list(run_ids))
        return {record["id"]: record["final"] for record in records}

    async def mark_linked_runs_final(self, db: Queryable, run_ids: Sequence[str]) -> int:
        """Runs of the other database became final: the items here linked to them count (once:
        idempotent), completing batches and their waitpoints. How many items were counted."""
        if not run_ids:
            return 0
        record = await db.fetchrow(sql.MARK_LINKED_RUNS_FINAL, list(run_ids))
        assert record is not None
        return int(record["items_counted"])

    async def count_final_runs(self, db: Queryable, run_ids: Sequence[str]) -> int:
        """Those of `run_ids` that are runs of this database in a final status: the items linked
        to them that are not counted yet count now (idempotent). How many items were counted."""
        if not run_ids:
            return 0
        record = await db.fetchrow(sql.COUNT_FINAL_RUNS, list(run_ids))
        assert record is not None
        return int(record["items_counted"])

    async def relink_items(
        self, conn: Connection, holders: Mapping[str, str], final: Sequence[str]
    ) -> None:
        """Runs never written (keys of `holders`): the drain resolved them to the run holding
        their idempotency key (the values). Items here linked to them link to the holder, and
        count at once when it is one of `final` (in one transaction)."""
        async with conn.transaction():
            await conn.execute(sql.RELINK_ITEMS, list(holders), list(holders.values()))
            if final:
                await conn.fetchrow(sql.MARK_LINKED_RUNS_FINAL, list(final))

    async def pending_links(
        self, db: Queryable, after: str, limit: int, *, other_is_new: bool
    ) -> list[str]:
        """Run ids of the other database (ascending, after `after`) that items here link to and
        have not counted as final yet."""
        records = await db.fetch(
            sql.SELECT_PENDING_LINKS, after, limit, NEW_BODY_SQL_PATTERN, other_is_new
        )
        return [record["run_id"] for record in records]

    # -- the seal-timeout reaper ----------------------------------------------------------------
    async def reap_unsealed_batches(
        self,
        db: Queryable,
        *,
        holder: str,
        seal_timeout: timedelta,
        lease_ttl: timedelta,
        limit: int = 100,
    ) -> list[str] | None:
        """One reaper step: aborts batches unsealed `seal_timeout` after creation and completes
        their waitpoints with the error. None when another process holds the reaper lease.
        Call it more often than lease_ttl to keep the lease."""
        if await db.fetchval(sql.TAKE_LEASE, REAPER_LEASE, holder, lease_ttl) is None:
            return None
        records = await db.fetch(sql.REAP_UNSEALED_BATCHES, seal_timeout, limit)
        return [record["id"] for record in records]

    # -- the PROCESSING re-check ----------------------------------------------------------------
    async def due_processing_batches(
        self, db: Queryable, threshold: timedelta, limit: int
    ) -> list[str]:
        """Up to `limit` sealed batches still waiting on runs and not checked for `threshold`;
        stamped checked (each is re-checked once per threshold)."""
        records = await db.fetch(sql.DUE_PROCESSING_BATCHES, threshold, limit)
        return [record["id"] for record in records]

    async def repair_batch_counts(self, db: Queryable, batch_ids: Sequence[str]) -> int:
        """Uncounted items of these batches whose run here is final count now; how many."""
        record = await db.fetchrow(sql.REPAIR_BATCH_COUNTS, list(batch_ids))
        assert record is not None
        return int(record["items_counted"])

    async def unresolved_items(
        self, db: Queryable, batch_ids: Sequence[str], limit: int
    ) -> list[tuple[str, int, str]]:
        """(batch, index, run id) of uncounted items whose run is not in this database."""
        records = await db.fetch(sql.SELECT_UNRESOLVED_ITEMS, list(batch_ids), limit)
        return [(record["batch_id"], record["index"], record["run_id"]) for record in records]

    async def fail_stuck_batches(self, db: Queryable, messages: Mapping[str, str]) -> list[str]:
        """Completes the waitpoints of these batches (id -> message) with the error; the ids of
        those still waiting on runs (the others completed meanwhile)."""
        records = await db.fetch(sql.FAIL_STUCK_BATCHES, list(messages), list(messages.values()))
        return [record["id"] for record in records]

    async def release_reaper_lease(self, db: Queryable, holder: str) -> None:
        """On shutdown: another process may take over at once."""
        await db.execute(sql.RELEASE_LEASE, REAPER_LEASE, holder)

    # -- TTL expiry -----------------------------------------------------------------------------
    async def expire_runs(
        self, db: Queryable, *, holder: str, lease_ttl: timedelta, limit: int = 500
    ) -> list[str] | None:
        """One expiry step: up to `limit` runs not started within their TTL become EXPIRED
        (batches count them, their waitpoints complete with the error). The expired run ids;
        None when another process holds the expiry lease."""
        if await db.fetchval(sql.TAKE_LEASE, EXPIRY_LEASE, holder, lease_ttl) is None:
            return None
        records = await db.fetch(sql.EXPIRE_RUNS, limit)
        return [record["id"] for record in records]

    async def release_expiry_lease(self, db: Queryable, holder: str) -> None:
        await db.execute(sql.RELEASE_LEASE, EXPIRY_LEASE, holder)
