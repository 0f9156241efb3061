"""Request validation: every field checked, every violation named in one INVALID_ARGUMENT; valid
requests come back as the data layer's rows (ids as bodies)."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

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
    MAX_RUN_IDS_PER_CALL,
    MAX_RUNS_PER_CALL,
    TASK_IDENTIFIER_LIMIT,
    TEXT_LIMIT,
    Violations,
)
from runops.kit.replica import Consistency
from runops.runstore.v1 import runstore_pb2 as rs
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


def create_runs(
    request: rs.CreateRunsRequest, mint: Callable[[], str] | None = None
) -> list[RunRow]:
    """The rows, ids minted with `mint` where a run names none."""
    v = Violations()
    if v.require(list(request.runs), "runs") and len(request.runs) > MAX_RUNS_PER_CALL:
        v.add("runs", f"must hold at most {MAX_RUNS_PER_CALL} runs (got {len(request.runs)})")
    rows = [
        _plain_run_row(run, mint=mint) or run_input(v, run, f"runs[{i}]", mint=mint)
        for i, run in enumerate(request.runs)
    ]
    v.raise_if_any()
    return [row for row in rows if row is not None]


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
class RunsRef:
    run_ids: list[str]  # bodies, in request order (repeats kept)
    environment_id: str
    consistency: Consistency = Consistency.REPLICA


def get_runs(request: rs.GetRunsRequest) -> RunsRef:
    v = Violations()
    ids = request.run_ids
    if v.require(list(ids), "run_ids") and len(ids) > MAX_RUN_IDS_PER_CALL:
        v.add("run_ids", f"must hold at most {MAX_RUN_IDS_PER_CALL} ids (got {len(ids)})")
    # Past the cap the call is refused anyway: the ids beyond it are not looked at.
    bodies = limits.id_bodies(v, ids[:MAX_RUN_IDS_PER_CALL], "run_ids", RUN, bare=True)
    ref = RunsRef(
        bodies, environment(v, request.environment_id), consistency(v, request.consistency)
    )
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
) -> tuple[BatchRef, list[ItemRow]]:
    """The batch and its items, run ids minted with `mint` where a run names none."""
    v = Violations()
    ref = _batch_ref(v, request.batch_id, request.environment_id)
    if v.require(list(request.items), "items") and len(request.items) > MAX_ITEMS_PER_CALL:
        v.add("items", f"must hold at most {MAX_ITEMS_PER_CALL} items (got {len(request.items)})")
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
    return ref, items


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
