"""The idempotent-retry rule (spec §5): every branch of the table, on plain values and on the
Batch message the run store returns."""

from __future__ import annotations

import itertools

import grpc
import pytest
from google.protobuf import timestamp_pb2

from runops.common.v1 import common_pb2 as c
from services.ingest.retry_rule import Verdict, aborted_error, batch_verdict, verdict

PENDING, PROCESSING = c.BATCH_STATUS_PENDING, c.BATCH_STATUS_PROCESSING
COMPLETED, PARTIAL, ABORTED = (
    c.BATCH_STATUS_COMPLETED,
    c.BATCH_STATUS_PARTIAL_FAILED,
    c.BATCH_STATUS_ABORTED,
)

# (status, sealed, processing_completed_at set, accepted, run_count) -> verdict
TABLE = [
    # Already done: whatever else holds.
    *[
        ((status, sealed, completed, accepted, 10), Verdict.DONE)
        for status in (PROCESSING, COMPLETED, PARTIAL)
        for sealed, completed, accepted in itertools.product((False, True), (False, True), (3, 10))
    ],
    ((PENDING, True, False, 10, 10), Verdict.DONE),  # sealed
    ((PENDING, True, False, 3, 10), Verdict.DONE),  # sealed (counts are not re-judged)
    ((PENDING, False, True, 3, 10), Verdict.DONE),  # processing completed
    ((PENDING, True, True, 10, 10), Verdict.DONE),
    # Pending, not sealed, not completed: the counts decide.
    ((PENDING, False, False, 10, 10), Verdict.SEAL),
    ((PENDING, False, False, 11, 10), Verdict.SEAL),  # never more than run_count; still seal
    ((PENDING, False, False, 0, 10), Verdict.NEEDS_ITEMS),
    ((PENDING, False, False, 9, 10), Verdict.NEEDS_ITEMS),
    # Aborted wins over everything.
    *[
        ((ABORTED, sealed, completed, accepted, 10), Verdict.ABORTED)
        for sealed, completed, accepted in itertools.product((False, True), (False, True), (3, 10))
    ],
]


@pytest.mark.parametrize(("row", "expected"), TABLE)
def test_rule(row: tuple[int, bool, bool, int, int], expected: Verdict) -> None:
    status, sealed, completed, accepted, run_count = row
    assert (
        verdict(
            status=status,
            sealed=sealed,
            processing_completed=completed,
            accepted_count=accepted,
            run_count=run_count,
        )
        is expected
    )
    batch = c.Batch(
        friendly_id="batch_x",
        status=status,  # type: ignore[arg-type]
        sealed=sealed,
        accepted_count=accepted,
        run_count=run_count,
    )
    if completed:
        batch.processing_completed_at.CopyFrom(timestamp_pb2.Timestamp(seconds=1))
    assert batch_verdict(batch) is expected
    assert expected.needs_work == (expected in (Verdict.SEAL, Verdict.NEEDS_ITEMS))


def test_every_known_status_is_covered() -> None:
    covered = {row[0] for row, _ in TABLE}
    known = set(c.BatchStatus.values()) - {c.BATCH_STATUS_UNSPECIFIED}
    assert covered == known


@pytest.mark.parametrize("status", [c.BATCH_STATUS_UNSPECIFIED, 99])
def test_unknown_status_is_our_bug(status: int) -> None:
    with pytest.raises(ValueError, match="not one the retry rule knows"):
        verdict(
            status=status,
            sealed=False,
            processing_completed=False,
            accepted_count=0,
            run_count=1,
        )


def test_aborted_is_failed_precondition() -> None:
    err = aborted_error(
        c.Batch(
            friendly_id="batch_abc",
            status=ABORTED,
            aborted_reason=c.BATCH_ABORTED_REASON_SEAL_TIMEOUT,
            error_message="expected 10 items, 4 arrived",
        )
    )
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == "BATCH_ABORTED"
    assert err.metadata == {"batch_id": "batch_abc", "aborted_reason": "SEAL_TIMEOUT"}
    assert "create a new batch" in err.message
    assert "(expected 10 items, 4 arrived)" in err.message
