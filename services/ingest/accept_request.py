"""One unit's `AcceptBatchItemsRequest`, as columns (`BatchItemColumns`: entry k of each column
is item k) filled from the unit's own columns a whole list at a time, instead of a
`BatchItemInput` and a `RunInput` message per item: the hot path of small items (issue 16). The
run store checks and writes columns without a message per row either, and answers lean
(`result_shape` IDS: `accepted` columns, no AcceptedItem per item).

A column every item holds the same value of travels as one entry (the task, the payload type,
the task defaults of a unit of one task). An item's task defaults are those of its (worker,
task) pair, resolved once per distinct pair (`TaskDefaults.fill` on one prototype run each).
Rare per-item fields travel by position: options, pre-failed errors, links to existing runs.
The request goes out serialized (`RunStoreClient.accept_batch_items_serialized`), so no
message is held while the call is in flight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

from runops.common.v1 import common_pb2
from runops.controlplane.defaults import TaskDefaults
from runops.runstore.v1 import runstore_pb2 as rs
from services.ingest.validation import CheckedUnit

T = TypeVar("T")
# (worker the run locks to, task): the key of a run's task defaults.
DefaultsKey = tuple[str, str]
# RunColumns' columns of the task defaults (default_ttl travels as default_ttl_ms).
DEFAULT_COLUMNS = (
    "worker_version",
    "default_max_attempts",
    "default_queue",
    "default_machine_preset",
)


async def defaults_by_key(
    defaults: TaskDefaults, environment_id: str, keys: Mapping[DefaultsKey, int]
) -> dict[DefaultsKey, rs.RunInput]:
    """The task defaults of each (worker, task) key, as `TaskDefaults.fill` sets them on a run
    (a run with none of them set: platform defaults); `keys` counts the runs of each."""
    prototypes = {
        key: rs.RunInput(
            task_identifier=key[1], options=common_pb2.TriggerOptions(lock_to_version=key[0])
        )
        for key in keys
    }
    await defaults.fill(environment_id, list(prototypes.values()), counts=list(keys.values()))
    return prototypes


def _column(values: list[T]) -> list[T]:
    """A column's entries: one when every item holds the same value (the run store gives it
    to every item)."""
    return values[:1] if values.count(values[0]) == len(values) else values


def _ttl_ms(run: rs.RunInput) -> int:
    return run.default_ttl.ToMilliseconds() if run.HasField("default_ttl") else 0


def encode(
    unit: CheckedUnit,
    *,
    environment_id: str,
    batch_id: str,
    workers: Mapping[int, str],
    defaults: Mapping[DefaultsKey, rs.RunInput],
    payloads: Mapping[int, tuple[bytes, str]],
    pre_failed: Mapping[int, common_pb2.RunError],
    linked: Mapping[int, str],
) -> bytes:
    """The serialized request writing every item of `unit` (at least one), in its order. By
    position k: `workers[k]` the worker an item with options locks to (absent: ""),
    `payloads[k]` a payload and type that replace the item's (offloaded; a pre-failed item's
    payload is not kept), `pre_failed[k]` the error of an item written already failed,
    `linked[k]` the existing run an item links to."""
    request = rs.AcceptBatchItemsRequest(
        batch_id=batch_id, environment_id=environment_id, result_shape=rs.RESULT_SHAPE_IDS
    )
    columns = request.item_columns
    columns.index.extend(unit.indexes)
    runs = columns.runs
    runs.count = len(unit.indexes)
    runs.task_identifier.extend(_column(unit.tasks))
    item_payloads: Sequence[bytes] = unit.payloads
    payload_types = unit.payload_types
    if payloads or pre_failed:
        item_payloads, payload_types = list(item_payloads), list(payload_types)
        for k, (payload, payload_type) in payloads.items():
            item_payloads[k], payload_types[k] = payload, payload_type
        for k in pre_failed:
            item_payloads[k] = b""
    runs.payload.extend(item_payloads)
    runs.payload_type.extend(_column(payload_types))
    keys: list[DefaultsKey] = (
        [(workers.get(k, ""), task) for k, task in enumerate(unit.tasks)]
        if workers
        else [("", task) for task in _column(unit.tasks)]
    )
    filled = _column(keys)
    for name in DEFAULT_COLUMNS:
        getattr(runs, name).extend(_column([getattr(defaults[key], name) for key in filled]))
    runs.default_ttl_ms.extend(_column([_ttl_ms(defaults[key]) for key in filled]))
    for k in unit.with_options:
        runs.options[k].CopyFrom(unit.items[k].options)
    for k, error in pre_failed.items():
        columns.pre_failed[k].CopyFrom(error)
    for k, run_id in linked.items():
        columns.existing_run_id[k] = run_id
    return request.SerializeToString()
