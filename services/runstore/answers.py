"""The bulk writes' lean answers (result_shape IDS): columns filled with `extend`, no message
per run."""

from __future__ import annotations

from runops.kit.dependencies import unique_violation
from runops.kit.ids import RUN
from runops.runstore.v1 import runstore_pb2 as rs
from services.runstore.columns import CreatedRuns
from services.runstore.rows import AcceptedItems

_RUN_PREFIX = RUN + "_"


def answer_ids(into: rs.CreatedRuns, created: CreatedRuns) -> None:
    """CreateRuns' IDS answer: friendly ids, creation times, is_cached; refused runs in
    `errors` by position (their columns hold "" and 0)."""
    into.friendly_id.extend([_RUN_PREFIX + body if body else "" for body in created.ids])
    into.created_at_us.extend(created.created_at_us)
    into.is_cached.extend(created.is_cached)
    for k, conflict in created.conflicts.items():
        error = unique_violation(conflict, "runs")
        item = into.errors[k]
        item.code = error.code.value[0]
        item.reason = error.reason
        item.message = error.message


def answer_items(into: rs.AcceptedItemColumns, accepted: AcceptedItems) -> None:
    """AcceptBatchItems' IDS answer: the items as columns, in request order."""
    into.index.extend(accepted.indexes)
    into.run_id.extend(accepted.run_ids)
    into.duplicate.extend(accepted.duplicates)
