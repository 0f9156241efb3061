"""The idempotent-retry rule of spec §5, in one place.

A stream (or its retry) for a batch that is already done answers `sealed: true` and does no
work; an ABORTED batch answers FAILED_PRECONDITION so the caller makes a new batch. The same
rule is applied before the stream, when the seal loses a race, when the counts do not match at
the end, and to the seal's own result (the stream that seals an all-failed batch answers as a
retry would):

| status                    | sealed | processing_completed_at | accepted vs run_count | verdict      |
|---------------------------|--------|-------------------------|-----------------------|--------------|
| PROCESSING / COMPLETED / PARTIAL_FAILED | any | any         | any                   | DONE         |
| PENDING                   | true   | any                     | any                   | DONE         |
| PENDING                   | false  | set                     | any                   | DONE         |
| PENDING                   | false  | unset                   | accepted >= run_count | SEAL         |
| PENDING                   | false  | unset                   | accepted < run_count  | NEEDS_ITEMS  |
| ABORTED                   | any    | any                     | any                   | ABORTED      |
| UNSPECIFIED / unknown     |        |                         |                       | ValueError   |
"""

from __future__ import annotations

import enum

from google.protobuf.message import Message

from runops.common.v1 import common_pb2
from runops.kit.errors import FailedPrecondition

_DONE_STATUSES = frozenset(
    {
        common_pb2.BATCH_STATUS_PROCESSING,
        common_pb2.BATCH_STATUS_COMPLETED,
        common_pb2.BATCH_STATUS_PARTIAL_FAILED,
    }
)


class Verdict(enum.Enum):
    # Answer `sealed: true` with the batch's state; write nothing.
    DONE = "done"
    # FAILED_PRECONDITION (`aborted_error`): the caller makes a new batch.
    ABORTED = "aborted"
    # Every item is in but the batch is not sealed: seal it (no items needed).
    SEAL = "seal"
    # Items are missing: take them from the stream, or answer `sealed: false` with the ranges.
    NEEDS_ITEMS = "needs_items"

    @property
    def needs_work(self) -> bool:
        return self in (Verdict.SEAL, Verdict.NEEDS_ITEMS)


def verdict(
    *,
    status: int,
    sealed: bool,
    processing_completed: bool,
    accepted_count: int,
    run_count: int,
) -> Verdict:
    """The rule on plain values (`status` a `runops.common.v1.BatchStatus`)."""
    if status == common_pb2.BATCH_STATUS_ABORTED:
        return Verdict.ABORTED
    if status in _DONE_STATUSES:
        return Verdict.DONE
    if status != common_pb2.BATCH_STATUS_PENDING:
        # The run store never answers this; acting on it could seal or refill a batch we do
        # not understand, so it is our bug (INTERNAL), not the caller's.
        raise ValueError(f"batch status {status} is not one the retry rule knows")
    if sealed or processing_completed:
        return Verdict.DONE
    if accepted_count >= run_count:
        return Verdict.SEAL
    return Verdict.NEEDS_ITEMS


def batch_verdict(batch: common_pb2.Batch) -> Verdict:
    """The rule on a `runops.common.v1.Batch` as the run store returns it."""
    return verdict(
        status=batch.status,
        sealed=batch.sealed,
        processing_completed=_has(batch, "processing_completed_at"),
        accepted_count=batch.accepted_count,
        run_count=batch.run_count,
    )


def aborted_error(batch: common_pb2.Batch) -> FailedPrecondition:
    """What a stream for an ABORTED batch fails with: the batch and why it was aborted
    (`aborted_reason`: SEAL_TIMEOUT or EVERY_ITEM_FAILED), for the client's error."""
    reason = common_pb2.BatchAbortedReason.Name(batch.aborted_reason)
    reason = reason.removeprefix("BATCH_ABORTED_REASON_")
    why = batch.error_message or reason.lower().replace("_", " ")
    return FailedPrecondition(
        f"batch {batch.friendly_id} was aborted ({why}); create a new batch",
        reason="BATCH_ABORTED",
        metadata={"batch_id": batch.friendly_id, "aborted_reason": reason},
    )


def _has(message: Message, field: str) -> bool:
    return bool(message.HasField(field))
