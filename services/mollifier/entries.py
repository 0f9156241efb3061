"""What a buffered run is in Redis: its trigger snapshot (`runops.runstore.v1.RunInput` bytes,
with the real pre-minted run id) and bookkeeping fields of the entry's hash, and how it reads
back as a `Run` (buffered = true) or as the RunInput the drainer writes.

Mutations made while buffered are kept beside the snapshot (added tags, metadata, delay,
cancellation, a reset idempotency key) and applied when read. Times are integer milliseconds
since the epoch; one that does not parse, or lies outside 0001..9999, reads as absent.
"""

from __future__ import annotations

import enum
import functools
import json
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError

from runops.common.v1 import common_pb2
from runops.kit import wire
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


# RunInput.created_at and Timestamp's seconds and nanos on the wire.
_CREATED_AT_TAG = wire.tag(runstore_pb2.RunInput.CREATED_AT_FIELD_NUMBER, wire.LENGTH_DELIMITED)
_SECONDS_TAG = wire.tag(timestamp_pb2.Timestamp.SECONDS_FIELD_NUMBER, wire.VARINT)
_NANOS_TAG = wire.tag(timestamp_pb2.Timestamp.NANOS_FIELD_NUMBER, wire.VARINT)


# Timestamp.nanos of each whole millisecond, and the seconds of recent times (a drain's entries
# share few seconds), in wire form: the creation time of an entry costs two lookups.
_NANOS_PARTS = tuple(_NANOS_TAG + wire.varint(millis * 1_000_000) for millis in range(1000))


@functools.lru_cache(maxsize=4096)
def _seconds_part(seconds: int) -> bytes:
    return _SECONDS_TAG + wire.varint(seconds)


def created_at_field(ms: int) -> bytes:
    """`RunInput.created_at = ms` (non-negative) in wire form, to append to a serialized
    RunInput: both parts are written even when zero, so it replaces whatever the snapshot
    held (a later occurrence wins on parse)."""
    seconds, millis = divmod(ms, 1000)
    return wire.length_delimited(_CREATED_AT_TAG, _seconds_part(seconds) + _NANOS_PARTS[millis])


def pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """HGETALL as a Lua script returns it (a flat list) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


# The fields of an entry's hash a drainer reads, in the order `pop.lua` answers them.
POP_FIELDS = (
    "id", "input", "org", "env", "status", "created_at", "attempts", "draining_since", "owner",
    "idem_expires_at", "tags", "metadata", "metadata_type", "delay_until", "cancelled_at",
    "cancel_reason", "idem_reset", "error",
)  # fmt: skip
_ID, _INPUT, _ENV, _CREATED_AT, _ATTEMPTS, _KEY_EXPIRES = (
    POP_FIELDS.index(name)
    for name in ("id", "input", "env", "created_at", "attempts", "idem_expires_at")
)
# Written only by a change made while buffered (`mutate.lua`, `reset_key.lua`): an entry with
# none of them drains as its snapshot bytes as accepted.
_CHANGE_FIELDS = ("tags", "metadata_type", "delay_until", "cancelled_at", "idem_reset")
_changes = operator.itemgetter(*(POP_FIELDS.index(name) for name in _CHANGE_FIELDS))


class PoppedEntry:
    """An entry as `MollifierBuffer.pop` took it (DRAINING): its hash's fields in POP_FIELDS
    order (None when absent), decoded only as far as the drainer needs. `entry` decodes the
    whole of it (a changed entry, an entry out of attempts, tests)."""

    __slots__ = ("_entry", "attempts", "environment_id", "run_id", "values")

    def __init__(self, values: list[bytes | None]) -> None:
        self.values = values
        raw_id, raw_env, raw_attempts = values[_ID], values[_ENV], values[_ATTEMPTS]
        self.run_id = raw_id.decode(errors="replace") if raw_id else ""
        self.environment_id = raw_env.decode(errors="replace") if raw_env else ""
        try:
            self.attempts = int(raw_attempts or 0)
        except ValueError:
            self.attempts = 0
        self._entry: BufferedEntry | bool | None = False

    @property
    def readable(self) -> bool:
        """It has a run id and a snapshot (what `BufferedEntry.from_fields` needs first)."""
        return bool(self.run_id) and self.values[_INPUT] is not None

    @property
    def entry(self) -> BufferedEntry | None:
        """The whole entry, decoded once (None when it is not readable)."""
        if self._entry is False:
            self._entry = BufferedEntry.from_fields(
                {
                    name.encode(): value
                    for name, value in zip(POP_FIELDS, self.values, strict=True)
                    if value is not None
                }
            )
        assert self._entry is not True
        return self._entry

    @property
    def created_at(self) -> datetime | None:
        return parse_ms(self.values[_CREATED_AT])

    # What the bookkeeping fields read (tests, logs); the drainer itself needs none of them.
    @property
    def status(self) -> EntryStatus | None:
        entry = self.entry
        return entry.status if entry is not None else None

    @property
    def owner(self) -> str:
        entry = self.entry
        return entry.owner if entry is not None else ""

    @property
    def draining_since(self) -> datetime | None:
        entry = self.entry
        return entry.draining_since if entry is not None else None

    @property
    def error(self) -> str:
        entry = self.entry
        return entry.error if entry is not None else ""

    def unchanged_wire(self, now_ms: int) -> bytes | None:
        """What the drainer writes for an entry nothing changed while buffered, without decoding
        it: the snapshot bytes as accepted (they hold the run id) with the creation time its
        caller was shown appended: the same RunInput `BufferedEntry.run_input` and the writer
        would build. None when that needs the decoded entry: a change made while buffered, an
        idempotency key expiry that passed or does not read, a creation time that does not."""
        values = self.values
        snapshot = values[_INPUT]
        if snapshot is None or _changes(values).count(None) != len(_CHANGE_FIELDS):
            return None
        expires = values[_KEY_EXPIRES]
        if expires is not None and not (expires.isdigit() and now_ms < int(expires) <= _MAX_MS):
            return None
        created = values[_CREATED_AT]
        if created is None or not created.isdigit() or int(created) > _MAX_MS:
            return None
        return snapshot + created_at_field(int(created))


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
