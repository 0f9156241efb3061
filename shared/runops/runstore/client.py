"""The run store as other services use it (the mollifier drainer, batch ingest): the stub on a
kit channel (internal token, request id, deadline propagation, round_robin) and thin typed
helpers. A caller's mistake (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ALREADY_EXISTS)
comes back as the domain error it was raised as; transient failures stay AioRpcError, which the
kit maps to retryable statuses for the caller's own caller.

    async with RunStoreClient(target, token=internal_token) as run_store:
        results = await run_store.create_runs([rs.RunInput(...), ...])
        batch = await run_store.get_batch("batch_…", environment_id, read_your_writes=True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from runops.common.v1 import common_pb2
from runops.kit.clients import ServiceClient, consistency, raise_domain
from runops.runstore.v1 import runstore_pb2 as rs
from runops.runstore.v1 import runstore_pb2_grpc as rs_grpc


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

    # -- runs -----------------------------------------------------------------------------------
    async def create_run(self, run: rs.RunInput) -> rs.CreateRunResponse:
        try:
            return await self.stub.CreateRun(rs.CreateRunRequest(run=run))
        except grpc.aio.AioRpcError as exc:
            raise_domain(exc)

    async def create_runs(self, runs: Sequence[rs.RunInput]) -> list[rs.CreateRunResult]:
        """One round trip; results in request order (a per-run failure is `result.error`).
        Pre-failed / cancelled entries set `RunInput.failed` / `.cancelled`; a drained run
        keeps its `run_id` and `created_at`."""
        try:
            reply = await self.stub.CreateRuns(rs.CreateRunsRequest(runs=runs))
        except grpc.aio.AioRpcError as exc:
            raise_domain(exc)
        return list(reply.results)

    async def get_run(
        self, run_id: str, environment_id: str, *, read_your_writes: bool = False
    ) -> common_pb2.Run | None:
        """None when the environment has no such run."""
        request = rs.GetRunRequest(
            run_id=run_id, environment_id=environment_id, consistency=consistency(read_your_writes)
        )
        try:
            return (await self.stub.GetRun(request)).run
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise_domain(exc)

    async def find_run_by_idempotency_key(
        self, environment_id: str, task_identifier: str, key: str, *, read_your_writes: bool = False
    ) -> common_pb2.Run | None:
        request = rs.FindRunByIdempotencyKeyRequest(
            environment_id=environment_id,
            task_identifier=task_identifier,
            idempotency_key=key,
            consistency=consistency(read_your_writes),
        )
        try:
            reply = await self.stub.FindRunByIdempotencyKey(request)
        except grpc.aio.AioRpcError as exc:
            raise_domain(exc)
        return reply.run if reply.HasField("run") else None

    async def reset_idempotency_key(
        self, environment_id: str, task_identifier: str, key: str
    ) -> int:
        """How many runs (in either database) held the key."""
        request = rs.ResetIdempotencyKeyRequest(
            environment_id=environment_id, task_identifier=task_identifier, idempotency_key=key
        )
        try:
            return (await self.stub.ResetIdempotencyKey(request)).cleared_count
        except grpc.aio.AioRpcError as exc:
            raise_domain(exc)

    # -- batches --------------------------------------------------------------------------------
    async def create_batch(self, request: rs.CreateBatchRequest) -> rs.CreateBatchResponse:
        try:
            return await self.stub.CreateBatch(request)
        except grpc.aio.AioRpcError as exc:
            raise_domain(exc)

    async def get_batch(
        self, batch_id: str, environment_id: str, *, read_your_writes: bool = False
    ) -> common_pb2.Batch:
        request = rs.GetBatchRequest(
            batch_id=batch_id,
            environment_id=environment_id,
            consistency=consistency(read_your_writes),
        )
        try:
            return (await self.stub.GetBatch(request)).batch
        except grpc.aio.AioRpcError as exc:
            raise_domain(exc)

    async def accept_batch_items(
        self, batch_id: str, environment_id: str, items: Sequence[rs.BatchItemInput]
    ) -> rs.AcceptBatchItemsResponse:
        """One chunk, one transaction. FAILED_PRECONDITION (BATCH_SEALED / BATCH_ABORTED) and
        INVALID_ARGUMENT (INDEX_OUT_OF_RANGE, naming items[k].index) raise domain errors."""
        request = rs.AcceptBatchItemsRequest(
            batch_id=batch_id, environment_id=environment_id, items=items
        )
        try:
            return await self.stub.AcceptBatchItems(request)
        except grpc.aio.AioRpcError as exc:
            raise_domain(exc)

    async def missing_ranges(
        self,
        batch_id: str,
        environment_id: str,
        *,
        max_ranges: int = 0,
        read_your_writes: bool = True,
    ) -> MissingRanges:
        """The index ranges not accepted yet (read-your-writes by default: asked right after
        writing chunks)."""
        request = rs.GetBatchMissingRangesRequest(
            batch_id=batch_id,
            environment_id=environment_id,
            max_ranges=max_ranges,
            consistency=consistency(read_your_writes),
        )
        try:
            reply = await self.stub.GetBatchMissingRanges(request)
        except grpc.aio.AioRpcError as exc:
            raise_domain(exc)
        return MissingRanges(
            [(r.start, r.end) for r in reply.ranges],
            reply.truncated,
            reply.run_count,
            reply.accepted_count,
        )

    async def seal_batch(self, batch_id: str, environment_id: str) -> rs.SealBatchResponse:
        """`outcome` says what happened (SEALED, ALREADY_SEALED, COUNT_MISMATCH, ABORTED)."""
        request = rs.SealBatchRequest(batch_id=batch_id, environment_id=environment_id)
        try:
            return await self.stub.SealBatch(request)
        except grpc.aio.AioRpcError as exc:
            raise_domain(exc)

    async def list_batch_runs(
        self,
        batch_id: str,
        environment_id: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        read_your_writes: bool = False,
    ) -> tuple[list[common_pb2.Run], str]:
        """A page of runs by batch index and the next page's token ("" at the end)."""
        request = rs.ListBatchRunsRequest(
            batch_id=batch_id,
            environment_id=environment_id,
            page_size=page_size,
            page_token=page_token,
            consistency=consistency(read_your_writes),
        )
        try:
            reply = await self.stub.ListBatchRuns(request)
        except grpc.aio.AioRpcError as exc:
            raise_domain(exc)
        return list(reply.runs), reply.next_page_token

    async def list_batch_items(
        self,
        batch_id: str,
        environment_id: str,
        *,
        filter: rs.BatchItemFilter.ValueType = rs.BATCH_ITEM_FILTER_UNSPECIFIED,
        page_size: int = 0,
        page_token: str = "",
        read_your_writes: bool = False,
    ) -> rs.ListBatchItemsResponse:
        """A page of the batch's items (run id, linked, pre-failed) by index."""
        request = rs.ListBatchItemsRequest(
            batch_id=batch_id,
            environment_id=environment_id,
            filter=filter,
            page_size=page_size,
            page_token=page_token,
            consistency=consistency(read_your_writes),
        )
        try:
            return await self.stub.ListBatchItems(request)
        except grpc.aio.AioRpcError as exc:
            raise_domain(exc)
