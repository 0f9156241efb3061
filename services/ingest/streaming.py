"""Phase 2 of one stream (spec §5): the items of an authenticated, existing batch.

`Phase2.run(messages)` takes the messages after the header, cuts them into units of at most
RUNOPS_MAX_CHUNK_ITEMS and runs each through `Pipeline` (at most RUNOPS_INGEST_CONCURRENCY in
flight, pulled lazily). A unit: check every item (an out-of-range index fails the stream naming
it; nothing of that unit is written, what earlier units accepted stays), pre-fail oversized
payloads (PAYLOAD_TOO_LARGE), fill task defaults (one cached worker resolution per unit,
`runops.controlplane.defaults`), link keyed items that resolve to an existing run, offload large
payloads, then one `AcceptBatchItems`. `settle()` ends it: seal, or the missing ranges, by the
retry rule.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from runops.common.v1 import common_pb2
from runops.controlplane.defaults import TaskDefaults
from runops.ingest.v1 import ingest_pb2 as ing
from runops.kit.errors import Aborted, FailedPrecondition, InvalidArgument
from runops.kit.limits import MAX_ITEMS_PER_CALL
from runops.runstore.client import RunStoreClient
from runops.runstore.v1 import runstore_pb2 as rs
from services.ingest import accept_request, validation
from services.ingest.keyed import KeyedItem, KeyedItems, UnitClaims
from services.ingest.offload import Offloader
from services.ingest.pipeline import Pipeline, split_units
from services.ingest.retry_rule import Verdict, aborted_error, batch_verdict

PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
# settle() re-reads a batch that changed under it (a seal race, a count that moved) this often.
SETTLE_ROUNDS = 4


@dataclass(frozen=True)
class Limits:
    concurrency: int
    max_chunk_items: int
    max_item_payload_bytes: int


class BatchClosed(Exception):
    """The batch stopped taking items during the stream (another stream sealed it, or the
    reaper aborted it): the retry rule answers."""


class Phase2:
    """One stream's Phase 2 for `batch` (as read before the stream) in `environment_id`."""

    def __init__(
        self,
        batch: common_pb2.Batch,
        environment_id: str,
        *,
        run_store: RunStoreClient,
        offloader: Offloader,
        keyed: KeyedItems,
        defaults: TaskDefaults,
        limits: Limits,
    ) -> None:
        self.batch = batch
        self.environment_id = environment_id
        self._run_store = run_store
        self._offloader = offloader
        self._keyed = keyed
        self._defaults = defaults
        self._limits = limits
        self.pipeline: Pipeline[Sequence[ing.BatchItem]] = Pipeline(limits.concurrency)
        self.pre_failed_count = 0
        self.linked_count = 0

    # -- the stream -----------------------------------------------------------------------------
    async def run(self, messages: AsyncIterable[ing.StreamBatchItemsRequest]) -> None:
        """Every item of the stream written (or the first failure raised once the units in
        flight finished); BatchClosed if the batch stopped taking items meanwhile."""
        unit_size = min(self._limits.max_chunk_items, MAX_ITEMS_PER_CALL)
        await self.pipeline.run(split_units(_chunks(messages), unit_size), self._unit)

    async def _unit(self, items: Sequence[ing.BatchItem]) -> None:
        unit = validation.unit(items, self.batch.run_count)
        del items
        limit = self._limits.max_item_payload_bytes
        threshold = self._offloader.threshold_bytes
        # By position in the unit; most units have none of these.
        pre_failed: dict[int, common_pb2.RunError] = {}
        to_offload: list[int] = []
        if max(map(len, unit.payloads), default=0) >= min(limit + 1, threshold):
            for k, payload in enumerate(unit.payloads):
                if len(payload) > limit:
                    pre_failed[k] = common_pb2.RunError(
                        code=PAYLOAD_TOO_LARGE,
                        message=f"payload of {len(payload)} bytes exceeds the {limit}-byte maximum",
                    )
                elif len(payload) >= threshold:
                    to_offload.append(k)
        workers: dict[int, str] = {}
        keyed: list[KeyedItem] = []
        for k in unit.with_options:
            options = unit.items[k].options
            workers[k] = options.lock_to_version
            if options.idempotency_key and k not in pre_failed:
                keyed.append(_keyed(unit.items[k]))
        counts = collections.Counter(
            zip((workers.get(k, "") for k in range(len(unit.tasks))), unit.tasks, strict=True)
            if workers
            else zip(itertools.repeat(""), unit.tasks)
        )
        # Pre-failed runs take task defaults too.
        defaults = await accept_request.defaults_by_key(self._defaults, self.environment_id, counts)
        claims = (
            await self._keyed.resolve(self.environment_id, keyed, owner=self.batch.id)
            if keyed
            else None
        )
        try:
            existing = dict(claims.existing) if claims is not None else {}
            linked_at = {k: existing[i] for k, i in enumerate(unit.indexes) if i in existing}
            offloaded = await self._offload(
                unit, [k for k in to_offload if k not in linked_at and k not in pre_failed]
            )
            request = accept_request.encode(
                unit,
                environment_id=self.environment_id,
                batch_id=self.batch.id,
                workers=workers,
                defaults=defaults,
                payloads=offloaded,
                pre_failed=pre_failed,
                linked=linked_at,
            )
            pre_failed_indexes = {unit.indexes[k] for k in pre_failed}
            del unit, offloaded  # the request's bytes hold all the call needs
            accepted = await self._accept(request)
            del request
        except BaseException:
            if claims is not None:
                await claims.release()
            raise
        if claims is not None:
            await _publish(claims, keyed, accepted.accepted)
        linked = set(existing)
        if linked or pre_failed_indexes:
            columns = accepted.accepted
            fresh = {
                index
                for index, duplicate in zip(columns.index, columns.duplicate, strict=True)
                if not duplicate
            }
            self.linked_count += len(fresh & linked)
            self.pre_failed_count += len(fresh & pre_failed_indexes)

    async def _offload(
        self, unit: validation.CheckedUnit, positions: Sequence[int]
    ) -> dict[int, tuple[bytes, str]]:
        """Uploads the unit's large payloads concurrently (the store's connection pool bounds
        them): each one's reference and payload type by position; the first failure fails the
        unit."""

        async def one(k: int) -> tuple[int, tuple[bytes, str]]:
            offloaded = await self._offloader.offload(
                project_id=self.batch.project_id,
                environment_id=self.batch.environment_id,
                batch_id=self.batch.id,
                index=unit.indexes[k],
                payload=unit.payloads[k],
                payload_type=unit.payload_types[k],
            )
            # The payload is in the store: the unit holds only its reference from here on.
            unit.payloads[k] = b""
            return k, (offloaded.payload, offloaded.payload_type)

        outcomes = await asyncio.gather(*(one(k) for k in positions), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return dict(outcome for outcome in outcomes if not isinstance(outcome, BaseException))

    async def _accept(self, request: bytes) -> rs.AcceptBatchItemsResponse:
        """One AcceptBatchItems of a serialized request (`accept_request.encode`)."""
        try:
            return await self._run_store.accept_batch_items_serialized(request)
        except FailedPrecondition as exc:
            if exc.reason in ("BATCH_SEALED", "BATCH_ABORTED"):
                raise BatchClosed(exc.reason) from exc
            raise

    # -- the end --------------------------------------------------------------------------------
    async def settle(self) -> ing.StreamBatchItemsResponse:
        """The answer by the retry rule on the batch as it is now: seal when every item is in,
        else the missing ranges; DONE answers sealed; ABORTED fails FAILED_PRECONDITION."""
        batch = await self._read()
        for _ in range(SETTLE_ROUNDS):
            verdict = batch_verdict(batch)
            if verdict is Verdict.ABORTED:
                raise aborted_error(batch)
            if verdict is Verdict.DONE:
                return self.answer(batch, sealed=True)
            if verdict is Verdict.NEEDS_ITEMS:
                missing = await self._run_store.missing_ranges(
                    environment_id=self.environment_id, batch_id=batch.id
                )
                if missing.ranges:
                    reply = self.answer(batch, sealed=False)
                    reply.accepted_count = missing.accepted_count
                    reply.missing_ranges.extend(
                        common_pb2.IndexRange(start=start, end=end) for start, end in missing.ranges
                    )
                    return reply
                batch = await self._read()  # complete by now: the rule again
                continue
            sealed = await self._run_store.seal_batch(
                environment_id=self.environment_id, batch_id=batch.id
            )
            batch = sealed.batch
            if sealed.outcome == rs.SEAL_BATCH_OUTCOME_SEALED:
                # This stream sealed it: answered as a retry would be (every item failed: ABORTED).
                if batch_verdict(batch) is Verdict.ABORTED:
                    raise aborted_error(batch)
                return self.answer(batch, sealed=True)
            # Lost a race: ALREADY_SEALED is DONE (or ABORTED), COUNT_MISMATCH NEEDS_ITEMS.
        raise Aborted(
            f"batch {batch.friendly_id} kept changing while the stream ended; retry",
            reason="BATCH_STATE_CHANGING",
            retry_after=0.1,
        )

    async def _read(self) -> common_pb2.Batch:
        return await self._run_store.get_batch(
            environment_id=self.environment_id, batch_id=self.batch.id, read_your_writes=True
        )

    def answer(self, batch: common_pb2.Batch, *, sealed: bool) -> ing.StreamBatchItemsResponse:
        return ing.StreamBatchItemsResponse(
            batch_id=batch.friendly_id,
            sealed=sealed,
            accepted_count=batch.accepted_count,
            run_count=batch.run_count,
            pre_failed_count=self.pre_failed_count,
            linked_count=self.linked_count,
            status=batch.status,
        )


async def _chunks(
    messages: AsyncIterable[ing.StreamBatchItemsRequest],
) -> AsyncIterator[Sequence[ing.BatchItem]]:
    """The items of each chunk message after the header; a second header (or a message with
    neither) fails the stream."""
    async for message in messages:
        kind = message.WhichOneof("message")
        if kind == "chunk":
            yield message.chunk.items
            continue
        if kind == "header":
            raise InvalidArgument(
                "the header must be the first message and only the first",
                reason="REPEATED_HEADER",
                metadata={"batch_id": message.header.batch_id},
            )
        raise InvalidArgument(
            "every message after the header must be a chunk of items", reason="EMPTY_MESSAGE"
        )


def _keyed(item: ing.BatchItem) -> KeyedItem:
    expires_at = None
    if item.options.HasField("idempotency_key_ttl"):
        ttl = max(item.options.idempotency_key_ttl.ToTimedelta(), timedelta(0))
        expires_at = datetime.now(UTC) + ttl
    return KeyedItem(item.index, item.task, item.options.idempotency_key, expires_at)


async def _publish(
    claims: UnitClaims, keyed: Sequence[KeyedItem], accepted: rs.AcceptedItemColumns
) -> None:
    """The run each claimed item got, duplicates included (a resent index keeps the run written
    the first time: that is the key's run)."""
    claimed = {item.index for item in keyed} - set(claims.existing)
    runs = {
        index: run_id
        for index, run_id in zip(accepted.index, accepted.run_id, strict=True)
        if index in claimed
    }
    await claims.publish(runs)
