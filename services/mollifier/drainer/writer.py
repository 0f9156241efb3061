"""The drainer's RunWriter on the run store's `CreateRuns`: one call per tick, new, cancelled and
SYSTEM_FAILURE runs side by side, each keeping the id and creation time its caller was shown.
The request is the items' serialized RunInputs joined as they are (`create_runs_serialized`),
and it asks for the lean answer (ids and errors, no Run per row); a run store that answers in
full is read as well.

A replayed run id (a drainer that died after writing, or a slow one whose entries were recovered
and written by another) is answered by the run store with the existing run (`is_cached`): OK.
A per-run error is retryable when its code is (UNAVAILABLE, ABORTED, …), else permanent. A
whole-call refusal for a caller's mistake (one bad snapshot fails the request's validation) is
retried run by run, so one bad entry cannot hold the others back.

A snapshot the buffer holds corrupt (bytes sent undecoded) fails the whole call: after any such
failure the items' bytes are parsed, and the undecodable ones are answered PERMANENT while the
others are written.

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
from google.protobuf.message import DecodeError

from runops.common.v1 import common_pb2
from runops.kit.errors import RETRYABLE_CODES, RunopsError, details_of
from runops.runstore.client import RunStoreClient
from runops.runstore.v1 import runstore_pb2 as rs
from services.mollifier.drainer.drainer import DrainItem, WriteResult, WriteStatus

log = structlog.get_logger("runops.mollifier.writer")

_RETRYABLE = frozenset(code.value[0] for code in RETRYABLE_CODES)
# ErrorInfo reasons of the run store's transient refusals of one statement (runops.kit.dependencies,
# services.runstore.app): the run store and its database answered; these runs did not go in.
_REFUSALS = frozenset({"STATEMENT_TIMEOUT", "SERIALIZATION_FAILURE", "TRANSIENT_CONFLICT"})


def _refused(exc: grpc.aio.AioRpcError) -> bool:
    return details_of(exc).reason in _REFUSALS


def _outcomes(
    response: rs.CreateRunsResponse,
) -> list[tuple[str, common_pb2.ItemError | None]]:
    """(friendly id written, error) per run in request order, from the lean answer (`created`)
    or, from a run store that answers every run in full, `results`."""
    if response.HasField("created"):
        created = response.created
        errors = dict(created.errors)
        return [(run_id, errors.get(i)) for i, run_id in enumerate(created.friendly_id)]
    return [
        (result.run.friendly_id, result.error if result.HasField("error") else None)
        for result in response.results
    ]


def _result(item: DrainItem, friendly_id: str, error: common_pb2.ItemError | None) -> WriteResult:
    if error is not None:
        status = WriteStatus.RETRYABLE if error.code in _RETRYABLE else WriteStatus.PERMANENT
        return WriteResult(status, f"{error.reason}: {error.message}")
    if friendly_id != item.popped.run_id:
        # A live run already held the idempotency key: the run store returned it instead.
        log.warning(
            "buffered run resolved to another run holding its idempotency key",
            run_id=item.popped.run_id,
            holder=friendly_id,
            environment_id=item.popped.environment_id,
        )
    return WriteResult(WriteStatus.OK)


def _undecodable(items: Sequence[DrainItem]) -> set[int]:
    """Positions of items whose bytes are not a RunInput (only looked at after a failed call)."""
    found = set()
    for i, item in enumerate(items):
        try:
            rs.RunInput.FromString(item.wire)
        except DecodeError:
            found.add(i)
    return found


class RunStoreWriter:
    def __init__(self, run_store: RunStoreClient) -> None:
        self._run_store = run_store

    async def create_runs(self, items: Sequence[DrainItem]) -> Sequence[WriteResult]:
        try:
            response = await self._run_store.create_runs_serialized([item.wire for item in items])
        except RunopsError as exc:
            if len(items) == 1:
                return [WriteResult(WriteStatus.PERMANENT, f"{exc.reason}: {exc.message}")]
            log.warning("CreateRuns refused the tick; writing its runs one by one", error=str(exc))
            return [result for item in items for result in await self.create_runs([item])]
        except grpc.aio.AioRpcError as exc:
            if not _refused(exc) and (undecodable := _undecodable(items)):
                # Bytes sent undecoded: a snapshot Redis holds corrupt must not stall its tick.
                return await self._without(items, undecodable)
            if not _refused(exc) or len(items) == 1:
                raise
            log.warning(
                "CreateRuns refused the tick transiently; writing its runs one by one",
                error=details_of(exc).message,
            )
            return await self._one_by_one(items)
        outcomes = _outcomes(response)
        if len(outcomes) != len(items):
            raise RuntimeError(f"CreateRuns answered {len(outcomes)} runs for {len(items)}")
        return [_result(item, *outcome) for item, outcome in zip(items, outcomes, strict=True)]

    async def _without(
        self, items: Sequence[DrainItem], undecodable: set[int]
    ) -> list[WriteResult]:
        """The tick's other runs written; the undecodable ones PERMANENT (never sent again: at
        their last attempt the drainer decodes them, fails, and leaves them DRAINING)."""
        log.error("buffered snapshots do not decode", count=len(undecodable))
        rest = [item for i, item in enumerate(items) if i not in undecodable]
        written = iter(await self.create_runs(rest) if rest else [])
        refused = WriteResult(WriteStatus.PERMANENT, "the buffered snapshot does not decode")
        return [refused if i in undecodable else next(written) for i in range(len(items))]

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
