"""runops.runstore.v1.RunStoreService: validates, routes through RunStore, shapes the answers."""

from __future__ import annotations

from typing import Any

import grpc

from runops.common.v1 import common_pb2
from runops.kit.dependencies import unique_violation
from runops.runstore.v1 import runstore_pb2 as rs
from runops.runstore.v1 import runstore_pb2_grpc as rs_grpc
from services.runstore import validation
from services.runstore.answers import answer_ids, answer_items
from services.runstore.rows import CreatedRun, SealOutcome
from services.runstore.store import RunStore, batch_not_found

Context = grpc.aio.ServicerContext[Any, Any]

_SEAL_OUTCOMES = {
    SealOutcome.SEALED: rs.SEAL_BATCH_OUTCOME_SEALED,
    SealOutcome.ALREADY_SEALED: rs.SEAL_BATCH_OUTCOME_ALREADY_SEALED,
    SealOutcome.COUNT_MISMATCH: rs.SEAL_BATCH_OUTCOME_COUNT_MISMATCH,
    SealOutcome.ABORTED: rs.SEAL_BATCH_OUTCOME_ABORTED,
}


def _add_result(results: Any, created: CreatedRun) -> None:
    """Appends a CreateRunResult to `results` (a repeated field), copying the run once (a
    message given to a constructor is copied, and again when the list is)."""
    result = results.add()
    if created.run is None:
        error = unique_violation(created.conflict or "runs_pkey", "runs")
        result.error.code = error.code.value[0]
        result.error.reason = error.reason
        result.error.message = error.message
        return
    result.run.CopyFrom(created.run)
    result.is_cached = created.is_cached


class RunStoreServicer(rs_grpc.RunStoreServiceServicer):
    def __init__(self, store: RunStore) -> None:
        self._store = store

    # -- runs -----------------------------------------------------------------------------------
    async def CreateRun(
        self, request: rs.CreateRunRequest, context: Context
    ) -> rs.CreateRunResponse:
        row = validation.create_run(request.run)
        created = await self._store.create_run(row)
        return rs.CreateRunResponse(run=created.run, is_cached=created.is_cached)

    async def CreateRuns(
        self, request: rs.CreateRunsRequest, context: Context
    ) -> rs.CreateRunsResponse:
        runs = validation.create_runs(request, self._store.run_minter())
        created = await self._store.create_runs(runs)
        response = rs.CreateRunsResponse()
        if request.result_shape == rs.RESULT_SHAPE_IDS:
            answer_ids(response.created, created)
        else:
            for result in created.results(runs):
                _add_result(response.results, result)
        return response

    async def CreateFailedRun(
        self, request: rs.CreateFailedRunRequest, context: Context
    ) -> rs.CreateFailedRunResponse:
        row = validation.create_failed_run(request)
        return rs.CreateFailedRunResponse(run=(await self._store.create_run(row)).run)

    async def CreateCancelledRun(
        self, request: rs.CreateCancelledRunRequest, context: Context
    ) -> rs.CreateCancelledRunResponse:
        row = validation.create_cancelled_run(request)
        return rs.CreateCancelledRunResponse(run=(await self._store.create_run(row)).run)

    async def GetRun(self, request: rs.GetRunRequest, context: Context) -> rs.GetRunResponse:
        ref = validation.run_ref(request.run_id, request.environment_id, request.consistency)
        run = await self._store.get_run(ref.run_id, ref.environment_id, ref.consistency)
        return rs.GetRunResponse(run=run)

    async def FindRunByIdempotencyKey(
        self, request: rs.FindRunByIdempotencyKeyRequest, context: Context
    ) -> rs.FindRunByIdempotencyKeyResponse:
        ref = validation.key_ref(
            request.environment_id,
            request.task_identifier,
            request.idempotency_key,
            request.consistency,
        )
        run = await self._store.find_run_by_idempotency_key(
            ref.environment_id, ref.task_identifier, ref.idempotency_key, ref.consistency
        )
        return rs.FindRunByIdempotencyKeyResponse(run=run)

    async def ListBatchRuns(
        self, request: rs.ListBatchRunsRequest, context: Context
    ) -> rs.ListBatchRunsResponse:
        ref, after, limit = validation.list_batch_runs(request)
        runs, next_index = await self._store.list_batch_runs(
            ref.batch_id, ref.environment_id, after, limit, ref.consistency
        )
        token = "" if next_index is None else str(next_index)
        return rs.ListBatchRunsResponse(runs=runs, next_page_token=token)

    async def ListBatchItems(
        self, request: rs.ListBatchItemsRequest, context: Context
    ) -> rs.ListBatchItemsResponse:
        ref, kinds, after, limit = validation.list_batch_items(request)
        items, next_index = await self._store.list_item_outcomes(
            ref.batch_id, ref.environment_id, kinds, after, limit, ref.consistency
        )
        token = "" if next_index is None else str(next_index)
        return rs.ListBatchItemsResponse(items=items, next_page_token=token)

    async def CompleteRun(
        self, request: rs.CompleteRunRequest, context: Context
    ) -> rs.CompleteRunResponse:
        ref = validation.complete_run(request)
        if request.WhichOneof("outcome") == "failure":
            done = await self._store.complete_run(
                ref.run_id, ref.environment_id, error=request.failure
            )
        else:
            done = await self._store.complete_run(
                ref.run_id,
                ref.environment_id,
                output=request.success.output,
                output_type=request.success.output_type,
            )
        return rs.CompleteRunResponse(run=done.run, batch=done.batch)

    async def ResetIdempotencyKey(
        self, request: rs.ResetIdempotencyKeyRequest, context: Context
    ) -> rs.ResetIdempotencyKeyResponse:
        ref = validation.key_ref(
            request.environment_id, request.task_identifier, request.idempotency_key
        )
        cleared = await self._store.reset_idempotency_key(
            ref.environment_id, ref.task_identifier, ref.idempotency_key
        )
        return rs.ResetIdempotencyKeyResponse(cleared_count=cleared)

    async def AddRunTags(
        self, request: rs.AddRunTagsRequest, context: Context
    ) -> rs.AddRunTagsResponse:
        ref = validation.add_run_tags(request)
        run = await self._store.add_run_tags(ref.run_id, ref.environment_id, list(request.tags))
        return rs.AddRunTagsResponse(run=run)

    async def UpdateRunMetadata(
        self, request: rs.UpdateRunMetadataRequest, context: Context
    ) -> rs.UpdateRunMetadataResponse:
        ref = validation.update_run_metadata(request)
        run = await self._store.update_run_metadata(
            ref.run_id, ref.environment_id, request.metadata, request.metadata_type
        )
        return rs.UpdateRunMetadataResponse(run=run)

    async def RescheduleRun(
        self, request: rs.RescheduleRunRequest, context: Context
    ) -> rs.RescheduleRunResponse:
        ref, delay_until = validation.reschedule_run(request)
        run = await self._store.reschedule_run(ref.run_id, ref.environment_id, delay_until)
        return rs.RescheduleRunResponse(run=run)

    async def CancelRun(
        self, request: rs.CancelRunRequest, context: Context
    ) -> rs.CancelRunResponse:
        ref = validation.cancel_run(request)
        done = await self._store.cancel_run(ref.run_id, ref.environment_id, request.reason)
        return rs.CancelRunResponse(run=done.run)

    # -- batches --------------------------------------------------------------------------------
    async def CreateBatch(
        self, request: rs.CreateBatchRequest, context: Context
    ) -> rs.CreateBatchResponse:
        row = validation.create_batch(request)
        created = await self._store.create_batch(row)
        return rs.CreateBatchResponse(batch=created.batch, is_cached=created.is_cached)

    async def GetBatch(self, request: rs.GetBatchRequest, context: Context) -> rs.GetBatchResponse:
        ref = validation.batch_ref(request.batch_id, request.environment_id, request.consistency)
        batch = await self._store.get_batch(ref.batch_id, ref.environment_id, ref.consistency)
        return rs.GetBatchResponse(batch=batch)

    async def AcceptBatchItems(
        self, request: rs.AcceptBatchItemsRequest, context: Context
    ) -> rs.AcceptBatchItemsResponse:
        ref, items = validation.accept_batch_items(
            request, self._store.run_minter(parent=request.batch_id)
        )
        result = await self._store.accept_batch_items(ref.batch_id, ref.environment_id, items)
        response = rs.AcceptBatchItemsResponse(
            accepted_count=result.accepted_count, run_count=result.run_count
        )
        if request.result_shape == rs.RESULT_SHAPE_IDS:
            answer_items(response.accepted, result)
            return response
        # Added in place: a message list given to a constructor is built, then copied.
        add = response.items.add
        for index, run_id, duplicate in zip(
            result.indexes, result.run_ids, result.duplicates, strict=True
        ):
            add(index=index, run_id=run_id, duplicate=duplicate)
        return response

    async def GetBatchMissingRanges(
        self, request: rs.GetBatchMissingRangesRequest, context: Context
    ) -> rs.GetBatchMissingRangesResponse:
        ref, limit = validation.missing_ranges(request)
        found = await self._store.missing_ranges(
            ref.batch_id, ref.environment_id, limit, ref.consistency
        )
        return rs.GetBatchMissingRangesResponse(
            ranges=[common_pb2.IndexRange(start=s, end=e) for s, e in found.ranges],
            truncated=found.truncated,
            run_count=found.run_count,
            accepted_count=found.accepted_count,
        )

    async def SealBatch(
        self, request: rs.SealBatchRequest, context: Context
    ) -> rs.SealBatchResponse:
        ref = validation.batch_ref(request.batch_id, request.environment_id)
        result = await self._store.seal_batch(ref.batch_id, ref.environment_id)
        if result.outcome is SealOutcome.NOT_FOUND:
            raise batch_not_found(ref.batch_id)
        return rs.SealBatchResponse(
            batch=result.batch,
            sealed_now=result.outcome is SealOutcome.SEALED,
            outcome=_SEAL_OUTCOMES[result.outcome],
        )

    async def GetWaitpoint(
        self, request: rs.GetWaitpointRequest, context: Context
    ) -> rs.GetWaitpointResponse:
        waitpoint_id, env, consistency = validation.waitpoint_ref(request)
        found = await self._store.get_waitpoint(waitpoint_id, env, consistency)
        return rs.GetWaitpointResponse(waitpoint=found)
