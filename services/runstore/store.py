"""The run store over two databases: LEGACY rows in the control-plane database, NEW rows in the
run-ops database (spec §1, §3). `RunStore` routes every operation by residency, reads with the
caller's consistency on the owning database only, and keeps links between the two databases
counted. With the split off there is one database (the control plane's) and ids are minted
LEGACY-shaped.

Every id here is a body (`run_<body>` → `<body>`); environment ids are checked on every row.
Refusals are `runops.kit.errors` exceptions, so the servicer only translates messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

import structlog

from runops.common.v1 import common_pb2
from runops.kit.dependencies import unique_violation
from runops.kit.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    not_found,
)
from runops.kit.ids import (
    BATCH,
    RUN,
    WAITPOINT,
    IdMinter,
    Residency,
    is_legacy_body,
    is_new_body,
    mint_body,
    residency_of,
)
from runops.kit.replica import Consistency, DbConnection, ReplicaRouter
from runops.runstore.v1 import runstore_pb2 as rs
from services.runstore import sql
from services.runstore.columns import CreatedRuns, ItemChunk, RunChunk
from services.runstore.rows import (
    AcceptedItems,
    BatchRow,
    CreatedBatch,
    CreatedRun,
    FinalizedRun,
    ItemKinds,
    MissingRanges,
    RunRow,
    SealResult,
)
from services.runstore.tables import BatchNotAccepting, RunTables

log = structlog.get_logger("runops.runstore")

T = TypeVar("T")

# An idempotency key's scope: (environment, task, key).
Key = tuple[str, str, str]

# Final run statuses as the proto enum (what CompleteRun / CancelRun compare a retry against).
_COMPLETED = common_pb2.RUN_STATUS_COMPLETED_SUCCESSFULLY
_FAILED = common_pb2.RUN_STATUS_COMPLETED_WITH_ERRORS
_CANCELED = common_pb2.RUN_STATUS_CANCELED
_FINAL = frozenset(common_pb2.RunStatus.Value(f"RUN_STATUS_{s}") for s in sql.FINAL_RUN_STATUSES)
_FINAL_STATUSES = frozenset(sql.FINAL_RUN_STATUSES)
# Stuck item indexes a re-check names in its error at most (the count says how many in all).
MAX_STUCK_INDEXES = 20


def run_not_found(run_id: str) -> NotFound:
    return not_found("run", f"{RUN}_{run_id}", "run_id")


def batch_not_found(batch_id: str) -> NotFound:
    return not_found("batch", f"{BATCH}_{batch_id}", "batch_id")


def waitpoint_not_found(waitpoint_id: str) -> NotFound:
    return not_found("waitpoint", f"{WAITPOINT}_{waitpoint_id}", "waitpoint_id")


@dataclass(frozen=True)
class Database:
    """One of the two databases: its residency and its router (writer + replicas)."""

    residency: Residency
    router: ReplicaRouter
    name: str

    async def read(
        self, query: Callable[[DbConnection], Awaitable[T]], consistency: Consistency
    ) -> T:
        return await self.router.read(query, consistency=consistency)

    async def write(self, statement: Callable[[DbConnection], Awaitable[T]]) -> T:
        async with self.router.transaction() as conn:
            return await statement(conn)


@dataclass
class KeyLock:
    """Creates of some idempotency keys, serialized across both databases (`conn`: a
    transaction on the LEGACY writer holding an advisory lock per key until the creates have
    committed; None: no lock needed). LEGACY work under the lock runs on that connection (one
    statement at a time: its holder does not use it concurrently), so the holder never waits
    for a second LEGACY connection while holding one (no pool deadlock under contention)."""

    legacy: Database
    conn: DbConnection | None = None

    async def read(
        self, db: Database, query: Callable[[DbConnection], Awaitable[T]], consistency: Consistency
    ) -> T:
        if self.conn is None or db is not self.legacy:
            return await db.read(query, consistency)
        return await query(self.conn)

    async def write(self, db: Database, statement: Callable[[DbConnection], Awaitable[T]]) -> T:
        """On LEGACY under the lock: inside its transaction (committed with it)."""
        if self.conn is None or db is not self.legacy:
            return await db.write(statement)
        async with self.conn.transaction():
            return await statement(self.conn)


class RunStore:
    """Runs, batches, batch items and waitpoints behind one API over LEGACY and NEW databases
    (`new` None: single-database mode)."""

    def __init__(self, legacy: ReplicaRouter, new: ReplicaRouter | None) -> None:
        self.tables = RunTables()
        self.legacy = Database(Residency.LEGACY, legacy, "controlplane")
        self.new = None if new is None else Database(Residency.NEW, new, "runops")
        self.minter = IdMinter(database_split=new is not None)

    @property
    def split(self) -> bool:
        return self.new is not None

    @property
    def databases(self) -> tuple[Database, ...]:
        return (self.legacy,) if self.new is None else (self.new, self.legacy)

    def owner(self, body: str) -> Database:
        """The database a row with this id lives in (writes; reads of a classifiable id)."""
        if self.new is not None and residency_of(body) is Residency.NEW:
            return self.new
        return self.legacy

    def other(self, db: Database) -> Database | None:
        if self.new is None:
            return None
        return self.legacy if db is self.new else self.new

    def probe(self, body: str) -> tuple[Database, ...]:
        """Where a read looks: the owner for a NEW- or LEGACY-shaped id; NEW then LEGACY for an
        id of neither shape (a caller-chosen one, which was written LEGACY)."""
        if is_new_body(body) or is_legacy_body(body):
            return (self.owner(body),)
        return self.databases

    async def _first(
        self,
        dbs: Sequence[Database],
        query: Callable[[Database], Awaitable[T | None]],
    ) -> T | None:
        for db in dbs:
            found = await query(db)
            if found is not None:
                return found
        return None

    async def _get(
        self,
        body: str,
        query: Callable[[DbConnection], Awaitable[T | None]],
        consistency: Consistency,
        missing: Callable[[str], NotFound],
    ) -> T:
        """The first answer of `query` where a read of this id looks (see `probe`); none:
        `missing(body)` is raised."""
        found = await self._first(self.probe(body), lambda db: db.read(query, consistency))
        if found is None:
            raise missing(body)
        return found

    def run_minter(self, parent: str | None = None) -> Callable[[], str]:
        """Mints the bodies of new runs when their rows are built (one id each, no copy of the
        row afterwards): by the residency policy, or with a parent's residency (a batch's runs
        live with their batch; `parent` is any id or body, classified as `residency_of` does)."""
        if parent is None:
            return self.minter.mint_body
        return functools.partial(mint_body, residency_of(parent))

    # -- runs -----------------------------------------------------------------------------------
    async def create_runs(self, runs: RunChunk) -> CreatedRuns:
        """Every run in one statement per database (both written concurrently), results in
        request order. Ids are minted by the residency policy where none was given. A key a
        live run of the other database holds returns that run (keys are unique across both:
        keyed creates hold `key_lock` from that check until their insert committed)."""
        ids = runs.ids
        if "" in ids:
            ids[:] = [body or self.minter.mint_body() for body in ids]
        groups: dict[str, list[int]] = {}
        if self.new is None:
            groups[self.legacy.name] = list(range(runs.count))
        else:
            for position, body in enumerate(ids):
                groups.setdefault(self.owner(body).name, []).append(position)
        # Single-database mode neither checks nor locks keys (the unique index serializes).
        keys = _claimed_keys(runs) if self.split else {}
        results = CreatedRuns.empty(runs.count)

        async def write(db: Database, positions: list[int], lock: KeyLock) -> None:
            held = await self._held_elsewhere(db, [keys.get(k) for k in positions], lock)
            for k, run in held.items():
                results.cached(positions[k], run)
            todo = [p for k, p in enumerate(positions) if k not in held] if held else positions
            if not todo:
                return

            async def create(conn: DbConnection) -> CreatedRuns:
                return await self.tables.write_runs(conn, runs.take(todo))

            results.merge(todo, await lock.write(db, create))

        by_name = {db.name: db for db in self.databases}
        async with self.key_lock(sorted(set(keys.values()))) as lock:
            writes = [write(by_name[name], ks, lock) for name, ks in groups.items()]
            if lock.conn is None:
                await asyncio.gather(*writes)
            else:
                # One database after the other: rows of one key in both see each other (the
                # second checks after the first wrote).
                for written in writes:
                    await written
        await self._settle_links(runs, results)
        return results

    async def _settle_links(self, runs: RunChunk, created: CreatedRuns) -> None:
        """After a create: batch items linked to these ids (a buffered run an item linked to,
        now drained) must count when the run is final. A run written final counted the items
        of its own database in its insert; here the other database's. A run never written (the
        key's holder came back instead) hands its items to that holder, in both databases."""
        final_written: dict[str, list[str]] = {}
        holders: dict[str, str] = {}
        final_holders: list[str] = []
        ids = runs.ids
        for k, run in created.existing.items():
            if run.id != ids[k]:
                holders[ids[k]] = run.id
                if run.status in _FINAL:
                    final_holders.append(run.id)
        if self.split and not _FINAL_STATUSES.isdisjoint(runs.values("status")):
            for k, record in created.records.items():
                if record["completed_at"] is not None:
                    final_written.setdefault(self.owner(ids[k]).name, []).append(ids[k])
        for db in self.databases:
            if db.name in final_written:
                await self._count_links_elsewhere(db, final_written[db.name])
        if holders:
            # Relinked at once in both databases (an item accepted after this, linking to the
            # unwritten id, is found by the reaper's PROCESSING re-check).
            await asyncio.gather(
                *(
                    db.write(lambda conn: self.tables.relink_items(conn, holders, final_holders))
                    for db in self.databases
                )
            )
            log.info("relinked items of unwritten runs to their key holders", runs=len(holders))

    @contextlib.asynccontextmanager
    async def key_lock(self, keys: Sequence[Key]) -> AsyncIterator[KeyLock]:
        """Serializes creates of these (environment, task, key) triples across both databases
        (spec §3): the locks are held in ONE agreed database (LEGACY, which every deployment has)
        from the check of the other database until the insert committed, so a second create of
        a key sees the first one's run. No lock without keys, nor in single-database mode, where
        the unique index alone serializes them."""
        if self.new is None or not keys:
            yield KeyLock(self.legacy)
            return
        async with self.legacy.router.transaction() as conn:
            await self.tables.lock_idempotency_keys(conn, keys)
            yield KeyLock(self.legacy, conn)

    async def _held_elsewhere(
        self, db: Database, keys: Sequence[Key | None], lock: KeyLock
    ) -> dict[int, common_pb2.Run]:
        """Positions of `keys` (the rows' claimed keys) a live run in the OTHER database holds."""
        other = self.other(db)
        if other is None:
            return {}
        wanted = [(k, key) for k, key in enumerate(keys) if key is not None]
        if not wanted:
            return {}
        asked = [key for _, key in wanted]

        async def holders(conn: DbConnection) -> dict[int, common_pb2.Run]:
            return await self.tables.live_key_holders(conn, asked)

        found = await lock.read(other, holders, Consistency.WRITER)
        return {wanted[n][0]: run for n, run in found.items()}

    async def create_run(self, row: RunRow) -> CreatedRun:
        runs = RunChunk.from_rows([row])
        [created] = (await self.create_runs(runs)).results(runs)
        if created.run is None:
            raise unique_violation(created.conflict or "runs_pkey", "runs")
        return created

    async def get_run(
        self, run_id: str, environment_id: str, consistency: Consistency
    ) -> common_pb2.Run:
        return await self._get(
            run_id,
            lambda conn: self.tables.get_run(conn, run_id, environment_id),
            consistency,
            run_not_found,
        )

    async def find_run_by_idempotency_key(
        self, environment_id: str, task: str, key: str, consistency: Consistency
    ) -> common_pb2.Run | None:
        """The key says nothing about residency: NEW, then LEGACY."""
        return await self._first(
            self.databases,
            lambda db: db.read(
                lambda conn: self.tables.find_run_by_idempotency_key(
                    conn, environment_id, task, key
                ),
                consistency,
            ),
        )

    async def reset_idempotency_key(self, environment_id: str, task: str, key: str) -> int:
        """Releases the key in both databases; how many runs held it."""
        counts = await asyncio.gather(
            *(
                db.write(
                    lambda conn: self.tables.reset_idempotency_key(conn, environment_id, task, key)
                )
                for db in self.databases
            )
        )
        return sum(counts)

    async def _update_run(
        self,
        run_id: str,
        statement: Callable[[DbConnection], Awaitable[common_pb2.Run | None]],
    ) -> common_pb2.Run | None:
        return await self._first(self.probe(run_id), lambda db: db.write(statement))

    async def add_run_tags(
        self, run_id: str, environment_id: str, tags: Sequence[str]
    ) -> common_pb2.Run:
        run = await self._update_run(
            run_id, lambda conn: self.tables.add_run_tags(conn, run_id, environment_id, tags)
        )
        if run is None:
            raise run_not_found(run_id)
        return run

    async def update_run_metadata(
        self, run_id: str, environment_id: str, metadata: str, metadata_type: str
    ) -> common_pb2.Run:
        run = await self._update_run(
            run_id,
            lambda conn: self.tables.update_run_metadata(
                conn, run_id, environment_id, metadata, metadata_type
            ),
        )
        if run is None:
            raise run_not_found(run_id)
        return run

    async def reschedule_run(
        self, run_id: str, environment_id: str, delay_until: datetime
    ) -> common_pb2.Run:
        run = await self._update_run(
            run_id,
            lambda conn: self.tables.reschedule_run(conn, run_id, environment_id, delay_until),
        )
        if run is not None:
            return run
        current = await self.get_run(run_id, environment_id, Consistency.WRITER)
        raise FailedPrecondition(
            f"only a DELAYED run can be rescheduled; {current.friendly_id} is "
            f"{common_pb2.RunStatus.Name(current.status).removeprefix('RUN_STATUS_')}",
            reason="RUN_NOT_DELAYED",
            metadata={"run_id": current.friendly_id},
        )

    async def complete_run(
        self,
        run_id: str,
        environment_id: str,
        *,
        output: bytes = b"",
        output_type: str = "",
        error: common_pb2.RunError | None = None,
    ) -> FinalizedRun:
        wanted = _COMPLETED if error is None else _FAILED
        return await self._finalize(
            run_id,
            wanted,
            lambda conn: self.tables.complete_run(
                conn, run_id, environment_id, output=output, output_type=output_type, error=error
            ),
        )

    async def cancel_run(self, run_id: str, environment_id: str, reason: str) -> FinalizedRun:
        return await self._finalize(
            run_id,
            _CANCELED,
            lambda conn: self.tables.cancel_run(conn, run_id, environment_id, reason),
        )

    async def _finalize(
        self,
        run_id: str,
        wanted: int,
        statement: Callable[[DbConnection], Awaitable[FinalizedRun | None]],
    ) -> FinalizedRun:
        """Finalizes in the run's database (counting its items there, in one statement), then
        counts the items of the other database linked to it. A retry of a finalization that
        happened answers the same; a run that ended otherwise is FAILED_PRECONDITION."""
        finalized: FinalizedRun | None = None
        for db in self.probe(run_id):
            finalized = await db.write(statement)
            if finalized is not None:
                break
        if finalized is None:
            raise run_not_found(run_id)
        if not finalized.changed and finalized.run.status != wanted:
            status = common_pb2.RunStatus.Name(finalized.run.status).removeprefix("RUN_STATUS_")
            raise FailedPrecondition(
                f"run {finalized.run.friendly_id} is final already ({status})",
                reason="RUN_ALREADY_FINAL",
                metadata={"run_id": finalized.run.friendly_id, "status": status},
            )
        # Also when not changed: a retry after a lost second write repairs it at once.
        await self._count_links_elsewhere(self.owner(run_id), [run_id])
        return finalized

    async def _count_links_elsewhere(self, home: Database, run_ids: list[str]) -> None:
        """The runs `run_ids` of `home` are final: count the items of the other database that
        link to them. Failure is logged, not raised (the run's own write committed): the other
        database's reaper finds the item still pending and counts it."""
        other = self.other(home)
        if other is None:
            return
        try:
            await other.write(lambda conn: self.tables.mark_linked_runs_final(conn, run_ids))
        except Exception as exc:
            log.warning(
                "counting cross-database links failed; the reaper will",
                database=other.name,
                runs=len(run_ids),
                error=repr(exc),
            )

    # -- batches --------------------------------------------------------------------------------
    async def create_batch(self, row: BatchRow) -> CreatedBatch:
        """The batch in its database (with the waitpoint its parent waits on), or the batch
        its environment's idempotency key made already (in either database), with is_cached."""
        if not row.id:
            row = dataclasses.replace(row, id=self.minter.mint_body())
        if row.resume_parent_on_completion and row.waitpoint_id is None:
            row = dataclasses.replace(row, waitpoint_id=mint_body(residency_of(row.id)))
        db = self.owner(row.id)
        other = self.other(db)
        if other is not None and row.idempotency_key is not None:
            key = row.idempotency_key
            existing = await other.read(
                lambda conn: self.tables.batch_by_idempotency_key(conn, row.environment_id, key),
                Consistency.WRITER,
            )
            if existing is not None:
                return CreatedBatch(existing, is_cached=True)
        created = await db.write(lambda conn: self.tables.create_batch(conn, row))
        if created.batch is None:
            raise unique_violation(created.conflict or "batches_pkey", "batches")
        return created

    async def get_batch(
        self, batch_id: str, environment_id: str, consistency: Consistency
    ) -> common_pb2.Batch:
        return await self._get(
            batch_id,
            lambda conn: self.tables.get_batch(conn, batch_id, environment_id),
            consistency,
            batch_not_found,
        )

    async def _batch_home(self, batch_id: str, environment_id: str) -> Database:
        """The database of an existing batch (the owner, unless the id's shape is neither)."""
        dbs = self.probe(batch_id)
        if len(dbs) == 1:
            return dbs[0]
        for db in dbs:
            found = await db.read(
                lambda conn: self.tables.get_batch(conn, batch_id, environment_id),
                Consistency.WRITER,
            )
            if found is not None:
                return db
        raise batch_not_found(batch_id)

    async def accept_batch_items(
        self, batch_id: str, environment_id: str, items: ItemChunk
    ) -> AcceptedItems:
        """A chunk in one transaction of the batch's database. Runs inherit the batch's
        residency; an item with a key a live run of the other database holds links to that run;
        a link to a run of the other database counts at once if that run is final, and later
        when it completes (see docs/runstore.md, "Links across the databases")."""
        db = await self._batch_home(batch_id, environment_id)
        other = self.other(db)
        runs = items.runs
        links = items.existing_run_id
        ids = runs.ids
        if "" in ids:
            residency = residency_of(batch_id)
            ids[:] = [
                body or ("" if links is not None and links[k] else mint_body(residency))
                for k, body in enumerate(ids)
            ]
        # Items that would claim a key: checked against the other database and written under
        # the key lock (keys are unique across both databases).
        keyed: list[tuple[int, Key]] = []
        if other is not None and runs.columns["idempotency_key"] is not None:
            keyed = [
                (k, (environment_id, runs.value("task_identifier", k), key))
                for k, (key, status) in enumerate(
                    zip(runs.values("idempotency_key"), runs.values("status"), strict=True)
                )
                if key is not None
                and (links is None or not links[k])
                and status in sql.CLAIMING_RUN_STATUSES
            ]
        async with self.key_lock([key for _, key in keyed]) as lock:
            if other is not None:
                await self._link_across(other, keyed, items, lock)

            async def accept(conn: DbConnection) -> AcceptedItems:
                result = await self.tables.accept_batch_items(conn, batch_id, environment_id, items)
                if result.out_of_range:
                    # Raised inside the transaction: nothing of the chunk stays written.
                    raise _out_of_range(items.indexes, result)
                return result

            try:
                result = await lock.write(db, accept)
            except BatchNotAccepting as exc:
                raise _not_accepting(batch_id, exc.batch) from None
        if items.existing_run_id is None:
            return result
        pending = {
            run_id
            for run_id, final in zip(items.existing_run_id, items.finals(), strict=True)
            if run_id and not final
        }
        foreign = sorted(
            run_id for run_id in pending if other is not None and self.owner(run_id) is other
        )
        local = sorted(pending.difference(foreign))
        if foreign and other is not None:
            # Written after our commit: a run that became final before now was either seen by
            # its completion's link count (after our commit) or is seen final here.
            final = await other.read(
                lambda conn: self.tables.final_run_ids(conn, foreign), Consistency.WRITER
            )
            if final:
                await db.write(lambda conn: self.tables.mark_linked_runs_final(conn, sorted(final)))
        if local:
            # A linked run written final (a drained buffered run) while our statement ran saw
            # no item to count, and we saw no run: counted now (or by the reaper's re-check).
            await db.write(lambda conn: self.tables.count_final_runs(conn, local))
        return result

    async def _link_across(
        self,
        other: Database,
        keyed: Sequence[tuple[int, Key]],
        items: ItemChunk,
        lock: KeyLock,
    ) -> None:
        """Items linked to runs of the other database learn whether those are final; items
        whose idempotency key (`keyed`: item position, key) a live run there holds link to it."""
        if keyed:
            keys = [key for _, key in keyed]

            async def live(conn: DbConnection) -> dict[int, common_pb2.Run]:
                return await self.tables.live_key_holders(conn, keys)

            holders = await lock.read(other, live, Consistency.WRITER)
            for n, holder in holders.items():
                items.set_link(keyed[n][0], holder.id)
        if items.existing_run_id is None:
            return
        foreign = sorted(
            {run_id for run_id in items.existing_run_id if run_id and self.owner(run_id) is other}
        )
        if not foreign:
            return

        async def final_ids(conn: DbConnection) -> set[str]:
            return await self.tables.final_run_ids(conn, foreign)

        final = await lock.read(other, final_ids, Consistency.WRITER)
        for k, run_id in enumerate(items.existing_run_id):
            if run_id in final:
                items.set_link(k, run_id, final=True)

    async def missing_ranges(
        self, batch_id: str, environment_id: str, limit: int, consistency: Consistency
    ) -> MissingRanges:
        return await self._get(
            batch_id,
            lambda conn: self.tables.missing_ranges(conn, batch_id, environment_id, limit=limit),
            consistency,
            batch_not_found,
        )

    async def seal_batch(self, batch_id: str, environment_id: str) -> SealResult:
        db = await self._batch_home(batch_id, environment_id)
        return await db.write(lambda conn: self.tables.seal_batch(conn, batch_id, environment_id))

    async def list_batch_runs(
        self,
        batch_id: str,
        environment_id: str,
        after_index: int,
        limit: int,
        consistency: Consistency,
    ) -> tuple[list[common_pb2.Run], int | None]:
        """A page of the batch's runs by index, linked runs of the other database included."""
        db = await self._batch_home(batch_id, environment_id)
        page = await db.read(
            lambda conn: self.tables.list_batch_items(
                conn, batch_id, environment_id, after_index=after_index, limit=limit
            ),
            consistency,
        )
        if page is None:
            raise batch_not_found(batch_id)
        runs, missing, next_index = page
        other = self.other(db)
        if missing and other is not None:
            ids = list(missing.values())
            found = await other.read(
                lambda conn: self.tables.get_runs(conn, ids, environment_id), consistency
            )
            for position, run_id in missing.items():
                if run_id in found:
                    runs[position] = found[run_id]
        return [run for run in runs if run is not None], next_index

    async def list_item_outcomes(
        self,
        batch_id: str,
        environment_id: str,
        kinds: ItemKinds,
        after_index: int,
        limit: int,
        consistency: Consistency,
    ) -> tuple[list[rs.BatchItemRecord], int | None]:
        """A page of the batch's items (run id, linked, pre-failed) by index."""
        db = await self._batch_home(batch_id, environment_id)
        page = await db.read(
            lambda conn: self.tables.list_item_outcomes(
                conn, batch_id, environment_id, kinds, after_index=after_index, limit=limit
            ),
            consistency,
        )
        if page is None:
            raise batch_not_found(batch_id)
        return page

    async def get_waitpoint(
        self, waitpoint_id: str, environment_id: str, consistency: Consistency
    ) -> common_pb2.Waitpoint:
        return await self._get(
            waitpoint_id,
            lambda conn: self.tables.get_waitpoint(conn, waitpoint_id, environment_id),
            consistency,
            waitpoint_not_found,
        )

    # -- background: seal timeouts and link repair ---------------------------------------------
    async def reap(
        self,
        db: Database,
        *,
        holder: str,
        seal_timeout: timedelta,
        lease_ttl: timedelta,
        limit: int,
        cursor: str,
        recheck_after: timedelta = timedelta(minutes=5),
    ) -> tuple[list[str] | None, str]:
        """One reaper step on `db`: under its lease, abort batches unsealed past the timeout,
        re-check sealed batches still waiting on runs `recheck_after` on, then re-check up to
        `limit` runs of the other database that items here link to and count those that are
        final (the repair for a lost second write). Returns the aborted batch ids (None:
        another process holds the lease) and the next link cursor."""
        aborted = await self.tables.reap_unsealed_batches(
            db.router.writer,
            holder=holder,
            seal_timeout=seal_timeout,
            lease_ttl=lease_ttl,
            limit=limit,
        )
        if aborted is None:
            return None, cursor
        await self.recheck_processing(db, recheck_after, limit)
        other = self.other(db)
        if other is None:
            return aborted, cursor
        pending = await db.read(
            lambda conn: self.tables.pending_links(
                conn, cursor, limit, other_is_new=other.residency is Residency.NEW
            ),
            Consistency.WRITER,
        )
        foreign = [run_id for run_id in pending if self.owner(run_id) is other]
        if foreign:
            final = await other.read(
                lambda conn: self.tables.final_run_ids(conn, foreign), Consistency.WRITER
            )
            if final:
                counted = await db.write(
                    lambda conn: self.tables.mark_linked_runs_final(conn, sorted(final))
                )
                log.info("counted cross-database links", database=db.name, items=counted)
        # Wrap around once the end is reached.
        next_cursor = pending[-1] if len(pending) == limit else ""
        return aborted, next_cursor

    # -- background: TTL expiry ---------------------------------------------------------------
    async def expire(
        self, db: Database, *, holder: str, lease_ttl: timedelta, limit: int
    ) -> list[str] | None:
        """One expiry step on `db` under its lease (see `Expirer`): the expired run ids, their
        links in the other database counted; None when another process holds the lease."""
        expired = await self.tables.expire_runs(
            db.router.writer, holder=holder, lease_ttl=lease_ttl, limit=limit
        )
        if expired:
            await self._count_links_elsewhere(db, expired)
        return expired

    async def recheck_processing(self, db: Database, threshold: timedelta, limit: int) -> int:
        """Sealed batches of `db` still waiting on runs `threshold` after their seal (or last
        check): uncounted items whose run is final count (in either database); items whose run
        was written nowhere (a buffered run that never drained, or resolved to another run
        after the item linked to it) complete the waitpoint with an error naming their indexes.
        So a batch-and-wait ends one way or the other. How many batches were failed."""
        # On the writer pool, not through the router: a background step that usually changes
        # nothing must not make this process's default reads wait for the replica.
        batch_ids = await self.tables.due_processing_batches(db.router.writer, threshold, limit)
        if not batch_ids:
            return 0
        repaired = await db.write(lambda conn: self.tables.repair_batch_counts(conn, batch_ids))
        unresolved = await db.read(
            lambda conn: self.tables.unresolved_items(conn, batch_ids, 100 * limit),
            Consistency.WRITER,
        )
        other = self.other(db)
        missing = {run_id for _, _, run_id in unresolved}
        if other is not None and missing:
            ids = sorted(missing)
            found = await other.read(
                lambda conn: self.tables.run_finality(conn, ids), Consistency.WRITER
            )
            final = sorted(run_id for run_id, is_final in found.items() if is_final)
            if final:
                repaired += await db.write(
                    lambda conn: self.tables.mark_linked_runs_final(conn, final)
                )
            missing.difference_update(found)
        if repaired:
            log.info("re-check counted final runs", database=db.name, items=repaired)
        stuck: dict[str, list[int]] = {}
        for batch_id, index, run_id in unresolved:
            if run_id in missing:
                stuck.setdefault(batch_id, []).append(index)
        if not stuck:
            return 0
        messages = {batch_id: _stuck_message(indexes) for batch_id, indexes in stuck.items()}
        failed = await db.write(lambda conn: self.tables.fail_stuck_batches(conn, messages))
        if failed:
            log.warning("batches waiting on runs never written", database=db.name, batches=failed)
        return len(failed)

    async def release_leases(self, holder: str) -> None:
        for db in self.databases:
            await self.tables.release_reaper_lease(db.router.writer, holder)


def _claimed_keys(runs: RunChunk) -> dict[int, Key]:
    """The (environment, task, key) each run would hold, by position: none for a run without a
    key or created final."""
    if runs.columns["idempotency_key"] is None:
        return {}
    return {
        k: (runs.value("environment_id", k), runs.value("task_identifier", k), key)
        for k, (key, status) in enumerate(
            zip(runs.values("idempotency_key"), runs.values("status"), strict=True)
        )
        if key is not None and status in sql.CLAIMING_RUN_STATUSES
    }


def _stuck_message(indexes: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in indexes[:MAX_STUCK_INDEXES])
    more = (
        f" and {len(indexes) - MAX_STUCK_INDEXES} more" if len(indexes) > MAX_STUCK_INDEXES else ""
    )
    return f"{len(indexes)} item(s) wait on runs that were never written: indexes {shown}{more}"


def _out_of_range(indexes: Sequence[int], result: AcceptedItems) -> InvalidArgument:
    bad = set(result.out_of_range)
    violations = [
        FieldViolation(
            f"items[{k}].index",
            f"must be below the batch's run_count {result.run_count} (got {index})",
        )
        for k, index in enumerate(indexes)
        if index in bad
    ]
    return InvalidArgument(
        f"{len(violations)} item(s) outside [0, {result.run_count}); nothing was written",
        reason="INDEX_OUT_OF_RANGE",
        metadata={"run_count": str(result.run_count)},
        violations=violations,
    )


def _not_accepting(batch_id: str, batch: common_pb2.Batch | None) -> Exception:
    if batch is None:
        return batch_not_found(batch_id)
    status = common_pb2.BatchStatus.Name(batch.status).removeprefix("BATCH_STATUS_")
    if batch.status == common_pb2.BATCH_STATUS_ABORTED:
        return FailedPrecondition(
            f"batch {batch.friendly_id} was aborted ({batch.error_message}); create a new batch",
            reason="BATCH_ABORTED",
            metadata={"batch_id": batch.friendly_id, "status": status},
        )
    return FailedPrecondition(
        f"batch {batch.friendly_id} is sealed ({status}) and takes no more items",
        reason="BATCH_SEALED",
        metadata={"batch_id": batch.friendly_id, "status": status},
    )
