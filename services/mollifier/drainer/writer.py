"""The drainer's RunWriter on the run store's `CreateRuns`: one call per tick, new, cancelled and
SYSTEM_FAILURE runs side by side, each keeping the id and creation time its caller was shown.

A replayed run id (a drainer that died after writing, or a slow one whose entries were recovered
and written by another) is answered by the run store with the existing run (`is_cached`): OK.
A per-run error is retryable when its code is (UNAVAILABLE, ABORTED, …), else permanent. A
whole-call refusal for a caller's mistake (one bad snapshot fails the request's validation) is
retried run by run, so one bad entry cannot hold the others back.

A whole-call transient refusal the run store answered itself (its ErrorInfo names a statement
timeout, e.g. a run's row locked by another transaction, or a serialization conflict) is
retried run by run too: a run refused again while others of its tick were written is RETRYABLE
(an attempt counted; after the last one it is written as a SYSTEM_FAILURE run). Anything else
transient (the run store or its database down or hung, a deadline of our own, a tick of which
nothing could be written) raises, and the drainer requeues the tick without counting an attempt:
an outage must not turn runs into failures. The run-by-run pass gives up as an outage at its
second refusal with nothing written yet, so a database-wide stall costs two statement timeouts
per tick, not one per run.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import structlog

from runops.common.v1 import common_pb2
from runops.kit.errors import RETRYABLE_CODES, RunopsError, details_of
from runops.runstore.client import RunStoreClient
from runops.runstore.v1 import runstore_pb2 as rs
from services.mollifier.drainer.drainer import DrainItem, DrainKind, WriteResult, WriteStatus

log = structlog.get_logger("runops.mollifier.writer")

_RETRYABLE = frozenset(code.value[0] for code in RETRYABLE_CODES)
# ErrorInfo reasons of the run store's transient refusals of one statement (runops.kit.dependencies,
# services.runstore.app): the run store and its database answered; these runs did not go in.
_REFUSALS = frozenset({"STATEMENT_TIMEOUT", "SERIALIZATION_FAILURE", "TRANSIENT_CONFLICT"})


def _refused(exc: grpc.aio.AioRpcError) -> bool:
    return details_of(exc).reason in _REFUSALS


def run_input(item: DrainItem) -> rs.RunInput:
    run = rs.RunInput()
    run.CopyFrom(item.run)
    if item.created_at is not None:
        run.created_at.FromDatetime(item.created_at)
    if item.kind is DrainKind.FAILED:
        run.failed.CopyFrom(common_pb2.RunError(code=item.error_code, message=item.error_message))
    elif item.kind is DrainKind.CANCELLED:
        run.cancelled.reason = item.error_message
    return run


def _result(item: DrainItem, result: rs.CreateRunResult) -> WriteResult:
    if result.HasField("error"):
        status = WriteStatus.RETRYABLE if result.error.code in _RETRYABLE else WriteStatus.PERMANENT
        return WriteResult(status, f"{result.error.reason}: {result.error.message}")
    if result.run.friendly_id != item.run.run_id:
        # A live run already held the idempotency key: the run store returned it instead.
        log.warning(
            "buffered run resolved to another run holding its idempotency key",
            run_id=item.run.run_id,
            holder=result.run.friendly_id,
            environment_id=item.run.environment_id,
        )
    return WriteResult(WriteStatus.OK)


class RunStoreWriter:
    def __init__(self, run_store: RunStoreClient) -> None:
        self._run_store = run_store

    async def create_runs(self, items: Sequence[DrainItem]) -> Sequence[WriteResult]:
        inputs = [run_input(item) for item in items]
        try:
            results = await self._run_store.create_runs(inputs)
        except RunopsError as exc:
            if len(items) == 1:
                return [WriteResult(WriteStatus.PERMANENT, f"{exc.reason}: {exc.message}")]
            log.warning("CreateRuns refused the tick; writing its runs one by one", error=str(exc))
            return [result for item in items for result in await self.create_runs([item])]
        except grpc.aio.AioRpcError as exc:
            if not _refused(exc) or len(items) == 1:
                raise
            log.warning(
                "CreateRuns refused the tick transiently; writing its runs one by one",
                error=details_of(exc).message,
            )
            return await self._one_by_one(items)
        return [_result(item, result) for item, result in zip(items, results, strict=True)]

    async def _one_by_one(self, items: Sequence[DrainItem]) -> list[WriteResult]:
        """Each run alone: a transient refusal is that run's own (RETRYABLE) once another run
        of the tick was written; two refusals before any write, or none written, is an outage
        (raised)."""
        results: list[WriteResult] = []
        refusals: list[grpc.aio.AioRpcError] = []
        for item in items:
            try:
                results.extend(await self.create_runs([item]))
            except grpc.aio.AioRpcError as exc:
                if not _refused(exc) or (refusals and len(refusals) == len(results)):
                    raise
                refusals.append(exc)
                detail = details_of(exc)
                results.append(
                    WriteResult(WriteStatus.RETRYABLE, f"{detail.reason}: {detail.message}")
                )
        if len(refusals) == len(results):
            raise refusals[-1]
        return results
