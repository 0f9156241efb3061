"""The run store as other services use it (the mollifier drainer, batch ingest): the stub on a
kit channel (internal token, request id, deadline propagation, round_robin) and thin typed
helpers. A caller's mistake (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ALREADY_EXISTS)
comes back as the domain error it was raised as; transient failures stay AioRpcError, which the
kit maps to retryable statuses for the caller's own caller.

    async with RunStoreClient(target, token=internal_token) as run_store:
        results = await run_store.create_runs([rs.RunInput(...), ...])
        batch = await run_store.get_batch(
            environment_id=environment_id, batch_id="batch_…", read_your_writes=True
        )
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import grpc

from runops.common.v1 import common_pb2
from runops.kit import wire
from runops.kit.clients import ServiceClient, consistency
from runops.kit.errors import NotFound
from runops.runstore.v1 import runstore_pb2 as rs
from runops.runstore.v1 import runstore_pb2_grpc as rs_grpc

_ACCEPT_BATCH_ITEMS_PATH = "/{}/AcceptBatchItems".format(
    rs.DESCRIPTOR.services_by_name["RunStoreService"].full_name
)
_CREATE_RUNS_PATH = "/{}/CreateRuns".format(
    rs.DESCRIPTOR.services_by_name["RunStoreService"].full_name
)
# CreateRunsRequest.runs and .result_shape on the wire.
_RUNS_TAG = wire.tag(rs.CreateRunsRequest.RUNS_FIELD_NUMBER, wire.LENGTH_DELIMITED)
_SHAPE_TAG = wire.tag(rs.CreateRunsRequest.RESULT_SHAPE_FIELD_NUMBER, wire.VARINT)


@dataclass(frozen=True)
class MissingRanges:
    # Half-open [start, end), ascending.
    ranges: list[tuple[int, int]]
    truncated: bool
    run_count: int
    accepted_count: int


class RunStoreClient(ServiceClient):
    def __init__(
        self, target: str, *, token: str | None = None, channel: grpc.aio.Channel | None = None
    ) -> None:
        super().__init__(target, token=token, channel=channel)
        self.stub = rs_grpc.RunStoreServiceStub(self._channel)
        # CreateRuns whose request is already in wire form (`create_runs_serialized`).
        self._create_runs_serialized = self._channel.unary_unary(
            _CREATE_RUNS_PATH,
            request_serializer=bytes,
            response_deserializer=rs.CreateRunsResponse.FromString,
        )
        # AcceptBatchItems whose request is already in wire form (ingest's columns).
        self._accept_batch_items_serialized = self._channel.unary_unary(
            _ACCEPT_BATCH_ITEMS_PATH,
            request_serializer=bytes,
            response_deserializer=rs.AcceptBatchItemsResponse.FromString,
        )

    # -- runs -----------------------------------------------------------------------------------
    async def create_run(self, run: rs.RunInput) -> rs.CreateRunResponse:
        return await self._call(self.stub.CreateRun, rs.CreateRunRequest(run=run))

    async def create_runs(self, runs: Sequence[rs.RunInput]) -> list[rs.CreateRunResult]:
        """One round trip; results in request order (a per-run failure is `result.error`).
        Pre-failed / cancelled entries set `RunInput.failed` / `.cancelled`; a drained run
        keeps its `run_id` and `created_at`."""
        reply = await self._call(self.stub.CreateRuns, rs.CreateRunsRequest(runs=runs))
        return list(reply.results)

    async def create_runs_serialized(
        self, runs: Sequence[bytes], *, shape: rs.ResultShape.ValueType = rs.RESULT_SHAPE_IDS
    ) -> rs.CreateRunsResponse:
        """`CreateRuns` of runs already serialized (RunInput bytes, as the mollifier's buffer
        holds them), joined into the request's wire form without decoding: a repeated message
        field is tag, length and bytes per element. `shape` IDS (default) answers `created`
        (ids, creation times, errors by position); a run store without it answers `results`."""
        parts = [part for run in runs for part in (_RUNS_TAG, wire.varint(len(run)), run)]
        if shape:
            parts += (_SHAPE_TAG, wire.varint(shape))
        return await self._call(self._create_runs_serialized, b"".join(parts))

    async def create_runs_ids(self, runs: Sequence[rs.RunInput] | rs.RunColumns) -> rs.CreatedRuns:
        """`create_runs` answered lean (RESULT_SHAPE_IDS), rows or columns in: friendly ids,
        creation times (microseconds) and is_cached as columns in request order; a run that
        could not be written has "" and 0 there and its error in `errors[position]`."""
        request = rs.CreateRunsRequest(result_shape=rs.RESULT_SHAPE_IDS)
        if isinstance(runs, rs.RunColumns):
            request.columns.CopyFrom(runs)
        else:
            request.runs.extend(runs)
        return (await self._call(self.stub.CreateRuns, request)).created

    async def get_run(
        self, *, environment_id: str, run_id: str, read_your_writes: bool = False
    ) -> common_pb2.Run | None:
        """None when the environment has no such run."""
        request = rs.GetRunRequest(
            environment_id=environment_id, run_id=run_id, consistency=consistency(read_your_writes)
        )
        try:
            return (await self._call(self.stub.GetRun, request)).run
        except NotFound:
            return None

    async def get_runs(
        self, *, environment_id: str, run_ids: Sequence[str], read_your_writes: bool = False
    ) -> rs.GetRunsResponse:
        """Up to 1,000 runs in one call: `runs` in the order asked, the ids the environment has
        no run for in `missing_run_ids` (as given)."""
        request = rs.GetRunsRequest(
            environment_id=environment_id,
            run_ids=run_ids,
            consistency=consistency(read_your_writes),
        )
        return await self._call(self.stub.GetRuns, request)

    async def find_run_by_idempotency_key(
        self,
        *,
        environment_id: str,
        task_identifier: str,
        idempotency_key: str,
        read_your_writes: bool = False,
    ) -> common_pb2.Run | None:
        request = rs.FindRunByIdempotencyKeyRequest(
            environment_id=environment_id,
            task_identifier=task_identifier,
            idempotency_key=idempotency_key,
            consistency=consistency(read_your_writes),
        )
        reply = await self._call(self.stub.FindRunByIdempotencyKey, request)
        return reply.run if reply.HasField("run") else None

    async def reset_idempotency_key(
        self, *, environment_id: str, task_identifier: str, idempotency_key: str
    ) -> int:
        """How many runs (in either database) held the key."""
        request = rs.ResetIdempotencyKeyRequest(
            environment_id=environment_id,
            task_identifier=task_identifier,
            idempotency_key=idempotency_key,
        )
        return (await self._call(self.stub.ResetIdempotencyKey, request)).cleared_count

    # -- run mutations --------------------------------------------------------------------------
    async def add_run_tags(
        self, *, environment_id: str, run_id: str, tags: Sequence[str]
    ) -> common_pb2.Run:
        request = rs.AddRunTagsRequest(environment_id=environment_id, run_id=run_id, tags=tags)
        return (await self._call(self.stub.AddRunTags, request)).run

    async def update_run_metadata(
        self, *, environment_id: str, run_id: str, metadata: str, metadata_type: str
    ) -> common_pb2.Run:
        request = rs.UpdateRunMetadataRequest(
            environment_id=environment_id,
            run_id=run_id,
            metadata=metadata,
            metadata_type=metadata_type,
        )
        return (await self._call(self.stub.UpdateRunMetadata, request)).run

    async def reschedule_run(
        self, *, environment_id: str, run_id: str, delay_until: datetime
    ) -> common_pb2.Run:
        request = rs.RescheduleRunRequest(environment_id=environment_id, run_id=run_id)
        request.delay_until.FromDatetime(delay_until)
        return (await self._call(self.stub.RescheduleRun, request)).run

    async def cancel_run(self, *, environment_id: str, run_id: str, reason: str) -> common_pb2.Run:
        request = rs.CancelRunRequest(environment_id=environment_id, run_id=run_id, reason=reason)
        return (await self._call(self.stub.CancelRun, request)).run

    # -- batches --------------------------------------------------------------------------------
    async def create_batch(self, request: rs.CreateBatchRequest) -> rs.CreateBatchResponse:
        return await self._call(self.stub.CreateBatch, request)

    async def get_batch(
        self, *, environment_id: str, batch_id: str, read_your_writes: bool = False
    ) -> common_pb2.Batch:
        request = rs.GetBatchRequest(
            environment_id=environment_id,
            batch_id=batch_id,
            consistency=consistency(read_your_writes),
        )
        return (await self._call(self.stub.GetBatch, request)).batch

    async def accept_batch_items(
        self, *, environment_id: str, batch_id: str, items: Sequence[rs.BatchItemInput]
    ) -> rs.AcceptBatchItemsResponse:
        """One chunk, one transaction. FAILED_PRECONDITION (BATCH_SEALED / BATCH_ABORTED) and
        INVALID_ARGUMENT (INDEX_OUT_OF_RANGE, naming items[k].index) raise domain errors."""
        request = rs.AcceptBatchItemsRequest(
            environment_id=environment_id, batch_id=batch_id, items=items
        )
        return await self._call(self.stub.AcceptBatchItems, request)

    async def accept_batch_items_serialized(self, request: bytes) -> rs.AcceptBatchItemsResponse:
        """`accept_batch_items` of a serialized AcceptBatchItemsRequest (ingest's columns,
        serialized before the call so no message is held while it is in flight)."""
        return await self._call(self._accept_batch_items_serialized, request)

    async def accept_batch_items_ids(
        self,
        *,
        environment_id: str,
        batch_id: str,
        items: Sequence[rs.BatchItemInput] | rs.BatchItemColumns,
    ) -> rs.AcceptBatchItemsResponse:
        """`accept_batch_items` answered lean (RESULT_SHAPE_IDS), rows or columns in: the items
        in `accepted` (index, run id, duplicate as columns, in request order)."""
        request = rs.AcceptBatchItemsRequest(
            environment_id=environment_id, batch_id=batch_id, result_shape=rs.RESULT_SHAPE_IDS
        )
        if isinstance(items, rs.BatchItemColumns):
            request.item_columns.CopyFrom(items)
        else:
            request.items.extend(items)
        return await self._call(self.stub.AcceptBatchItems, request)

    async def missing_ranges(
        self,
        *,
        environment_id: str,
        batch_id: str,
        max_ranges: int = 0,
        read_your_writes: bool = True,
    ) -> MissingRanges:
        """The index ranges not accepted yet (read-your-writes by default: asked right after
        writing chunks)."""
        request = rs.GetBatchMissingRangesRequest(
            environment_id=environment_id,
            batch_id=batch_id,
            max_ranges=max_ranges,
            consistency=consistency(read_your_writes),
        )
        reply = await self._call(self.stub.GetBatchMissingRanges, request)
        return MissingRanges(
            [(r.start, r.end) for r in reply.ranges],
            reply.truncated,
            reply.run_count,
            reply.accepted_count,
        )

    async def seal_batch(self, *, environment_id: str, batch_id: str) -> rs.SealBatchResponse:
        """`outcome` says what happened (SEALED, ALREADY_SEALED, COUNT_MISMATCH, ABORTED)."""
        request = rs.SealBatchRequest(environment_id=environment_id, batch_id=batch_id)
        return await self._call(self.stub.SealBatch, request)

    async def list_batch_runs(
        self,
        *,
        environment_id: str,
        batch_id: str,
        page_size: int = 0,
        page_token: str = "",
        read_your_writes: bool = False,
    ) -> tuple[list[common_pb2.Run], str]:
        """A page of runs by batch index and the next page's token ("" at the end)."""
        request = rs.ListBatchRunsRequest(
            environment_id=environment_id,
            batch_id=batch_id,
            page_size=page_size,
            page_token=page_token,
            consistency=consistency(read_your_writes),
        )
        reply = await self._call(self.stub.ListBatchRuns, request)
        return list(reply.runs), reply.next_page_token

    async def list_batch_items(
        self,
        *,
        environment_id: str,
        batch_id: str,
        filter: rs.BatchItemFilter.ValueType = rs.BATCH_ITEM_FILTER_UNSPECIFIED,
        page_size: int = 0,
        page_token: str = "",
        read_your_writes: bool = False,
    ) -> rs.ListBatchItemsResponse:
        """A page of the batch's items (run id, linked, pre-failed) by index."""
        request = rs.ListBatchItemsRequest(
            environment_id=environment_id,
            batch_id=batch_id,
            filter=filter,
            page_size=page_size,
            page_token=page_token,
            consistency=consistency(read_your_writes),
        )
        return await self._call(self.stub.ListBatchItems, request)
