"""Batch ingest from Python: Phase 1 and Phase 2 in one call, with retries and resume.

    async with IngestClient(target, api_key) as ingest:
        result = await ingest.run_batch(run_count=len(rows), items=lambda: items_of(rows))
        result.response.sealed          # True
        async for batch in ingest.watch_batch(result.batch_id): ...

Items (`runops.ingest.v1.BatchItem`) are pulled one at a time and sent in chunks bounded by
count and bytes (`runops.ingest.chunking`), so a batch is never held in memory.

Retries: UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED (and ABORTED) are retried up to
`attempts` times (default 5) with exponential backoff and jitter (1 s doubling to 30 s), waiting
what the server's RetryInfo says when it says. Anything else raises `IngestError` at once
(`BatchAborted` for an aborted batch, a cached one included); when the attempts are spent,
`GaveUp`. After a failed stream the client asks the server what is
missing (a header-only stream) and resends only those indexes; after `sealed: false` it resends
the ranges the answer names.

Resending needs the items again, by index. The source decides how:

- `items_for(ranges)`: a callback returning (an iterable or async iterable of) the items whose
  index lies in the half-open `ranges` (best when items can be looked up by index);
- `items` a re-iterable (list, a file-backed iterable whose `__iter__` reopens it) or a
  zero-argument factory returning a fresh iterable / async iterable: it is iterated again and
  filtered to the missing indexes;
- a one-shot iterator or async generator works while nothing needs resending; if something
  does, `CannotResend` is raised (with the missing ranges).
"""

from __future__ import annotations

import asyncio
import bisect
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

import grpc

from runops.common.v1 import common_pb2
from runops.ingest import handshake
from runops.ingest.chunking import DEFAULT_MAX_BYTES, DEFAULT_MAX_ITEMS, achunk_items
from runops.ingest.v1 import ingest_pb2 as ing
from runops.ingest.v1 import ingest_pb2_grpc as ing_grpc
from runops.kit.backoff import ExponentialBackoff, Retry
from runops.kit.channels import DEFAULT_MAX_MESSAGE_BYTES
from runops.kit.clients import ServiceClient
from runops.kit.errors import ErrorDetails, details_of, retry_delay
from runops.kit.limits import FINAL_BATCH_STATUSES

if TYPE_CHECKING:
    from runops.ingest.v1.ingest_pb2_grpc import BatchIngestServiceAsyncStub

    Stub: TypeAlias = BatchIngestServiceAsyncStub
else:
    Stub = ing_grpc.BatchIngestServiceStub

Item = ing.BatchItem
Items: TypeAlias = Iterable[Item] | AsyncIterable[Item]
ItemSource: TypeAlias = Items | Callable[[], Items]
Ranges: TypeAlias = list[tuple[int, int]]
ItemsFor: TypeAlias = Callable[[Ranges], Items]

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)
# What grpc's core answers when it could not send on a connection that died under the call (the
# server was killed mid-stream): the local transport failing, no status from any server.
_LOCAL_SEND_FAILURE = "Internal error from Core"


def retryable(details: ErrorDetails) -> bool:
    return details.code in RETRYABLE or (
        details.code == grpc.StatusCode.INTERNAL
        and details.message == _LOCAL_SEND_FAILURE
        and details.reason is None
    )


def _retryable_rpc(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and retryable(details_of(exc))


# The service's reason for a stream to an ABORTED batch (FAILED_PRECONDITION).
ABORTED = "BATCH_ABORTED"
DEFAULT_ATTEMPTS = 5
DEFAULT_BACKOFF = ExponentialBackoff(base=1.0, cap=30.0, jitter=0.5)
DONE_STATUSES = frozenset(
    {
        common_pb2.BATCH_STATUS_PROCESSING,
        common_pb2.BATCH_STATUS_COMPLETED,
        common_pb2.BATCH_STATUS_PARTIAL_FAILED,
    }
)


class _Answer:
    """A StreamBatchItems call, for its request generator (created before the call) to wait
    on the service's initial metadata."""

    call: grpc.aio.StreamUnaryCall[ing.StreamBatchItemsRequest, ing.StreamBatchItemsResponse]

    async def open(self) -> bool:
        """Whether the service takes items on this stream; on any other answer nothing more is
        sent (the service answers once the client half-closes: the generator's end)."""
        return handshake.is_open(await self.call.initial_metadata())


class IngestError(Exception):
    """A call failed for good: `details` has the status code, reason and field violations."""

    def __init__(self, message: str, details: ErrorDetails | None = None) -> None:
        super().__init__(message)
        self.details = details

    @property
    def code(self) -> grpc.StatusCode | None:
        return None if self.details is None else self.details.code


class GaveUp(IngestError):
    """Every attempt failed with a retryable status; `details` is the last one's."""

    def __init__(self, what: str, attempts: int, details: ErrorDetails) -> None:
        super().__init__(
            f"{what}: gave up after {attempts} attempts; last error "
            f"{details.code.name}: {details.message}",
            details,
        )
        self.attempts = attempts


class BatchAborted(IngestError):
    """The batch was aborted (`aborted_reason`: EVERY_ITEM_FAILED or SEAL_TIMEOUT): nothing more
    can be written to it; create a new batch (a new idempotency key). Raised for a fresh batch
    the stream sealed and for a cached one alike, with the service's words."""

    def __init__(
        self, batch_id: str, aborted_reason: str, message: str, details: ErrorDetails | None = None
    ) -> None:
        super().__init__(message, details)
        self.batch_id = batch_id
        self.aborted_reason = aborted_reason

    @classmethod
    def of_batch(cls, batch: common_pb2.Batch) -> BatchAborted:
        """A cached batch found ABORTED (worded as the service words a stream's refusal)."""
        reason = common_pb2.BatchAbortedReason.Name(batch.aborted_reason)
        reason = reason.removeprefix("BATCH_ABORTED_REASON_")
        why = batch.error_message or reason.lower().replace("_", " ")
        message = f"batch {batch.friendly_id} was aborted ({why}); create a new batch"
        return cls(batch.friendly_id, reason, message)

    @classmethod
    def of_details(cls, details: ErrorDetails) -> BatchAborted:
        """The service's FAILED_PRECONDITION `BATCH_ABORTED` (its metadata names both)."""
        return cls(
            details.metadata.get("batch_id", ""),
            details.metadata.get("aborted_reason", "UNSPECIFIED"),
            details.message,
            details,
        )


class ItemTooLarge(IngestError):
    """An item that cannot fit in one gRPC message (the channel's and the server's limit):
    refused before it is sent, never retried. Below that limit the server decides (above its
    item maximum the item becomes a pre-failed PAYLOAD_TOO_LARGE run)."""

    def __init__(self, batch_id: str, index: int, size: int, limit: int) -> None:
        super().__init__(
            f"batch {batch_id}: item {index} needs a {size}-byte message, above the "
            f"{limit}-byte gRPC message limit; shrink its payload (store it elsewhere and send "
            "a reference)"
        )
        self.batch_id = batch_id
        self.index = index
        self.size = size
        self.limit = limit


class CannotResend(IngestError):
    """Items must be resent but the source cannot produce them again (a one-shot iterator
    without `items_for`)."""

    def __init__(self, batch_id: str, ranges: Ranges) -> None:
        shown = ", ".join(f"[{a}, {b})" for a, b in ranges[:5])
        super().__init__(
            f"batch {batch_id} still misses {shown}{' …' if len(ranges) > 5 else ''}, and the "
            "item source is a one-shot iterator: pass a re-iterable, a factory or items_for"
        )
        self.batch_id = batch_id
        self.ranges = ranges


@dataclass
class BatchResult:
    batch_id: str
    created: ing.CreateBatchResponse | None
    response: ing.StreamBatchItemsResponse
    # Streams opened for Phase 2 (header-only ones included).
    streams: int = 0
    # Retryable failures met along the way.
    retries: int = 0
    failures: list[ErrorDetails] = field(default_factory=list)


def in_ranges(index: int, starts: Sequence[int], ends: Sequence[int]) -> bool:
    at = bisect.bisect_right(starts, index) - 1
    return at >= 0 and index < ends[at]


async def filter_items(items: Items, ranges: Ranges) -> AsyncIterator[Item]:
    """The items of `items` whose index lies in `ranges` (half-open, ascending)."""
    starts = [start for start, _ in ranges]
    ends = [end for _, end in ranges]
    if isinstance(items, AsyncIterable):
        async for item in items:
            if in_ranges(item.index, starts, ends):
                yield item
    else:
        for item in items:
            if in_ranges(item.index, starts, ends):
                yield item


def _reiterable(items: Items) -> bool:
    if isinstance(items, AsyncIterable):
        return aiter(items) is not items
    return iter(items) is not items


class IngestClient(ServiceClient):
    def __init__(
        self,
        target: str,
        api_key: str,
        *,
        channel: grpc.aio.Channel | None = None,
        attempts: int = DEFAULT_ATTEMPTS,
        backoff: ExponentialBackoff = DEFAULT_BACKOFF,
        max_items: int = DEFAULT_MAX_ITEMS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        """`timeout`: per call (a stream included); None: the channel's (`ServiceClient`).
        `max_message_bytes`: the largest message the server takes (its RUNOPS_MAX_MESSAGE_BYTES,
        and the kit channel's send limit): an item that cannot fit alone raises `ItemTooLarge`;
        `max_bytes` (a chunk) must fit in it."""
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        if max_bytes > max_message_bytes:
            raise ValueError(
                f"max_bytes ({max_bytes}) must not exceed max_message_bytes ({max_message_bytes})"
            )
        super().__init__(target, token=api_key, channel=channel, timeout=timeout)
        self.stub: Stub = ing_grpc.BatchIngestServiceStub(self._channel)
        self.attempts = attempts
        self.backoff = backoff
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.max_message_bytes = max_message_bytes

    # -- retries --------------------------------------------------------------------------------
    def _retry(self, what: str) -> Retry:
        """Retryable statuses, waiting what RetryInfo says when the server says; `GaveUp` once
        the attempts are spent. The caller sees every failure: no retry is logged."""

        def gave_up(exc: BaseException, failures: int) -> GaveUp:
            assert isinstance(exc, grpc.RpcError)  # only those are retried
            return GaveUp(what, failures, details_of(exc))

        return Retry(
            self.backoff,
            attempts=self.attempts,
            retry_on=(grpc.aio.AioRpcError,),
            is_retryable=_retryable_rpc,
            delay_hint=retry_delay,
            exhausted=gave_up,
            log_retries=False,
        )

    def _error(self, exc: grpc.aio.AioRpcError, what: str) -> Exception:
        """Any failure not retried (or not retryable) is an IngestError (BatchAborted for an
        aborted batch)."""
        details = details_of(exc)
        if details.code == grpc.StatusCode.FAILED_PRECONDITION and details.reason == ABORTED:
            return BatchAborted.of_details(details)
        return IngestError(f"{what}: {details.code.name}: {details.message}", details)

    # -- Phase 1 --------------------------------------------------------------------------------
    async def create_batch(
        self,
        run_count: int,
        *,
        idempotency_key: str = "",
        task_identifiers: Sequence[str] = (),
        parent_run_id: str = "",
        resume_parent_on_completion: bool = False,
    ) -> ing.CreateBatchResponse:
        """Retried; give an idempotency key so a retry after a lost answer cannot create a
        second batch (`run_batch` makes one up when none is given)."""
        request = ing.CreateBatchRequest(
            run_count=run_count,
            idempotency_key=idempotency_key,
            task_identifiers=task_identifiers,
            parent_run_id=parent_run_id,
            resume_parent_on_completion=resume_parent_on_completion,
        )
        return await self._call(
            self.stub.CreateBatch, request, retry=self._retry("CreateBatch"), what="CreateBatch"
        )

    # -- Phase 2 --------------------------------------------------------------------------------
    async def stream_items(
        self,
        batch_id: str,
        items: ItemSource | None = None,
        *,
        items_for: ItemsFor | None = None,
        progress: Callable[[int], None] | None = None,
        result: BatchResult | None = None,
    ) -> ing.StreamBatchItemsResponse:
        """Streams `items` (see the module docstring for sources) until the batch is sealed;
        resends only what is missing after a failure or `sealed: false`. `progress(n)` is
        called with the number of items of each chunk handed to gRPC."""
        if items is None and items_for is None:
            raise ValueError("give items, items_for, or both")
        tally = result or BatchResult(batch_id, None, ing.StreamBatchItemsResponse())
        # What the next stream sends: everything (None), these ranges, or nothing (ask).
        todo: Ranges | None = None
        ask = False
        last_accepted = -1

        async def until_sealed() -> ing.StreamBatchItemsResponse:
            """Streams until the batch is sealed; the retry policy reruns it after a failed
            stream (its failures count over the whole upload, not per stream)."""
            nonlocal todo, ask, last_accepted
            while True:
                source = None if ask else self._source(items, items_for, todo, batch_id)
                refused: list[ItemTooLarge] = []
                answered = _Answer()
                requests = self._requests(batch_id, source, progress, refused, answered)
                tally.streams += 1
                try:
                    answered.call = self.stub.StreamBatchItems(requests, timeout=self.timeout)
                    reply = await answered.call
                except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
                    # grpc cancels the call when the request iterator raises: say why.
                    if refused:
                        raise refused[0] from None
                    if not isinstance(exc, grpc.aio.AioRpcError):
                        raise
                    details = details_of(exc)
                    if retryable(details):
                        tally.retries += 1
                        tally.failures.append(details)
                        ask = True  # what arrived is unknown: a header-only stream tells
                    raise
                tally.response = reply
                if reply.sealed:
                    return reply
                ranges = [(r.start, r.end) for r in reply.missing_ranges]
                if not ask and reply.accepted_count <= last_accepted:
                    raise IngestError(
                        f"batch {batch_id}: resending {ranges[:3]}… accepted nothing new; the "
                        "item source does not produce those indexes"
                    )
                last_accepted = reply.accepted_count
                ask = False
                todo = ranges

        what = "StreamBatchItems"
        return await self._run(until_sealed, retry=self._retry(what), what=what)

    def _source(
        self,
        items: ItemSource | None,
        items_for: ItemsFor | None,
        ranges: Ranges | None,
        batch_id: str,
    ) -> Items:
        """Everything (`ranges` None: the first stream) or the items in `ranges`."""
        if items is None or (ranges is not None and items_for is not None):
            assert items_for is not None  # stream_items requires one of the two
            # Without a full source, "everything" is items_for over the whole index space.
            return items_for([(0, 2**32)] if ranges is None else ranges)
        produced: Items = items() if callable(items) else items
        if ranges is None:
            return produced
        if not (callable(items) or _reiterable(produced)):
            raise CannotResend(batch_id, ranges)
        return filter_items(produced, ranges)

    async def _requests(
        self,
        batch_id: str,
        items: Items | None,
        progress: Callable[[int], None] | None,
        refused: list[ItemTooLarge],
        answered: _Answer,
    ) -> AsyncIterator[ing.StreamBatchItemsRequest]:
        """The stream's messages: the header, then (once the service said the stream is open,
        `runops.ingest.handshake`) the items. An item too large for any message is put in
        `refused` and raised (grpc then cancels the call)."""
        yield ing.StreamBatchItemsRequest(header=ing.StreamHeader(batch_id=batch_id))
        if items is None or not await answered.open():
            return
        async for chunk in achunk_items(items, max_items=self.max_items, max_bytes=self.max_bytes):
            request = ing.StreamBatchItemsRequest(chunk=ing.ItemChunk(items=chunk))
            # Only an item alone in its chunk can exceed it: a chunk of several is max_bytes.
            if len(chunk) == 1 and (size := request.ByteSize()) > self.max_message_bytes:
                refused.append(ItemTooLarge(batch_id, chunk[0].index, size, self.max_message_bytes))
                raise refused[0]
            yield request
            if progress is not None:
                progress(len(chunk))

    async def run_batch(
        self,
        run_count: int,
        items: ItemSource | None = None,
        *,
        items_for: ItemsFor | None = None,
        idempotency_key: str = "",
        task_identifiers: Sequence[str] = (),
        parent_run_id: str = "",
        resume_parent_on_completion: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> BatchResult:
        """Phase 1 then Phase 2. A replayed idempotency key whose batch is already sealed skips
        Phase 2 (its answer is the batch's state). An aborted batch, cached or sealed by this
        call, raises `BatchAborted`."""
        created = await self.create_batch(
            run_count,
            idempotency_key=idempotency_key or f"runops-client-{uuid.uuid4().hex}",
            task_identifiers=task_identifiers,
            parent_run_id=parent_run_id,
            resume_parent_on_completion=resume_parent_on_completion,
        )
        batch = created.batch
        result = BatchResult(batch.friendly_id, created, ing.StreamBatchItemsResponse())
        if batch.status == common_pb2.BATCH_STATUS_ABORTED:
            raise BatchAborted.of_batch(batch)
        if created.is_cached and (batch.sealed or batch.status in DONE_STATUSES):
            result.response = ing.StreamBatchItemsResponse(
                batch_id=batch.friendly_id,
                sealed=True,
                accepted_count=batch.accepted_count,
                run_count=batch.run_count,
                status=batch.status,
            )
            return result
        await self.stream_items(
            batch.friendly_id, items, items_for=items_for, progress=progress, result=result
        )
        return result

    # -- reads ----------------------------------------------------------------------------------
    async def get_batch(self, batch_id: str) -> common_pb2.Batch:
        request = ing.GetBatchRequest(batch_id=batch_id)
        reply = await self._call(
            self.stub.GetBatch, request, retry=self._retry("GetBatch"), what="GetBatch"
        )
        return reply.batch

    async def watch_batch(self, batch_id: str) -> AsyncIterator[common_pb2.Batch]:
        """The batch as it changes, until a final status (COMPLETED / ABORTED); a stream the
        server ends early (its shutdown) or a retryable failure is reopened."""
        request = ing.WatchBatchRequest(batch_id=batch_id)
        # The open stream (None: open one) and the last batch it sent.
        call: grpc.aio.UnaryStreamCall[ing.WatchBatchRequest, ing.WatchBatchResponse] | None
        call = None
        last: common_pb2.Batch | None = None

        async def next_batch() -> common_pb2.Batch | None:
            """The next change (None: the batch is final), reopening the stream as needed; the
            retry policy's failures count until a change arrives."""
            nonlocal call, last
            while True:
                if call is None:
                    call, last = self.stub.WatchBatch(request), None
                try:
                    message = await call.read()
                except grpc.aio.AioRpcError:
                    call = None
                    raise
                if message is grpc.aio.EOF:
                    call = None
                    if last is not None and last.status in FINAL_BATCH_STATUSES:
                        return None
                    await asyncio.sleep(self.backoff.compute(1))
                    continue
                assert isinstance(message, ing.WatchBatchResponse)
                last = message.batch
                return last

        retry = self._retry("WatchBatch")
        try:
            while True:
                batch = await self._run(next_batch, retry=retry, what="WatchBatch")
                if batch is None:
                    return
                yield batch
        finally:
            if call is not None:
                call.cancel()

    async def list_batch_items(
        self,
        batch_id: str,
        *,
        filter: ing.ItemFilter.ValueType = ing.ITEM_FILTER_UNSPECIFIED,
        page_size: int = 0,
    ) -> AsyncIterator[ing.BatchItemOutcome]:
        """Every item outcome of the filter, page after page."""
        token = ""
        while True:
            request = ing.ListBatchItemsRequest(
                batch_id=batch_id, filter=filter, page_size=page_size, page_token=token
            )
            reply = await self._call(
                self.stub.ListBatchItems,
                request,
                retry=self._retry("ListBatchItems"),
                what="ListBatchItems",
            )
            for item in reply.items:
                yield item
            token = reply.next_page_token
            if not token:
                return
