"""Request checks of the ingest RPCs, each collecting every violation (INVALID_ARGUMENT naming
the fields). An item's fields are named by its batch index, `items[<index>].…`, whatever chunk
carried it: the index is what the client knows the item by."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from runops.ingest.v1 import ingest_pb2 as ing
from runops.kit import limits
from runops.kit.errors import FieldViolation, InvalidArgument
from runops.kit.ids import BATCH, RUN
from runops.kit.limits import (
    DEFAULT_PAGE_SIZE,
    IDEMPOTENCY_KEY_LIMIT,
    MAX_INDEX,
    MAX_PAGE_SIZE,
    TEXT_LIMIT,
    Violations,
)

# A run's field rules are runops.kit.limits', the run store's too: ingest refuses first, naming
# the item.
MAX_TASK_IDENTIFIERS = 1000


def _id(v: Violations, value: str, field: str, prefix: str) -> str:
    """A required id, friendly (`<prefix>_<body>`) or internal (the body); as given."""
    return value if limits.id_body(v, value, field, prefix, bare=True) else ""


def batch_id(value: str, field: str = "batch_id") -> str:
    v = Violations()
    checked = _id(v, value, field, BATCH)
    v.raise_if_any()
    return checked


def create_batch(request: ing.CreateBatchRequest, max_run_count: int) -> None:
    v = Violations()
    if not 1 <= request.run_count <= max_run_count:
        v.add("run_count", f"must be between 1 and {max_run_count} (got {request.run_count})")
    v.max_length(request.idempotency_key, "idempotency_key", IDEMPOTENCY_KEY_LIMIT)
    if len(request.task_identifiers) > MAX_TASK_IDENTIFIERS:
        v.add("task_identifiers", f"must hold at most {MAX_TASK_IDENTIFIERS} entries")
    for i, task in enumerate(request.task_identifiers[:MAX_TASK_IDENTIFIERS]):
        limits.task_identifier(v, task, f"task_identifiers[{i}]")
    if request.parent_run_id:
        _id(v, request.parent_run_id, "parent_run_id", RUN)
    elif request.resume_parent_on_completion:
        v.add("parent_run_id", "is required with resume_parent_on_completion")
    v.raise_if_any()


@dataclass(frozen=True)
class CheckedUnit:
    """A unit's items that passed, as columns (position k is one item), first occurrence of each
    index only (a repeat within the unit is dropped here; across units the run store reports it
    as a duplicate). Each payload is read out of its message once: `payloads[k]`."""

    items: Sequence[ing.BatchItem]
    indexes: list[int]
    tasks: list[str]
    payloads: list[bytes]
    payload_types: list[str]
    # Positions of the items that set options (most set none).
    with_options: list[int]
    repeated: int


def unit(items: Sequence[ing.BatchItem], run_count: int) -> CheckedUnit:
    """Checks every item of a unit; INVALID_ARGUMENT naming each bad item (reason
    INDEX_OUT_OF_RANGE when an index is outside [0, run_count), with the first such index in
    the metadata), before anything of the unit is written.

    The rules run on whole columns (each distinct task and payload type once, options only where
    set); only a unit they find fault with is walked item by item, for the error naming each."""
    indexes = [item.index for item in items]
    tasks = [item.task for item in items]
    payload_types = [item.payload_type for item in items]
    with_options = [k for k, item in enumerate(items) if item.HasField("options")]
    if not _columns_fit(items, run_count, indexes, tasks, payload_types, with_options):
        _refuse(items, run_count)
    received = len(indexes)
    if len(set(indexes)) < received:
        first = {index: k for k, index in reversed(list(enumerate(indexes)))}
        kept = sorted(first.values())
        items = [items[k] for k in kept]
        indexes = [indexes[k] for k in kept]
        tasks = [tasks[k] for k in kept]
        payload_types = [payload_types[k] for k in kept]
        with_options = [k for k, item in enumerate(items) if item.HasField("options")]
    return CheckedUnit(
        items,
        indexes,
        tasks,
        [item.payload for item in items],
        payload_types,
        with_options,
        received - len(indexes),
    )


def _columns_fit(
    items: Sequence[ing.BatchItem],
    run_count: int,
    indexes: list[int],
    tasks: list[str],
    payload_types: list[str],
    with_options: list[int],
) -> bool:
    """True when no item breaks a rule (`_refuse` would find nothing)."""
    return (
        (not indexes or max(indexes) < run_count)
        and all(limits.TASK_IDENTIFIER.fullmatch(task) for task in set(tasks))
        and max(map(len, set(payload_types)), default=0) <= TEXT_LIMIT
        and all(limits.trigger_options_fit(items[k].options) for k in with_options)
    )


def _refuse(items: Sequence[ing.BatchItem], run_count: int) -> None:
    """The rules item by item, raising the error that names every bad item."""
    v = Violations()
    out_of_range: list[int] = []
    for item in items:
        field = f"items[{item.index}]"
        if item.index >= run_count:
            out_of_range.append(item.index)
            continue
        limits.task_identifier(v, item.task, f"{field}.task")
        v.max_length(item.payload_type, f"{field}.payload_type", TEXT_LIMIT)
        limits.trigger_options(v, item.options, f"{field}.options")
    if out_of_range:
        first = out_of_range[0]
        raise InvalidArgument(
            f"item index {first} is outside [0, {run_count}) of this batch"
            + (f" (and {len(out_of_range) - 1} more)" if len(out_of_range) > 1 else ""),
            reason="INDEX_OUT_OF_RANGE",
            metadata={"index": str(first), "run_count": str(run_count)},
            violations=[
                FieldViolation(f"items[{i}].index", f"must be below run_count {run_count}")
                for i in out_of_range
            ],
        )
    v.raise_if_any("items have invalid fields")


def list_batch_items(request: ing.ListBatchItemsRequest) -> tuple[str, int]:
    """The batch id and the page size."""
    v = Violations()
    checked = _id(v, request.batch_id, "batch_id", BATCH)
    if request.page_size > MAX_PAGE_SIZE:
        v.add("page_size", f"must be at most {MAX_PAGE_SIZE} (got {request.page_size})")
    if request.page_token and not (
        request.page_token.isdigit() and int(request.page_token) <= MAX_INDEX
    ):
        v.add("page_token", "must be a next_page_token of an earlier answer")
    if request.filter not in ing.ItemFilter.values():
        v.add("filter", f"must be an ItemFilter (got {request.filter})")
    v.raise_if_any()
    return checked, request.page_size or DEFAULT_PAGE_SIZE
