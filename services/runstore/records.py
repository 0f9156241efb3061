"""asyncpg records of the run store's tables -> `runops.common.v1` messages, friendly ids filled in."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg
from google.protobuf import timestamp_pb2

from runops.common.v1 import common_pb2
from runops.kit.ids import BATCH, RUN, WAITPOINT, residency_of
from runops.kit.limits import EPOCH
from services.runstore import sql
from services.runstore.rows import RunRow


def _ts(value: datetime | None, into: timestamp_pb2.Timestamp) -> None:
    if value is not None:
        into.seconds, into.nanos = _epoch_parts(value)


def _since_epoch(value: datetime) -> tuple[int, int]:
    """What Timestamp.FromDatetime sets (a naive datetime is UTC), several times cheaper."""
    since = (value if value.tzinfo is not None else value.replace(tzinfo=UTC)) - EPOCH
    return since.days * 86_400 + since.seconds, since.microseconds * 1000


# Cached for the answers of writes: the rows of one write share their timestamps (now() of the
# transaction). Rows read have timestamps of their own: those skip the cache.
_epoch_parts = functools.lru_cache(maxsize=1024)(_since_epoch)


# A row's status → the proto enum.
_RUN_STATUSES = {
    name.removeprefix("RUN_STATUS_"): number
    for name, number in common_pb2.RunStatus.items()
    if name != "RUN_STATUS_UNSPECIFIED"
}
# Run fields a row holds as the message does, left out when empty (NULL, "", 0, false: the
# field's default): every field set costs, and a read run has many empty ones.
_RUN_AS_IS = (
    "environment_id", "organization_id", "project_id", "task_identifier", "payload",
    "payload_type", "metadata", "metadata_type", "tags", "queue", "concurrency_key",
    "idempotency_key", "max_attempts", "machine_preset", "lock_to_version", "worker_version",
    "parent_run_id", "root_run_id", "resume_parent_on_completion", "output", "output_type",
    "is_test",
)  # fmt: skip

_RUN_TIMES = (
    "idempotency_key_expires_at", "delay_until", "created_at", "updated_at", "completed_at",
    "queue_timestamp",
)  # fmt: skip


def run_from_record(
    row: asyncpg.Record, new: Callable[..., common_pb2.Run] = common_pb2.Run
) -> common_pb2.Run:
    """The run a row of RUN_COLUMNS holds. `new` makes the message from its fields: the class,
    or a repeated field's `add`, which builds the run in place (no copy into the answer)."""
    body: str = row["id"]
    fields = {name: value for name in _RUN_AS_IS if (value := row[name])}
    if row["batch_id"]:
        fields["batch_id"] = f"{BATCH}_{row['batch_id']}"
    if row["batch_index"] is not None:
        fields["batch_index"] = row["batch_index"]
    if row["waitpoint_id"]:
        fields["waitpoint_id"] = f"{WAITPOINT}_{row['waitpoint_id']}"
    if row["error_code"] is not None:
        fields["error"] = {"code": row["error_code"], "message": row["error_message"]}
    run = new(
        id=body,
        friendly_id=f"{RUN}_{body}",
        residency=residency_of(body).to_proto(),
        status=_RUN_STATUSES[row["status"]],
        **fields,
    )
    if row["ttl_ms"] is not None:
        run.ttl.FromMilliseconds(row["ttl_ms"])
    if row["priority_ms"]:
        run.priority.FromMilliseconds(row["priority_ms"])
    for name in _RUN_TIMES:
        # Looked up only when set: reaching a sub-message builds a Python object for it.
        value = row[name]
        if value is not None:
            stamp = getattr(run, name)
            stamp.seconds, stamp.nanos = _since_epoch(value)
    return run


def created_run(row: RunRow, record: asyncpg.Record) -> common_pb2.Run:
    """The answer for a run INSERT_RUNS just wrote, equal to `run_from_record` of its row: the
    input row plus what the database chose (timestamps), without decoding every column back.
    A final run (pre-failed, cancelled) holds no idempotency key (INSERT_RUNS drops it); a run
    resuming its parent has the waitpoint INSERT_RUNS made, of the run's body; it dequeues at
    its creation time (no batch)."""
    claims_key = row.status in sql.CLAIMING_RUN_STATUSES
    run = common_pb2.Run(
        id=row.id,
        friendly_id=f"{RUN}_{row.id}",
        residency=residency_of(row.id).to_proto(),
        environment_id=row.environment_id,
        organization_id=row.organization_id,
        project_id=row.project_id,
        task_identifier=row.task_identifier,
        status=_RUN_STATUSES[row.status],
        payload=row.payload,
        payload_type=row.payload_type,
        metadata=row.metadata,
        metadata_type=row.metadata_type,
        tags=row.tags,
        queue=row.queue,
        concurrency_key=row.concurrency_key,
        idempotency_key=(row.idempotency_key or "") if claims_key else "",
        max_attempts=row.max_attempts,
        machine_preset=row.machine_preset,
        lock_to_version=row.lock_to_version,
        worker_version=row.worker_version,
        parent_run_id=row.parent_run_id or "",
        root_run_id=row.root_run_id or "",
        resume_parent_on_completion=row.resume_parent_on_completion,
        is_test=row.is_test,
    )
    if row.parent_run_id is not None and row.resume_parent_on_completion:
        run.waitpoint_id = f"{WAITPOINT}_{row.id}"
    if row.error_code is not None:
        run.error.code = row.error_code
        run.error.message = row.error_message
    if row.ttl_ms is not None:
        run.ttl.FromMilliseconds(row.ttl_ms)
    if row.priority_ms:
        run.priority.FromMilliseconds(row.priority_ms)
    if claims_key:
        _ts(row.idempotency_key_expires_at, run.idempotency_key_expires_at)
    _ts(row.delay_until, run.delay_until)
    _ts(record["created_at"], run.created_at)
    _ts(record["updated_at"], run.updated_at)
    _ts(record["completed_at"], run.completed_at)
    run.queue_timestamp.CopyFrom(run.created_at)
    return run


def batch_from_record(row: asyncpg.Record) -> common_pb2.Batch:
    body: str = row["id"]
    batch = common_pb2.Batch(
        id=body,
        friendly_id=f"{BATCH}_{body}",
        residency=residency_of(body).to_proto(),
        environment_id=row["environment_id"],
        organization_id=row["organization_id"],
        project_id=row["project_id"],
        status=common_pb2.BatchStatus.Value("BATCH_STATUS_" + row["status"]),
        run_count=row["run_count"],
        accepted_count=row["accepted_count"],
        sealed=row["sealed"],
        successful_run_count=row["successful_run_count"],
        failed_run_count=row["failed_run_count"],
        completed_run_count=row["completed_run_count"],
        idempotency_key=row["idempotency_key"] or "",
        parent_run_id=row["parent_run_id"] or "",
        resume_parent_on_completion=row["resume_parent_on_completion"],
        waitpoint_id=f"{WAITPOINT}_{row['waitpoint_id']}" if row["waitpoint_id"] else "",
        task_identifiers=row["task_identifiers"],
    )
    if row["aborted_reason"] is not None:
        batch.aborted_reason = common_pb2.BatchAbortedReason.Value(
            "BATCH_ABORTED_REASON_" + row["aborted_reason"]
        )
        batch.error_message = row["error_message"] or ""
    _ts(row["sealed_at"], batch.sealed_at)
    _ts(row["processing_started_at"], batch.processing_started_at)
    _ts(row["processing_completed_at"], batch.processing_completed_at)
    _ts(row["created_at"], batch.created_at)
    _ts(row["updated_at"], batch.updated_at)
    return batch


def waitpoint_from_record(row: asyncpg.Record) -> common_pb2.Waitpoint:
    body: str = row["id"]
    waitpoint = common_pb2.Waitpoint(
        id=body,
        friendly_id=f"{WAITPOINT}_{body}",
        residency=residency_of(body).to_proto(),
        environment_id=row["environment_id"],
        status=common_pb2.WaitpointStatus.Value("WAITPOINT_STATUS_" + row["status"]),
        batch_id=f"{BATCH}_{row['batch_id']}" if row["batch_id"] else "",
        run_id=f"{RUN}_{row['run_id']}" if row["run_id"] else "",
        output_is_error=row["output_is_error"],
        output=row["output"] or b"",
        output_type=row["output_type"],
    )
    _ts(row["completed_at"], waitpoint.completed_at)
    _ts(row["created_at"], waitpoint.created_at)
    return waitpoint
