"""runops.ingest.v1.BatchIngestService: every RPC authenticated by API key (the kit resolves it
to the caller's environment through the control plane) and scoped to that environment."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from runops.common.v1 import common_pb2
from runops.controlplane.defaults import TaskDefaults
from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.ingest import handshake
from runops.ingest.v1 import ingest_pb2 as ing
from runops.ingest.v1 import ingest_pb2_grpc as ing_grpc
from runops.kit.context import current_principal
from runops.kit.errors import FieldViolation, InvalidArgument, NotFound, Unauthenticated
from runops.kit.ids import RUN
from runops.kit.limits import FINAL_BATCH_STATUSES
from runops.runstore.client import RunStoreClient
from runops.runstore.v1 import runstore_pb2 as rs
from services.ingest import validation
from services.ingest.keyed import KeyedItems
from services.ingest.offload import Offloader
from services.ingest.ratelimit import TokenBucket
from services.ingest.retry_rule import Verdict, aborted_error, batch_verdict
from services.ingest.streaming import BatchClosed, Limits, Phase2

Context = grpc.aio.ServicerContext[Any, Any]


def caller_environment() -> cp.Environment:
    """The environment the kit resolved the caller's API key to."""
    subject = current_principal.get().subject
    if not isinstance(subject, cp.Environment):  # only without the kit's API-key check
        raise Unauthenticated("this RPC needs an API key", reason="MISSING_API_KEY")
    return subject


def _run_ref(value: str) -> str:
    """The run store takes parent runs by friendly id; the public API takes either."""
    return value if not value or value.startswith(RUN + "_") else f"{RUN}_{value}"


class IngestServicer(ing_grpc.BatchIngestServiceServicer):
    def __init__(
        self,
        *,
        run_store: RunStoreClient,
        offloader: Offloader,
        keyed: KeyedItems,
        defaults: TaskDefaults,
        bucket: TokenBucket | None,
        limits: Limits,
        max_run_count: int,
        watch_interval_seconds: float,
        shutting_down: asyncio.Event,
    ) -> None:
        self._run_store = run_store
        self._offloader = offloader
        self._keyed = keyed
        self._defaults = defaults
        self._bucket = bucket
        self._limits = limits
        self._max_run_count = max_run_count
        self._watch_interval = watch_interval_seconds
        self._shutting_down = shutting_down
        # Phase 2 of the streams in flight and of the last few that ended (their pipelines'
        # in-flight figures: tests, debugging).
        self.streams: set[Phase2] = set()
        self.ended: collections.deque[Phase2] = collections.deque(maxlen=16)

    async def CreateBatch(
        self, request: ing.CreateBatchRequest, context: Context
    ) -> ing.CreateBatchResponse:
        env = caller_environment()
        validation.create_batch(request, self._max_run_count)

        def create() -> Awaitable[rs.CreateBatchResponse]:
            return self._run_store.create_batch(
                rs.CreateBatchRequest(
                    environment_id=env.id,
                    organization_id=env.organization.id,
                    project_id=env.project.id,
                    run_count=request.run_count,
                    idempotency_key=request.idempotency_key,
                    task_identifiers=request.task_identifiers,
                    parent_run_id=_run_ref(request.parent_run_id),
                    resume_parent_on_completion=request.resume_parent_on_completion,
                )
            )

        if self._bucket is None:
            created = await create()
        else:  # a replayed key is not charged
            created = await self._bucket.charged_create(
                env.organization.id, env.id, request.idempotency_key, request.run_count, create
            )
        return ing.CreateBatchResponse(batch=created.batch, is_cached=created.is_cached)

    async def StreamBatchItems(
        self, request_iterator: AsyncIterable[ing.StreamBatchItemsRequest], context: Context
    ) -> ing.StreamBatchItemsResponse:
        env = caller_environment()
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or first.WhichOneof("message") != "header":
            raise InvalidArgument(
                "the first message must be the header naming the batch",
                reason="MISSING_HEADER",
                violations=[FieldViolation("header", "is required as the first message")],
            )
        batch_id = validation.batch_id(first.header.batch_id, "header.batch_id")
        batch = await self._run_store.get_batch(
            environment_id=env.id, batch_id=batch_id, read_your_writes=True
        )
        phase2 = Phase2(
            batch,
            env.id,
            run_store=self._run_store,
            offloader=self._offloader,
            keyed=self._keyed,
            defaults=self._defaults,
            limits=self._limits,
        )
        verdict = batch_verdict(batch)
        if verdict is Verdict.ABORTED:
            raise aborted_error(batch)
        if verdict is Verdict.DONE:
            # Nothing to write: the kit drops what else the client sends, then answers.
            return phase2.answer(batch, sealed=True)
        # The handshake: items are welcome now.
        await context.send_initial_metadata(handshake.STREAM_OPEN)
        self.streams.add(phase2)
        try:
            with contextlib.suppress(BatchClosed):  # sealed or aborted meanwhile: the rule answers
                await phase2.run(messages)
        finally:
            self.streams.discard(phase2)
            self.ended.append(phase2)
        return await phase2.settle()

    async def GetBatch(
        self, request: ing.GetBatchRequest, context: Context
    ) -> ing.GetBatchResponse:
        env = caller_environment()
        batch_id = validation.batch_id(request.batch_id)
        batch = await _confirmed(
            lambda fresh: self._run_store.get_batch(
                environment_id=env.id, batch_id=batch_id, read_your_writes=fresh
            )
        )
        return ing.GetBatchResponse(batch=batch)

    async def WatchBatch(
        self, request: ing.WatchBatchRequest, context: Context
    ) -> AsyncIterator[ing.WatchBatchResponse]:
        """The batch now, then whenever it changes, until a final status (or shutdown: the
        stream ends OK and the client watches again elsewhere)."""
        env = caller_environment()
        batch_id = validation.batch_id(request.batch_id)
        last: common_pb2.Batch | None = None
        while True:
            batch = await self._run_store.get_batch(
                environment_id=env.id, batch_id=batch_id, read_your_writes=True
            )
            if batch != last:
                yield ing.WatchBatchResponse(batch=batch)
                last = batch
            if batch.status in FINAL_BATCH_STATUSES or self._shutting_down.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._shutting_down.wait(), self._watch_interval)

    async def ListBatchItems(
        self, request: ing.ListBatchItemsRequest, context: Context
    ) -> ing.ListBatchItemsResponse:
        env = caller_environment()
        batch_id, page_size = validation.list_batch_items(request)
        page = await _confirmed(
            lambda fresh: self._run_store.list_batch_items(
                environment_id=env.id,
                batch_id=batch_id,
                # ItemFilter and the run store's BatchItemFilter number their values alike.
                filter=rs.BatchItemFilter.ValueType(request.filter),
                page_size=page_size,
                page_token=request.page_token,
                read_your_writes=fresh,
            )
        )
        return ing.ListBatchItemsResponse(
            items=[_outcome(record) for record in page.items],
            next_page_token=page.next_page_token,
        )


def _outcome(record: rs.BatchItemRecord) -> ing.BatchItemOutcome:
    if record.pre_failed:
        outcome = ing.ITEM_OUTCOME_PRE_FAILED
    elif record.linked:
        outcome = ing.ITEM_OUTCOME_LINKED
    else:
        outcome = ing.ITEM_OUTCOME_CREATED
    return ing.BatchItemOutcome(
        index=record.index, run_id=record.run_id, outcome=outcome, error_code=record.error_code
    )


T = TypeVar("T")


async def _confirmed(read: Callable[[bool], Awaitable[T]]) -> T:
    """A replica read whose NOT_FOUND is confirmed on the writer: with several ingest and
    run-store processes, a batch created a moment ago through another process may not have
    reached the replica yet, and absence is the one answer a client must be able to trust."""
    try:
        return await read(False)
    except NotFound:
        return await read(True)
