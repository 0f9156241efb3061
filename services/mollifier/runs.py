"""Runs wherever they are (spec §4): reads look in the run store, then the buffer, and return a
buffered run in the run shape (`buffered`); resetting a key clears both stores; mutations change
the buffered snapshot while it waits, else the run store. The buffer's keys are per environment,
so another environment's buffered run is never read (and each entry's own environment is
checked once more)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import redis.exceptions
import structlog

from runops.common.v1 import common_pb2
from runops.kit.errors import (
    FailedPrecondition,
    RunopsError,
    Unavailable,
    not_found,
)
from runops.runstore.client import RunStoreClient
from services.mollifier.buffer import EnvironmentStats, MollifierBuffer, MutationOutcome
from services.mollifier.entries import BufferedEntry, EntryStatus

log = structlog.get_logger("runops.mollifier.runs")

RUN_DRAINING = "RUN_DRAINING"
# A drainer writes a tick in well under a second; the caller retries after this.
DRAINING_RETRY_SECONDS = 0.5


def run_not_found(run_id: str) -> RunopsError:
    return not_found("run", run_id, "run_id")


def _live(entry: BufferedEntry | None, environment_id: str) -> BufferedEntry | None:
    if entry is None or entry.environment_id != environment_id:
        return None
    return entry


@dataclass(frozen=True)
class ResetOutcome:
    cleared_count: int
    buffer_cleared: bool


class BufferedRuns:
    def __init__(self, buffer: MollifierBuffer, run_store: RunStoreClient) -> None:
        self._buffer = buffer
        self._run_store = run_store

    @staticmethod
    def _friendly(run_id: str) -> str:
        return run_id if run_id.startswith("run_") else f"run_{run_id}"

    async def get(
        self, environment_id: str, run_id: str, *, read_your_writes: bool = False
    ) -> common_pb2.Run | None:
        """The run store's run, else the buffered one (None when neither has it)."""
        run = await self._run_store.get_run(
            environment_id=environment_id, run_id=run_id, read_your_writes=read_your_writes
        )
        if run is not None:
            return run
        try:
            entry = _live(
                await self._buffer.get(environment_id, self._friendly(run_id)), environment_id
            )
        except redis.exceptions.RedisError as exc:
            raise Unavailable(
                "the run is not in the run store and the buffer is unreachable; retry shortly",
                reason="BUFFER_UNAVAILABLE",
                retry_after=1.0,
            ) from exc
        return await self._shown(entry, environment_id, read_your_writes)

    async def _shown(
        self, entry: BufferedEntry | None, environment_id: str, read_your_writes: bool
    ) -> common_pb2.Run | None:
        if entry is None:
            return None
        if entry.status in (EntryStatus.DONE, EntryStatus.FAILED):
            # Written already: a replica behind the writer did not show it; the writer will.
            if not read_your_writes:
                return await self._run_store.get_run(
                    environment_id=environment_id, run_id=entry.run_id, read_your_writes=True
                )
            return None
        return entry.to_run(_now())

    async def find_by_idempotency_key(
        self, environment_id: str, task_identifier: str, key: str, *, read_your_writes: bool
    ) -> common_pb2.Run | None:
        """The run store's run holding the key, else the buffer's live one. Where neither has
        it, a replica's absence is confirmed on the writer: a run drained a moment ago is out
        of the buffer (its lookup goes with the ack) while a replica may not show it yet."""
        run = await self._find_stored(environment_id, task_identifier, key, read_your_writes)
        if run is not None:
            return run
        try:
            entry = _live(
                await self._buffer.find_by_idempotency_key(environment_id, task_identifier, key),
                environment_id,
            )
        except redis.exceptions.RedisError as exc:
            raise Unavailable(
                "no run holds the key in the run store and the buffer is unreachable",
                reason="BUFFER_UNAVAILABLE",
                retry_after=1.0,
            ) from exc
        if entry is None:
            if read_your_writes:
                return None
            return await self._find_stored(environment_id, task_identifier, key, True)
        if not entry.idempotency_key_live(_now()):
            return None
        if entry.status in (EntryStatus.DONE, EntryStatus.FAILED):
            return await self._find_stored(environment_id, task_identifier, key, True)
        return entry.to_run(_now())

    async def _find_stored(
        self, environment_id: str, task_identifier: str, key: str, read_your_writes: bool
    ) -> common_pb2.Run | None:
        return await self._run_store.find_run_by_idempotency_key(
            environment_id=environment_id,
            task_identifier=task_identifier,
            idempotency_key=key,
            read_your_writes=read_your_writes,
        )

    async def reset_idempotency_key(
        self, environment_id: str, task_identifier: str, key: str
    ) -> ResetOutcome:
        """Buffer first (an entry DRAINING may be written with the key right now), then the run
        store. A failed buffer reset still succeeds when the run store cleared a run (the
        buffer's lookup ends with that run's drain); with nothing cleared it is UNAVAILABLE. A
        run store that fails raises (UNAVAILABLE with RetryInfo through the kit's downstream
        mapping): it may hold the key, and a retry is harmless."""
        buffer_cleared = False
        buffer_failed = False
        try:
            reset = await self._buffer.reset_idempotency_key(environment_id, task_identifier, key)
            buffer_cleared = reset.cleared
        except redis.exceptions.RedisError as exc:
            log.warning("buffer reset of an idempotency key failed", error=repr(exc))
            buffer_failed = True
        cleared = await self._run_store.reset_idempotency_key(
            environment_id=environment_id, task_identifier=task_identifier, idempotency_key=key
        )
        if buffer_failed and cleared == 0:
            raise Unavailable(
                "the buffer is unreachable and the run store held no run with this key; retry",
                reason="BUFFER_UNAVAILABLE",
                retry_after=1.0,
            )
        return ResetOutcome(cleared + (1 if buffer_cleared else 0), buffer_cleared)

    # -- mutations ------------------------------------------------------------------------
    async def add_tags(
        self, environment_id: str, run_id: str, tags: Sequence[str]
    ) -> common_pb2.Run:
        result = await self._buffer.add_tags(environment_id, self._friendly(run_id), tags)
        return await self._settle(
            result.outcome,
            result.entry,
            environment_id,
            run_id,
            lambda: self._run_store.add_run_tags(
                environment_id=environment_id, run_id=run_id, tags=tags
            ),
        )

    async def update_metadata(
        self, environment_id: str, run_id: str, metadata: str, metadata_type: str
    ) -> common_pb2.Run:
        result = await self._buffer.set_metadata(
            environment_id, self._friendly(run_id), metadata, metadata_type
        )
        return await self._settle(
            result.outcome,
            result.entry,
            environment_id,
            run_id,
            lambda: self._run_store.update_run_metadata(
                environment_id=environment_id,
                run_id=run_id,
                metadata=metadata,
                metadata_type=metadata_type,
            ),
        )

    async def reschedule(
        self, environment_id: str, run_id: str, delay_until: datetime
    ) -> common_pb2.Run:
        result = await self._buffer.reschedule(environment_id, self._friendly(run_id), delay_until)
        return await self._settle(
            result.outcome,
            result.entry,
            environment_id,
            run_id,
            lambda: self._run_store.reschedule_run(
                environment_id=environment_id, run_id=run_id, delay_until=delay_until
            ),
        )

    async def cancel(self, environment_id: str, run_id: str, reason: str) -> common_pb2.Run:
        result = await self._buffer.cancel(environment_id, self._friendly(run_id), reason)
        return await self._settle(
            result.outcome,
            result.entry,
            environment_id,
            run_id,
            lambda: self._run_store.cancel_run(
                environment_id=environment_id, run_id=run_id, reason=reason
            ),
        )

    async def _settle(
        self,
        outcome: MutationOutcome,
        entry: BufferedEntry | None,
        environment_id: str,
        run_id: str,
        in_run_store: Callable[[], Awaitable[common_pb2.Run]],
    ) -> common_pb2.Run:
        if outcome is MutationOutcome.OK and _live(entry, environment_id) is not None:
            assert entry is not None
            return entry.to_run(_now())
        if outcome is MutationOutcome.BUSY:
            raise FailedPrecondition(
                f"run {self._friendly(run_id)} is being written to the run store; retry shortly",
                reason=RUN_DRAINING,
                metadata={"run_id": self._friendly(run_id)},
                retry_after=DRAINING_RETRY_SECONDS,
            )
        return await in_run_store()

    # -- stats ------------------------------------------------------------------------------
    async def stats(self, environment_id: str | None) -> list[EnvironmentStats]:
        if environment_id:
            return [await self._buffer.stats(environment_id)]
        environments = sorted(await self._buffer.environments())
        return [await self._buffer.stats(env) for env in environments]


def _now() -> datetime:
    return datetime.now(UTC)
