"""What a buffered run is in Redis: its trigger snapshot (`runops.runstore.v1.RunInput` bytes,
with the real pre-minted run id) and bookkeeping fields of the entry's hash, and how it reads
back as a `Run` (buffered = true) or as the RunInput the drainer writes.

Mutations made while buffered are kept beside the snapshot (added tags, metadata, delay,
cancellation, a reset idempotency key) and applied when read. Times are integer milliseconds
since the epoch; one that does not parse, or lies outside 0001..9999, reads as absent.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from google.protobuf.message import DecodeError

from runops.common.v1 import common_pb2
from runops.kit.ids import body_of, residency_of, residency_to_proto
from runops.kit.limits import EPOCH
from runops.runstore.v1 import runstore_pb2

# datetime's own range, in ms since the epoch.
_MIN_MS = int((datetime(1, 1, 1, tzinfo=UTC) - EPOCH).total_seconds() * 1000)
_MAX_MS = int((datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()) * 1000)


class EntryStatus(enum.StrEnum):
    QUEUED = "QUEUED"
    DRAINING = "DRAINING"
    # Written to the run store; readable for the ack grace period.
    DONE = "DONE"
    # Written as a SYSTEM_FAILURE run (terminal); readable for the grace period.
    FAILED = "FAILED"


def to_ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def parse_ms(raw: bytes | str | None) -> datetime | None:
    """A stored time, or None when absent or malformed (never a made-up value)."""
    if raw is None:
        return None
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
        ms = int(text.strip())
    except (UnicodeDecodeError, ValueError):
        return None
    if not _MIN_MS <= ms <= _MAX_MS:
        return None
    return EPOCH + timedelta(milliseconds=ms)


def _text(fields: Mapping[bytes, bytes], name: str) -> str:
    raw = fields.get(name.encode())
    return raw.decode(errors="replace") if raw is not None else ""


def _int(fields: Mapping[bytes, bytes], name: str) -> int:
    try:
        return int(_text(fields, name) or 0)
    except ValueError:
        return 0


def _tags(raw: str) -> tuple[str, ...]:
    # cjson encodes an empty table as {}: anything but a list of strings reads as none.
    try:
        value = json.loads(raw) if raw else []
    except ValueError:
        return ()
    if not isinstance(value, list):
        return ()
    return tuple(tag for tag in value if isinstance(tag, str))


def pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """HGETALL as a Lua script returns it (a flat list) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


@dataclass(frozen=True)
class BufferedEntry:
    run_id: str
    environment_id: str
    organization_id: str
    snapshot: runstore_pb2.RunInput
    """The trigger as accepted (mutations are separate, below)."""
    status: EntryStatus
    created_at: datetime | None
    """The creation time the caller was shown."""
    attempts: int
    draining_since: datetime | None
    owner: str
    idempotency_key_expires_at: datetime | None
    added_tags: tuple[str, ...]
    metadata: tuple[str, str] | None
    """(metadata, metadata type) set while buffered."""
    delay_until: datetime | None
    cancelled_at: datetime | None
    cancel_reason: str
    idempotency_key_reset: bool
    error: str
    """Why the last write failed (or why the entry was recovered)."""

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes]) -> BufferedEntry | None:
        """None for a hash that is not an entry (gone, or without a readable snapshot)."""
        raw_input = fields.get(b"input")
        run_id = _text(fields, "id")
        if raw_input is None or not run_id:
            return None
        snapshot = runstore_pb2.RunInput()
        try:
            snapshot.ParseFromString(raw_input)
        except DecodeError:
            return None
        try:
            status = EntryStatus(_text(fields, "status"))
        except ValueError:
            return None
        metadata_type = fields.get(b"metadata_type")
        return cls(
            run_id=run_id,
            environment_id=_text(fields, "env"),
            organization_id=_text(fields, "org"),
            snapshot=snapshot,
            status=status,
            created_at=parse_ms(fields.get(b"created_at")),
            attempts=_int(fields, "attempts"),
            draining_since=parse_ms(fields.get(b"draining_since")),
            owner=_text(fields, "owner"),
            idempotency_key_expires_at=parse_ms(fields.get(b"idem_expires_at")),
            added_tags=_tags(_text(fields, "tags")),
            metadata=(_text(fields, "metadata"), _text(fields, "metadata_type"))
            if metadata_type is not None
            else None,
            delay_until=parse_ms(fields.get(b"delay_until")),
            cancelled_at=parse_ms(fields.get(b"cancelled_at")),
            cancel_reason=_text(fields, "cancel_reason"),
            idempotency_key_reset=fields.get(b"idem_reset") == b"1",
            error=_text(fields, "error"),
        )

    @property
    def cancelled(self) -> bool:
        return self.cancelled_at is not None

    def idempotency_key_live(self, now: datetime) -> bool:
        """The snapshot still holds its idempotency key (set, not reset, not expired)."""
        if not self.snapshot.options.idempotency_key or self.idempotency_key_reset:
            return False
        expires = self.idempotency_key_expires_at
        return expires is None or expires > now

    def run_input(self, now: datetime) -> runstore_pb2.RunInput:
        """The snapshot with every change made while buffered: what the drainer writes. A reset
        or expired idempotency key is left out, so the key is free for a fresh run."""
        run = runstore_pb2.RunInput()
        run.CopyFrom(self.snapshot)
        run.run_id = self.run_id
        options = run.options
        for tag in self.added_tags:
            if tag not in options.tags:
                options.tags.append(tag)
        if self.metadata is not None:
            options.metadata, options.metadata_type = self.metadata
        if self.delay_until is not None:
            options.delay_until.FromDatetime(self.delay_until)
        if not self.idempotency_key_live(now):
            options.ClearField("idempotency_key")
            options.ClearField("idempotency_key_ttl")
        return run

    def to_run(self, now: datetime) -> common_pb2.Run:
        """The run as callers see it while it waits: QUEUED (CANCELED once cancelled), buffered."""
        source = self.run_input(now)
        options = source.options
        run = common_pb2.Run(
            id=body_of(self.run_id),
            friendly_id=self.run_id,
            residency=residency_to_proto(residency_of(self.run_id)),
            environment_id=source.environment_id,
            organization_id=source.organization_id,
            project_id=source.project_id,
            task_identifier=source.task_identifier,
            status=common_pb2.RUN_STATUS_CANCELED
            if self.cancelled
            else common_pb2.RUN_STATUS_QUEUED,
            payload=source.payload,
            payload_type=source.payload_type,
            metadata=options.metadata,
            metadata_type=options.metadata_type,
            tags=list(options.tags),
            queue=options.queue or source.default_queue,
            concurrency_key=options.concurrency_key,
            idempotency_key=options.idempotency_key,
            max_attempts=options.max_attempts or source.default_max_attempts,
            machine_preset=options.machine_preset or source.default_machine_preset,
            lock_to_version=options.lock_to_version,
            worker_version=source.worker_version,
            parent_run_id=source.parent_run_id,
            root_run_id=source.root_run_id,
            resume_parent_on_completion=source.resume_parent_on_completion,
            is_test=options.test,
            buffered=True,
        )
        if options.idempotency_key and self.idempotency_key_expires_at is not None:
            run.idempotency_key_expires_at.FromDatetime(self.idempotency_key_expires_at)
        # As the run store decides: a zero TTL option leaves the task's default in place.
        if options.HasField("ttl") and options.ttl.ToMilliseconds() > 0:
            run.ttl.CopyFrom(options.ttl)
        elif source.HasField("default_ttl"):
            run.ttl.CopyFrom(source.default_ttl)
        if options.HasField("delay_until"):
            run.delay_until.CopyFrom(options.delay_until)
        if options.HasField("priority"):
            run.priority.CopyFrom(options.priority)
        if self.created_at is not None:
            run.created_at.FromDatetime(self.created_at)
            run.updated_at.FromDatetime(self.created_at)
        if self.cancelled_at is not None:
            run.completed_at.FromDatetime(self.cancelled_at)
            run.error.code = "TASK_RUN_CANCELLED"
            run.error.message = self.cancel_reason
        return run


def queued_entry(
    snapshot: runstore_pb2.RunInput,
    created_at: datetime,
    idempotency_key_expires_at: datetime | None,
) -> BufferedEntry:
    """The entry `MollifierBuffer.accept` just wrote, built locally: the synthesized QUEUED run
    of a buffered trigger without reading it back."""
    key_expires = idempotency_key_expires_at if snapshot.options.idempotency_key else None
    return BufferedEntry(
        run_id=snapshot.run_id,
        environment_id=snapshot.environment_id,
        organization_id=snapshot.organization_id,
        snapshot=snapshot,
        status=EntryStatus.QUEUED,
        created_at=created_at,
        attempts=0,
        draining_since=None,
        owner="",
        idempotency_key_expires_at=key_expires,
        added_tags=(),
        metadata=None,
        delay_until=None,
        cancelled_at=None,
        cancel_reason="",
        idempotency_key_reset=False,
        error="",
    )
