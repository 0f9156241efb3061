"""Request validation: every field checked, every violation named in one INVALID_ARGUMENT; valid
requests come back as the data layer's rows (ids as bodies)."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Any

from google.protobuf import timestamp_pb2

from runops.common.v1 import common_pb2
from runops.kit import limits
from runops.kit.ids import BATCH, ENVIRONMENT, ORGANIZATION, PROJECT, RUN, WAITPOINT
from runops.kit.limits import (
    DEFAULT_IDEMPOTENCY_KEY_TTL,
    DEFAULT_PAGE_SIZE,
    EPOCH,
    ID_LIMIT,
    IDEMPOTENCY_KEY_LIMIT,
    MAX_ATTEMPTS,
    MAX_INDEX,
    MAX_ITEMS_PER_CALL,
    MAX_MISSING_RANGES,
    MAX_PAGE_SIZE,
    MAX_RUN_COUNT,
    MAX_RUNS_PER_CALL,
    TASK_IDENTIFIER_LIMIT,
    TEXT_LIMIT,
    Violations,
)
from runops.kit.replica import Consistency
from runops.runstore.v1 import runstore_pb2 as rs
from services.runstore.columns import FIELDS, NO_RUN, ItemChunk, RunChunk
from services.runstore.rows import BatchRow, ItemKinds, ItemRow, RunRow

ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
ERROR_CODE_TEXT = "an error code: 1-64 of A-Z, 0-9 and _, starting with a letter"

_CONSISTENCY: dict[int, Consistency] = {
    common_pb2.CONSISTENCY_LEVEL_UNSPECIFIED: Consistency.REPLICA,
    common_pb2.CONSISTENCY_LEVEL_REPLICA: Consistency.REPLICA,
    common_pb2.CONSISTENCY_LEVEL_READ_YOUR_WRITES: Consistency.WRITER,
}


def _optional_id(v: Violations, value: str, field: str, prefix: str) -> str | None:
    return limits.id_body(v, value, field, prefix, required=False) or None


def consistency(v: Violations, value: int, field: str = "consistency") -> Consistency:
    if value not in _CONSISTENCY:
        v.add(field, f"must be a ConsistencyLevel (got {value})")
        return Consistency.REPLICA
    return _CONSISTENCY[value]


def environment(v: Violations, value: str, field: str = "environment_id") -> str:
    v.friendly_id(value, field, ENVIRONMENT)
    return value


def run_id(v: Violations, value: str, field: str = "run_id") -> str:
    """A run's friendly id or internal id (its body)."""
    return limits.id_body(v, value, field, RUN, bare=True)


def batch_id(v: Violations, value: str, field: str = "batch_id") -> str:
    return limits.id_body(v, value, field, BATCH, bare=True)


def waitpoint_id(v: Violations, value: str, field: str = "waitpoint_id") -> str:
    return limits.id_body(v, value, field, WAITPOINT, bare=True)


def run_error(v: Violations, error: common_pb2.RunError, field: str) -> None:
    if v.require(error.code, f"{field}.code"):
        v.matches(error.code, f"{field}.code", ERROR_CODE, ERROR_CODE_TEXT)


def _duration_ms(value: object) -> int:
    return int(value.ToMilliseconds())  # type: ignore[attr-defined]


def _when(ts: timestamp_pb2.Timestamp) -> datetime:
    """`ts.ToDatetime(tzinfo=UTC)` without its conversions (it runs per row): the same instant,
    tz UTC, microseconds rounded down (a Timestamp's nanos are never negative: the kit's
    request check refuses one that is)."""
    return EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


def run_input(
    v: Violations,
    run: rs.RunInput,
    field: str,
    *,
    in_batch: bool = False,
    mint: Callable[[], str] | None = None,
) -> RunRow | None:
    """The row for a RunInput. `in_batch`: environment, organization and project come from the
    batch (they may be left empty). `mint`: the id of a run that names none (else "", minted
    later by the router)."""
    body = _check_run_input(v, run, field, in_batch=in_batch)
    if v:
        return None
    return _run_row(run, body or (mint() if mint is not None else ""))


def _plain_run_row(
    run: rs.RunInput, *, in_batch: bool = False, mint: Callable[[], str] | None = None
) -> RunRow | None:
    """The fast path of `run_input` for the common run (not failed):
    its row when every check passes, else None, and then `run_input` checks it field by field
    (so a violation is found, worded and named in one place only)."""
    if not _plainly_valid(run, in_batch):
        return None
    body = run.run_id.removeprefix(RUN + "_")
    return _run_row(run, body or (mint() if mint is not None else ""))


def _plainly_valid(run: rs.RunInput, in_batch: bool) -> bool:
    """True only if `_check_run_input` would find nothing; no field path is built. The same
    rules, each in its fast form: limits' `trigger_options_fit`, cached id and task checks
    (the values repeat within a chunk). A failed run takes the slow path."""
    default_ttl = run.default_ttl
    return (
        (not run.run_id or _is_id(run.run_id, RUN))
        and (
            (in_batch and not run.environment_id)
            or _is_friendly_id(run.environment_id, ENVIRONMENT)
        )
        and (
            (in_batch and not run.organization_id)
            or _is_friendly_id(run.organization_id, ORGANIZATION)
        )
        and ((in_batch and not run.project_id) or _is_friendly_id(run.project_id, PROJECT))
        and _is_task_identifier(run.task_identifier)
        and (not run.parent_run_id or _is_id(run.parent_run_id, RUN))
        and (not run.root_run_id or _is_id(run.root_run_id, RUN))
        and limits.trigger_options_fit(run.options)
        and len(run.payload_type) <= TEXT_LIMIT
        and len(run.worker_version) <= TEXT_LIMIT
        and len(run.default_queue) <= TEXT_LIMIT
        and len(run.default_machine_preset) <= TEXT_LIMIT
        and default_ttl.seconds >= 0
        and default_ttl.nanos >= 0
        and run.default_max_attempts <= MAX_ATTEMPTS
        and run.WhichOneof("final_state") != "failed"
    )


# The pure checks whose values repeat across a chunk's rows, cached. Only values short enough
# to pass are looked up (ids at most ID_LIMIT characters, task identifiers
# TASK_IDENTIFIER_LIMIT), so the caches hold at most ~1 MiB whatever callers send.
def _is_id(value: str, prefix: str) -> bool:
    """What `_optional_id` accepts of a non-empty value (a `<prefix>_<body>` id, not bare)."""
    return len(value) <= ID_LIMIT and _cached_is_id(value, prefix)


def _is_friendly_id(value: str, prefix: str) -> bool:
    return len(value) <= ID_LIMIT and _cached_is_friendly_id(value, prefix)


def _is_task_identifier(value: str) -> bool:
    return len(value) <= TASK_IDENTIFIER_LIMIT and _cached_is_task_identifier(value)


@functools.lru_cache(maxsize=4096)
def _cached_is_id(value: str, prefix: str) -> bool:
    return bool(limits.id_body(Violations(), value, "", prefix))


@functools.lru_cache(maxsize=4096)
def _cached_is_friendly_id(value: str, prefix: str) -> bool:
    return Violations().friendly_id(value, "", prefix)


@functools.lru_cache(maxsize=4096)
def _cached_is_task_identifier(value: str) -> bool:
    return limits.task_identifier(Violations(), value, "")


def _check_run_input(v: Violations, run: rs.RunInput, field: str, *, in_batch: bool) -> str:
    """Every check of a RunInput, each violation named under `field`; the run id's body."""
    body = _optional_id(v, run.run_id, f"{field}.run_id", RUN)
    if not in_batch or run.environment_id:
        environment(v, run.environment_id, f"{field}.environment_id")
    if not in_batch or run.organization_id:
        v.friendly_id(run.organization_id, f"{field}.organization_id", ORGANIZATION)
    if not in_batch or run.project_id:
        v.friendly_id(run.project_id, f"{field}.project_id", PROJECT)
    limits.task_identifier(v, run.task_identifier, f"{field}.task_identifier")
    _optional_id(v, run.parent_run_id, f"{field}.parent_run_id", RUN)
    _optional_id(v, run.root_run_id, f"{field}.root_run_id", RUN)
    limits.trigger_options(v, run.options, f"{field}.options")
    for name in ("payload_type", "worker_version", "default_queue", "default_machine_preset"):
        v.max_length(getattr(run, name), f"{field}.{name}", TEXT_LIMIT)
    if limits.negative(run.default_ttl):
        v.add(f"{field}.default_ttl", "must not be negative")
    limits.max_attempts(v, run.default_max_attempts, f"{field}.default_max_attempts")
    if run.WhichOneof("final_state") == "failed":
        run_error(v, run.failed, f"{field}.failed")
    return body or ""


# RunRow.options when the run has none of the trigger options no column holds (most runs).
_NO_EXTRA_OPTIONS = json.dumps({})


def _run_row(run: rs.RunInput, body: str) -> RunRow:
    """The row of a checked RunInput whose id body is `body`."""
    options = run.options
    created_at = _when(run.created_at) if run.HasField("created_at") else None
    key = options.idempotency_key or None
    expires_at = None
    if key is not None:
        ttl = (
            timedelta(milliseconds=_duration_ms(options.idempotency_key_ttl))
            if options.HasField("idempotency_key_ttl")
            else DEFAULT_IDEMPOTENCY_KEY_TTL
        )
        expires_at = (created_at or datetime.now(UTC)) + ttl
    delay_until = _when(options.delay_until) if options.HasField("delay_until") else None
    ttl_ms = (
        _duration_ms(options.ttl)
        if options.HasField("ttl") and _duration_ms(options.ttl) > 0
        else _duration_ms(run.default_ttl)
        if run.HasField("default_ttl")
        else None
    )
    extra: dict[str, object] = {}
    if options.HasField("debounce"):
        extra["debounce"] = {
            "key": options.debounce.key,
            "delay_ms": _duration_ms(options.debounce.delay),
        }
    if options.one_time_use_token:
        extra["one_time_use_token"] = options.one_time_use_token
    row = RunRow(
        id=body,
        environment_id=run.environment_id,
        organization_id=run.organization_id,
        project_id=run.project_id,
        task_identifier=run.task_identifier,
        status="DELAYED" if delay_until and delay_until > datetime.now(UTC) else "PENDING",
        payload=run.payload,
        payload_type=run.payload_type,
        metadata=options.metadata,
        metadata_type=options.metadata_type,
        tags=tuple(dict.fromkeys(options.tags)) if options.tags else (),
        queue=options.queue or run.default_queue,
        concurrency_key=options.concurrency_key,
        idempotency_key=key,
        idempotency_key_expires_at=expires_at,
        ttl_ms=ttl_ms,
        delay_until=delay_until,
        max_attempts=options.max_attempts or run.default_max_attempts,
        machine_preset=options.machine_preset or run.default_machine_preset,
        lock_to_version=options.lock_to_version,
        worker_version=run.worker_version,
        priority_ms=_duration_ms(options.priority) if options.HasField("priority") else 0,
        is_test=options.test,
        options=json.dumps(extra) if extra else _NO_EXTRA_OPTIONS,
        parent_run_id=run.parent_run_id or None,
        root_run_id=run.root_run_id or None,
        resume_parent_on_completion=run.resume_parent_on_completion,
        created_at=created_at,
    )
    state = run.WhichOneof("final_state")
    if state == "failed":
        return row.failed(run.failed.code, run.failed.message)
    if state == "cancelled":
        return row.cancelled(run.cancelled.reason)
    return row


def create_run(run: rs.RunInput) -> RunRow:
    v = Violations()
    row = run_input(v, run, "run")
    v.raise_if_any()
    assert row is not None
    return row


def create_runs(request: rs.CreateRunsRequest, mint: Callable[[], str] | None = None) -> RunChunk:
    """The runs as columns, ids minted with `mint` where a run names none."""
    v = Violations()
    if request.HasField("columns"):
        if request.runs:
            v.add("runs", "must be empty when columns are given")
        chunk = run_columns(v, request.columns, "columns", in_batch=False, mint=mint)
        v.raise_if_any()
        assert chunk is not None
        return chunk
    runs = request.runs
    if not runs:
        v.add("runs", "is required")
    elif len(runs) > MAX_RUNS_PER_CALL:
        v.add("runs", f"must hold at most {MAX_RUNS_PER_CALL} runs (got {len(runs)})")
    chunk = None if v else _plain_chunk(runs, in_batch=False, mint=mint)
    if chunk is None:
        rows = [
            _plain_run_row(run, mint=mint) or run_input(v, run, f"runs[{i}]", mint=mint)
            for i, run in enumerate(runs)
        ]
        v.raise_if_any()
        chunk = RunChunk.from_rows([row for row in rows if row is not None])
    return chunk


def _plain_chunk(
    runs: Sequence[rs.RunInput], *, in_batch: bool, mint: Callable[[], str] | None
) -> RunChunk | None:
    """The fast path of a chunk of rows: see `_checked_chunk`."""
    runs = list(runs)
    inputs: dict[str, list[Any]] = {
        name: list(map(attrgetter(name), runs)) for name in _INPUT_COLUMNS
    }
    inputs["created_at"] = [
        _when(run.created_at) if run.HasField("created_at") else None for run in runs
    ]
    ttls = [run.default_ttl if run.HasField("default_ttl") else None for run in runs]
    if ttls.count(None) != len(ttls):
        if any(ttl is not None and limits.negative(ttl) for ttl in ttls):
            return None
        inputs["ttl_ms"] = [None if ttl is None else _duration_ms(ttl) for ttl in ttls]
    # Empty options are no options (every option falls back to the run's defaults).
    rich = {
        k: run
        for k, run in enumerate(runs)
        if (run.HasField("options") and run.options.ByteSize()) or run.WhichOneof("final_state")
    }
    return _checked_chunk(inputs, len(runs), rich, in_batch=in_batch, mint=mint)


# RunInput's fields a chunk takes as columns (the rest: `rich` runs, one by one).
_INPUT_COLUMNS = (
    "run_id",
    "environment_id",
    "organization_id",
    "project_id",
    "task_identifier",
    "payload",
    "payload_type",
    "parent_run_id",
    "root_run_id",
    "resume_parent_on_completion",
    "worker_version",
    "default_max_attempts",
    "default_queue",
    "default_machine_preset",
)


def _checked_chunk(
    inputs: dict[str, list[Any]],
    count: int,
    rich: dict[int, rs.RunInput],
    *,
    in_batch: bool,
    mint: Callable[[], str] | None,
) -> RunChunk | None:
    """The fast path of a chunk: its columns when every run passes every check, else None, and
    then the caller checks run by run (so a violation is found, worded and named in one place
    only). `inputs`: RunInput's _INPUT_COLUMNS and created_at (a datetime or None), a list
    each, and ttl_ms (the default TTL's milliseconds or None, not negative) unless no run has
    one; `rich`: the runs with options or a final state, worked out one by one.
    Each column is checked whole, by `_check_run_input`'s rules in their column form (limits'
    `ids_fit`, the cached id and task checks over a column's distinct values)."""
    optional = {""} if in_batch else set()
    if not (
        limits.ids_fit(inputs["run_id"], RUN)
        and limits.ids_fit(inputs["parent_run_id"], RUN)
        and limits.ids_fit(inputs["root_run_id"], RUN)
        and all(
            _is_friendly_id(value, prefix)
            for name, prefix in _OWNER_IDS
            for value in set(inputs[name]) - optional
        )
        and all(map(_is_task_identifier, set(inputs["task_identifier"])))
        and all(
            max(map(len, inputs[name])) <= TEXT_LIMIT
            for name in (
                "payload_type",
                "worker_version",
                "default_queue",
                "default_machine_preset",
            )
        )
        and max(inputs["default_max_attempts"]) <= MAX_ATTEMPTS
    ):
        return None
    ids = [
        run_id.removeprefix(_RUN_PREFIX) or (mint() if mint is not None else "")
        for run_id in inputs["run_id"]
    ]
    parents, roots = inputs["parent_run_id"], inputs["root_run_id"]
    columns: dict[str, list[Any] | None] = {
        "id": ids,
        "environment_id": inputs["environment_id"],
        "organization_id": inputs["organization_id"],
        "project_id": inputs["project_id"],
        "task_identifier": inputs["task_identifier"],
        "payload": inputs["payload"],
        "payload_type": inputs["payload_type"],
        "queue": inputs["default_queue"],
        "max_attempts": inputs["default_max_attempts"],
        "machine_preset": inputs["default_machine_preset"],
        "worker_version": inputs["worker_version"],
        "parent_run_id": None if parents.count("") == count else [p or None for p in parents],
        "root_run_id": None if roots.count("") == count else [r or None for r in roots],
        "resume_parent_on_completion": inputs["resume_parent_on_completion"],
        "created_at": inputs["created_at"],
        "ttl_ms": inputs.get("ttl_ms"),
    }
    chunk = RunChunk(count, {name: columns.get(name) for name in FIELDS})
    for k, run in rich.items():
        row = _rich_row(run, ids[k], in_batch)
        if row is None:
            return None
        chunk.put_row(k, row)
    return chunk


def run_columns(
    v: Violations,
    columns: rs.RunColumns,
    field: str,
    *,
    in_batch: bool,
    mint: Callable[[], str] | None,
    count: int | None = None,
    linked: Collection[int] = (),
) -> RunChunk | None:
    """The chunk of a RunColumns (`count`: the runs it must hold, if the caller knows; `linked`:
    positions whose runs are neither checked nor written, left as defaults). Its shape first
    (how many entries each column holds); then the fast path on whole columns, and when that
    refuses, every run checked as the RunInput it stands for, named `<field>[i]`."""
    if count is not None and columns.count != count:
        v.add(f"{field}.count", f"must be {count}, one run per item (got {columns.count})")
        return None
    count = columns.count
    if not 1 <= count <= MAX_RUNS_PER_CALL:
        v.add(f"{field}.count", f"must be between 1 and {MAX_RUNS_PER_CALL} (got {count})")
        return None
    for name in (*_INPUT_COLUMNS, "default_ttl_ms", "created_at_us"):
        held = len(getattr(columns, name))
        if held not in (0, 1, count):
            v.add(f"{field}.{name}", f"must hold 0, 1 or count ({count}) entries (got {held})")
    for name in ("options", "failed", "cancelled"):
        beyond = [k for k in getattr(columns, name) if k >= count]
        if beyond:
            v.add(f"{field}.{name}", f"holds positions beyond count {count} ({min(beyond)})")
    created = _column(columns.created_at_us, count, 0)
    if created is not None and not _EARLIEST_US <= min(created) <= max(created) <= _LATEST_US:
        v.add(f"{field}.created_at_us", "must be between 0001-01-01 and 9999-12-31")
    ttls = _column(columns.default_ttl_ms, count, 0)
    if ttls is not None and max(map(abs, ttls)) > _LONGEST_MS:
        v.add(f"{field}.default_ttl_ms", "must be within ±10,000 years")
    if v:
        return None
    inputs: dict[str, list[Any]] = {
        name: _column(getattr(columns, name), count, _INPUT_DEFAULTS[name])
        or [_INPUT_DEFAULTS[name]] * count
        for name in _INPUT_COLUMNS
    }
    inputs["created_at"] = (
        [None] * count
        if created is None
        else [EPOCH + timedelta(microseconds=us) if us else None for us in created]
    )
    rich_positions = {*columns.options, *columns.failed, *columns.cancelled}
    if ttls is not None:
        inputs["ttl_ms"] = [ms or None for ms in ttls]
        # A negative one is refused run by run (the slow path names it).
        rich_positions.update(k for k, ms in enumerate(ttls) if ms < 0)
    for k in linked:
        for name in (*_INPUT_COLUMNS, "created_at"):
            inputs[name][k] = getattr(_LINKED, name) if name != "created_at" else None
    rich_positions.difference_update(linked)
    rich = {k: column_run(columns, k) for k in sorted(rich_positions)}
    chunk = _checked_chunk(inputs, count, rich, in_batch=in_batch, mint=mint)
    if chunk is not None:
        return chunk
    rows = [
        NO_RUN
        if k in linked
        else run_input(v, column_run(columns, k), f"{field}[{k}]", in_batch=in_batch, mint=mint)
        for k in range(count)
    ]
    return None if v else RunChunk.from_rows([row for row in rows if row is not None])


def _column(values: Sequence[Any], count: int, default: Any) -> list[Any] | None:
    """A column of `count` values (one entry: every run's), None when it holds none."""
    if not values:
        return None
    if len(values) == 1:
        return [values[0]] * count
    return list(values)


def column_run(columns: rs.RunColumns, k: int) -> rs.RunInput:
    """Run k of `columns` as the RunInput it stands for."""
    run = rs.RunInput()
    for name in _INPUT_COLUMNS:
        values = getattr(columns, name)
        if values:
            setattr(run, name, values[0 if len(values) == 1 else k])
    if columns.default_ttl_ms:
        ms = columns.default_ttl_ms[0 if len(columns.default_ttl_ms) == 1 else k]
        if ms:
            run.default_ttl.FromMilliseconds(ms)
    if columns.created_at_us:
        us = columns.created_at_us[0 if len(columns.created_at_us) == 1 else k]
        if us:
            run.created_at.FromMicroseconds(us)
    if k in columns.options:
        run.options.CopyFrom(columns.options[k])
    if k in columns.failed:
        run.failed.CopyFrom(columns.failed[k])
    elif k in columns.cancelled:
        run.cancelled.CopyFrom(columns.cancelled[k])
    return run


# RunInput's defaults of the _INPUT_COLUMNS (a column given empty).
_INPUT_DEFAULTS: dict[str, Any] = {name: getattr(rs.RunInput(), name) for name in _INPUT_COLUMNS}
# google.protobuf.Timestamp's range in microseconds, Duration's in milliseconds.
_EARLIEST_US = (datetime(1, 1, 1, tzinfo=UTC) - EPOCH) // timedelta(microseconds=1)
_LATEST_US = (datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC) - EPOCH) // timedelta(
    microseconds=1
)
_LONGEST_MS = 315_576_000_000_000


# The owner ids of a run (left empty in a batch: the batch's), with their prefixes.
_OWNER_IDS = (
    ("environment_id", ENVIRONMENT),
    ("organization_id", ORGANIZATION),
    ("project_id", PROJECT),
)
_RUN_PREFIX = RUN + "_"


def _rich_row(run: rs.RunInput, body: str, in_batch: bool) -> RunRow | None:
    """The row of a run with options, a default TTL or a final state when it passes every
    check, else None."""
    if run.WhichOneof("final_state") == "failed":
        v = Violations()
        _check_run_input(v, run, "", in_batch=in_batch)
        return None if v else _run_row(run, body)
    return _run_row(run, body) if _plainly_valid(run, in_batch) else None


def create_failed_run(request: rs.CreateFailedRunRequest) -> RunRow:
    v = Violations()
    row = run_input(v, request.run, "run")
    run_error(v, request.error, "error")
    v.raise_if_any()
    assert row is not None
    return row.failed(request.error.code, request.error.message)


def create_cancelled_run(request: rs.CreateCancelledRunRequest) -> RunRow:
    v = Violations()
    row = run_input(v, request.run, "run")
    limits.cancel_reason(v, request.reason)
    v.raise_if_any()
    assert row is not None
    return row.cancelled(request.reason)


@dataclasses.dataclass(frozen=True)
class RunRef:
    run_id: str  # body
    environment_id: str
    consistency: Consistency = Consistency.REPLICA


def _run_ref(v: Violations, run: str, env: str, level: int = 0) -> RunRef:
    return RunRef(run_id(v, run), environment(v, env), consistency(v, level))


def run_ref(run: str, env: str, level: int = 0) -> RunRef:
    v = Violations()
    ref = _run_ref(v, run, env, level)
    v.raise_if_any()
    return ref


@dataclasses.dataclass(frozen=True)
class KeyRef:
    environment_id: str
    task_identifier: str
    idempotency_key: str
    consistency: Consistency = Consistency.REPLICA


def key_ref(env: str, task: str, key: str, level: int = 0) -> KeyRef:
    v = Violations()
    environment(v, env)
    limits.task_identifier(v, task, "task_identifier")
    v.required_text(key, "idempotency_key", IDEMPOTENCY_KEY_LIMIT)
    ref = KeyRef(env, task, key, consistency(v, level))
    v.raise_if_any()
    return ref


def complete_run(request: rs.CompleteRunRequest) -> RunRef:
    v = Violations()
    ref = _run_ref(v, request.run_id, request.environment_id)
    outcome = request.WhichOneof("outcome")
    if outcome is None:
        v.add("outcome", "one of success or failure is required")
    elif outcome == "failure":
        run_error(v, request.failure, "failure")
    else:
        v.max_length(request.success.output_type, "success.output_type", TEXT_LIMIT)
    v.raise_if_any()
    return ref


def add_run_tags(request: rs.AddRunTagsRequest) -> RunRef:
    v = Violations()
    ref = _run_ref(v, request.run_id, request.environment_id)
    if v.require(list(request.tags), "tags"):
        limits.tags(v, request.tags, "tags")
    v.raise_if_any()
    return ref


def update_run_metadata(request: rs.UpdateRunMetadataRequest) -> RunRef:
    v = Violations()
    ref = _run_ref(v, request.run_id, request.environment_id)
    limits.metadata_type(v, request.metadata_type)
    v.raise_if_any()
    return ref


def reschedule_run(request: rs.RescheduleRunRequest) -> tuple[RunRef, datetime]:
    v = Violations()
    ref = _run_ref(v, request.run_id, request.environment_id)
    limits.delay_until(v, request)
    v.raise_if_any()
    return ref, _when(request.delay_until)


def cancel_run(request: rs.CancelRunRequest) -> RunRef:
    v = Violations()
    ref = _run_ref(v, request.run_id, request.environment_id)
    limits.cancel_reason(v, request.reason)
    v.raise_if_any()
    return ref


@dataclasses.dataclass(frozen=True)
class BatchRef:
    batch_id: str  # body
    environment_id: str
    consistency: Consistency = Consistency.REPLICA


def _batch_ref(v: Violations, batch: str, env: str, level: int = 0) -> BatchRef:
    return BatchRef(batch_id(v, batch), environment(v, env), consistency(v, level))


def batch_ref(batch: str, env: str, level: int = 0) -> BatchRef:
    v = Violations()
    ref = _batch_ref(v, batch, env, level)
    v.raise_if_any()
    return ref


def create_batch(request: rs.CreateBatchRequest) -> BatchRow:
    v = Violations()
    body = _optional_id(v, request.batch_id, "batch_id", BATCH)
    environment(v, request.environment_id)
    v.friendly_id(request.organization_id, "organization_id", ORGANIZATION)
    v.friendly_id(request.project_id, "project_id", PROJECT)
    if not 1 <= request.run_count <= MAX_RUN_COUNT:
        v.add("run_count", f"must be between 1 and {MAX_RUN_COUNT} (got {request.run_count})")
    v.max_length(request.idempotency_key, "idempotency_key", IDEMPOTENCY_KEY_LIMIT)
    for i, task in enumerate(request.task_identifiers):
        limits.task_identifier(v, task, f"task_identifiers[{i}]")
    parent = _optional_id(v, request.parent_run_id, "parent_run_id", RUN)
    if request.resume_parent_on_completion and parent is None:
        v.add("parent_run_id", "is required with resume_parent_on_completion")
    v.raise_if_any()
    return BatchRow(
        id=body or "",
        environment_id=request.environment_id,
        organization_id=request.organization_id,
        project_id=request.project_id,
        run_count=request.run_count,
        idempotency_key=request.idempotency_key or None,
        task_identifiers=tuple(request.task_identifiers),
        parent_run_id=request.parent_run_id or None,
        resume_parent_on_completion=request.resume_parent_on_completion,
    )


def accept_batch_items(
    request: rs.AcceptBatchItemsRequest, mint: Callable[[], str] | None = None
) -> tuple[BatchRef, ItemChunk]:
    """The batch and its items, run ids minted with `mint` where a run names none."""
    v = Violations()
    ref = _batch_ref(v, request.batch_id, request.environment_id)
    if request.HasField("item_columns"):
        if request.items:
            v.add("items", "must be empty when item_columns are given")
        columns = item_columns(v, request.item_columns, "item_columns", mint)
        v.raise_if_any()
        assert columns is not None
        return ref, columns
    if not request.items:
        v.add("items", "is required")
    elif len(request.items) > MAX_ITEMS_PER_CALL:
        v.add("items", f"must hold at most {MAX_ITEMS_PER_CALL} items (got {len(request.items)})")
    chunk = _plain_items(request.items, mint) if len(request.items) <= MAX_ITEMS_PER_CALL else None
    if chunk is not None:
        v.raise_if_any()
        return ref, chunk
    items: list[ItemRow] = []
    for i, item in enumerate(request.items[:MAX_ITEMS_PER_CALL]):
        if item.index > MAX_INDEX:
            v.add(f"items[{i}].index", f"must be at most {MAX_INDEX} (got {item.index})")
        if item.existing_run_id:
            field = f"items[{i}].existing_run_id"
            existing = limits.id_body(v, item.existing_run_id, field, RUN)
            items.append(ItemRow(item.index, None, existing or None))
            continue
        row = (
            None
            if item.HasField("pre_failed")
            else _plain_run_row(item.run, in_batch=True, mint=mint)
        )
        if row is None:
            row = _batch_item_row(v, item, f"items[{i}]", mint)
        items.append(ItemRow(item.index, row))
    v.raise_if_any()
    return ref, ItemChunk.from_rows(items)


def _plain_items(
    items: Sequence[rs.BatchItemInput], mint: Callable[[], str] | None
) -> ItemChunk | None:
    """The fast path of `accept_batch_items`' items (see `_plain_chunk`): None when any item
    fails a check. A linked item's run is neither checked nor written; a pre-failed item's is
    worked out on its own."""
    indexes = [item.index for item in items]
    links = [item.existing_run_id for item in items]
    if not indexes or max(indexes) > MAX_INDEX or not limits.ids_fit(links, RUN):
        return None
    linked = links.count("") != len(links)
    runs = [_LINKED if link else item.run for item, link in zip(items, links, strict=True)]
    chunk = _plain_chunk(runs, in_batch=True, mint=mint)
    if chunk is None:
        return None
    for k, item in enumerate(items):
        if links[k]:
            chunk.put_row(k, NO_RUN)
        elif item.HasField("pre_failed"):
            v = Violations()
            run_error(v, item.pre_failed, "")
            row = chunk.row(k)
            if v:
                return None
            chunk.put_row(k, row.failed(item.pre_failed.code, item.pre_failed.message))
    if not linked:
        return ItemChunk(indexes, chunk)
    bodies = [link.removeprefix(_RUN_PREFIX) or None for link in links]
    return ItemChunk(indexes, chunk, bodies, [False] * len(links))


def item_columns(
    v: Violations, columns: rs.BatchItemColumns, field: str, mint: Callable[[], str] | None
) -> ItemChunk | None:
    """The chunk of a BatchItemColumns, violations named under `field`."""
    indexes = list(columns.index)
    count = len(indexes)
    if not v.require(indexes, f"{field}.index"):
        return None
    if count > MAX_ITEMS_PER_CALL:
        v.add(f"{field}.index", f"must hold at most {MAX_ITEMS_PER_CALL} items (got {count})")
        return None
    if max(indexes) > MAX_INDEX:
        for k, index in enumerate(indexes):
            if index > MAX_INDEX:
                v.add(f"{field}.index[{k}]", f"must be at most {MAX_INDEX} (got {index})")
    links: dict[int, str] = {}
    for k, run_id in sorted(columns.existing_run_id.items()):
        if k >= count:
            v.add(f"{field}.existing_run_id", f"holds positions beyond the {count} items ({k})")
            break
        body = limits.id_body(v, run_id, f"{field}.existing_run_id[{k}]", RUN)
        if body:
            links[k] = body
    for k, error in sorted(columns.pre_failed.items()):
        if k >= count:
            v.add(f"{field}.pre_failed", f"holds positions beyond the {count} items ({k})")
            break
        run_error(v, error, f"{field}.pre_failed[{k}]")
    runs = run_columns(
        v, columns.runs, f"{field}.runs", in_batch=True, mint=mint, count=count, linked=links
    )
    if v or runs is None:
        return None
    for k in links:
        runs.put_row(k, NO_RUN)
    for k, error in columns.pre_failed.items():
        if k not in links:
            runs.put_row(k, runs.row(k).failed(error.code, error.message))
    if not links:
        return ItemChunk(indexes, runs)
    bodies = [links.get(k) for k in range(count)]
    return ItemChunk(indexes, runs, bodies, [False] * count)


# Stands in for a linked item's run in the checks (it is neither checked nor written).
_LINKED = rs.RunInput(task_identifier="linked")


def _batch_item_row(
    v: Violations, item: rs.BatchItemInput, field: str, mint: Callable[[], str] | None
) -> RunRow | None:
    """The run of an item checked field by field (pre-failed: written failed)."""
    row = run_input(v, item.run, f"{field}.run", in_batch=True, mint=mint)
    if item.HasField("pre_failed"):
        run_error(v, item.pre_failed, f"{field}.pre_failed")
        if row is not None:
            row = row.failed(item.pre_failed.code, item.pre_failed.message)
    return row


def _page(v: Violations, page_size: int, page_token: str) -> tuple[int, int]:
    """The index a page starts after (-1: the first page) and the page size."""
    if page_size > MAX_PAGE_SIZE:
        v.add("page_size", f"must be at most {MAX_PAGE_SIZE} (got {page_size})")
    after = -1
    if page_token:
        if page_token.isdigit() and int(page_token) <= MAX_INDEX:
            after = int(page_token)
        else:
            v.add("page_token", "must be a next_page_token of an earlier answer")
    return after, page_size or DEFAULT_PAGE_SIZE


def list_batch_runs(request: rs.ListBatchRunsRequest) -> tuple[BatchRef, int, int]:
    """The batch, the index the page starts after (-1: the first page) and the page size."""
    v = Violations()
    ref = _batch_ref(v, request.batch_id, request.environment_id, request.consistency)
    after, limit = _page(v, request.page_size, request.page_token)
    v.raise_if_any()
    return ref, after, limit


_ITEM_FILTERS: dict[int, ItemKinds] = {
    rs.BATCH_ITEM_FILTER_UNSPECIFIED: ItemKinds(),
    rs.BATCH_ITEM_FILTER_PRE_FAILED_OR_LINKED: ItemKinds(created=False),
    rs.BATCH_ITEM_FILTER_PRE_FAILED: ItemKinds(linked=False, created=False),
    rs.BATCH_ITEM_FILTER_LINKED: ItemKinds(pre_failed=False, created=False),
}


def list_batch_items(request: rs.ListBatchItemsRequest) -> tuple[BatchRef, ItemKinds, int, int]:
    """The batch, which items, the index the page starts after and the page size."""
    v = Violations()
    ref = _batch_ref(v, request.batch_id, request.environment_id, request.consistency)
    kinds = _ITEM_FILTERS.get(request.filter, ItemKinds())
    if request.filter not in _ITEM_FILTERS:
        v.add("filter", f"must be a BatchItemFilter (got {request.filter})")
    after, limit = _page(v, request.page_size, request.page_token)
    v.raise_if_any()
    return ref, kinds, after, limit


def missing_ranges(request: rs.GetBatchMissingRangesRequest) -> tuple[BatchRef, int]:
    v = Violations()
    ref = _batch_ref(v, request.batch_id, request.environment_id, request.consistency)
    if request.max_ranges > MAX_MISSING_RANGES:
        v.add("max_ranges", f"must be at most {MAX_MISSING_RANGES} (got {request.max_ranges})")
    v.raise_if_any()
    return ref, request.max_ranges or MAX_MISSING_RANGES


def waitpoint_ref(request: rs.GetWaitpointRequest) -> tuple[str, str, Consistency]:
    v = Violations()
    body = waitpoint_id(v, request.waitpoint_id)
    environment(v, request.environment_id)
    level = consistency(v, request.consistency)
    v.raise_if_any()
    return body, request.environment_id, level
