"""The run store's rows and results: what `RunTables` writes (`RunRow`, `BatchRow`, `ItemRow`)
and what it answers (created, finalized, accepted, sealed). Plain values, no SQL."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from datetime import datetime

from runops.common.v1 import common_pb2
from services.runstore import sql


@dataclass(frozen=True)
class ItemKinds:
    """Which batch items a listing returns: pre-failed, linked, and/or the others."""

    pre_failed: bool = True
    linked: bool = True
    created: bool = True


@dataclass(frozen=True, slots=True)
class RunRow:
    """Everything written for a new run. `id` is the body; status PENDING or DELAYED for a run to
    execute, SYSTEM_FAILURE (with error_code) for a pre-failed one, CANCELED for a cancelled one
    (final runs never claim their idempotency key). `created_at` None means now."""

    id: str
    environment_id: str
    organization_id: str
    project_id: str
    task_identifier: str
    status: str = "PENDING"
    payload: bytes = b""
    payload_type: str = ""
    metadata: str = ""
    metadata_type: str = ""
    tags: tuple[str, ...] = ()
    queue: str = ""
    concurrency_key: str = ""
    idempotency_key: str | None = None
    idempotency_key_expires_at: datetime | None = None
    ttl_ms: int | None = None
    delay_until: datetime | None = None
    max_attempts: int = 0
    machine_preset: str = ""
    lock_to_version: str = ""
    worker_version: str = ""
    priority_ms: int = 0
    is_test: bool = False
    # JSON object: the trigger options no column holds (debounce, one-time-use token).
    options: str = "{}"
    parent_run_id: str | None = None
    root_run_id: str | None = None
    resume_parent_on_completion: bool = False
    error_code: str | None = None
    error_message: str = ""
    created_at: datetime | None = None

    def failed(self, code: str, message: str) -> RunRow:
        """This run, written already failed (SYSTEM_FAILURE)."""
        return dataclasses.replace(
            self, status="SYSTEM_FAILURE", error_code=code, error_message=message
        )

    def cancelled(self, reason: str) -> RunRow:
        return dataclasses.replace(
            self, status="CANCELED", error_code="TASK_RUN_CANCELLED", error_message=reason
        )


assert tuple(f.name for f in dataclasses.fields(RunRow)) == tuple(
    name for name, _ in sql.RUN_INPUT_FIELDS
), "RunRow's fields must be sql.RUN_INPUT_FIELDS, in order"


@dataclass(frozen=True, slots=True)
class BatchRow:
    id: str
    environment_id: str
    organization_id: str
    project_id: str
    run_count: int
    idempotency_key: str | None = None
    task_identifiers: tuple[str, ...] = ()
    parent_run_id: str | None = None
    resume_parent_on_completion: bool = False
    # The waitpoint (body) created with the batch for its parent to wait on, if any.
    waitpoint_id: str | None = None
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ItemRow:
    """One item of a chunk: its run (pre-failed: `run.failed(...)`), or a link to an existing
    run (`existing_run_id`, a body; `run` is then ignored). A linked run of the OTHER database
    is invisible here: `existing_run_final` says whether the caller found it final there."""

    index: int
    run: RunRow | None = None
    existing_run_id: str | None = None
    existing_run_final: bool = False


@dataclass(frozen=True, slots=True)
class CreatedRun:
    """One CreateRuns result. `run` is None only with `conflict` (the constraint that refused
    it: the id is taken by a run of another environment)."""

    run: common_pb2.Run | None
    is_cached: bool = False
    conflict: str | None = None


@dataclass(frozen=True, slots=True)
class CreatedBatch:
    batch: common_pb2.Batch | None
    is_cached: bool = False
    conflict: str | None = None


@dataclass(frozen=True, slots=True)
class FinalizedRun:
    run: common_pb2.Run
    # The run's own batch after the completion was counted.
    batch: common_pb2.Batch | None
    # False: the run was final already and nothing changed.
    changed: bool


@dataclass(frozen=True, slots=True)
class AcceptedItem:
    index: int
    run_id: str
    # The index was present already; run_id is the run written (or linked) the first time.
    duplicate: bool


@dataclass(frozen=True, slots=True)
class AcceptedItems:
    """The items, as columns in request order (out-of-range indexes excluded): index, friendly
    run id, duplicate (the index was present already; the run is the one written or linked the
    first time)."""

    indexes: list[int]
    run_ids: list[str]
    duplicates: list[bool]
    accepted_count: int
    run_count: int
    # Indexes >= run_count: not written.
    out_of_range: list[int]

    @property
    def items(self) -> list[AcceptedItem]:
        return [
            AcceptedItem(*item)
            for item in zip(self.indexes, self.run_ids, self.duplicates, strict=True)
        ]


@dataclass(frozen=True, slots=True)
class MissingRanges:
    # Half-open [start, end), ascending, at most the limit asked for.
    ranges: list[tuple[int, int]]
    # More ranges exist than were returned.
    truncated: bool
    run_count: int
    accepted_count: int


class SealOutcome(enum.Enum):
    SEALED = "sealed"  # this call sealed it
    ALREADY_SEALED = "already_sealed"  # sealed (and maybe done) before
    COUNT_MISMATCH = "count_mismatch"  # accepted_count < run_count: batch.accepted_count says
    ABORTED = "aborted"  # aborted unsealed (seal timeout)
    NOT_FOUND = "not_found"


@dataclass(frozen=True, slots=True)
class SealResult:
    outcome: SealOutcome
    batch: common_pb2.Batch | None
