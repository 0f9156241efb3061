"""BatchIngestService end to end on the real suite (control plane, run store, Postgres with
replicas, Redis, moto S3): Phase 1, Phase 2, the retry rule, refusals, item outcomes, watch."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import grpc
import pytest
from grpc_health.v1 import health_pb2

from runops.common.v1 import common_pb2
from runops.ingest.v1 import ingest_pb2 as ing
from runops.kit.errors import details_of
from runops.localstack.settings import INTERNAL_TOKEN
from runops.runstore.client import RunStoreClient
from services.ingest.app import Ingest
from services.ingest.offload import STORE_PAYLOAD_TYPE, packet_key
from tests.controlplane.harness import Seeded
from tests.harness import expect_error, health_status, until_health
from tests.ingest.harness import (
    Stub,
    Suite,
    database_of,
    ingest_in_process,
    item,
    items,
    replayed,
    requests,
    stub,
)
from tests.runstore.harness import start_on_stack


async def create(api: Stub, run_count: int, **fields: object) -> common_pb2.Batch:
    reply = await api.CreateBatch(ing.CreateBatchRequest(run_count=run_count, **fields))  # type: ignore[arg-type]
    return reply.batch


async def all_runs(suite: Suite, batch_id: str, env_id: str) -> list[common_pb2.Run]:
    async with RunStoreClient(suite.runstore_target, token=INTERNAL_TOKEN) as store:
        runs: list[common_pb2.Run] = []
        token = ""
        while True:
            page, token = await store.list_batch_runs(
                environment_id=env_id,
                batch_id=batch_id,
                page_size=1000,
                page_token=token,
                read_your_writes=True,
            )
            runs += page
            if not token:
                return runs


async def test_ten_thousand_items_shuffled_with_duplicates_seal_once(
    api: Stub, seeded: Seeded, suite: Suite
) -> None:
    n = 10_000
    batch = await create(api, n, idempotency_key="big")
    indexes = list(range(n)) + random.sample(range(n), 500)
    random.shuffle(indexes)
    chunks = [items(indexes[i : i + 700]) for i in range(0, len(indexes), 700)]
    reply = await api.StreamBatchItems(requests(batch.friendly_id, *chunks))
    assert reply.sealed
    assert reply.accepted_count == n == reply.run_count
    assert reply.status == common_pb2.BATCH_STATUS_PROCESSING
    runs = await all_runs(suite, batch.friendly_id, seeded.env_id)
    assert [r.batch_index for r in runs] == list(range(n))
    assert len({r.id for r in runs}) == n
    assert all(r.payload == item(r.batch_index).payload for r in runs[:50])

    again = await api.StreamBatchItems(requests(batch.friendly_id, items(range(10))))
    assert again.sealed
    assert again.accepted_count == n
    assert again.pre_failed_count == again.linked_count == 0
    assert len(await all_runs(suite, batch.friendly_id, seeded.env_id)) == n
    # Phase 1 replay: the same batch, cached.
    replay = await api.CreateBatch(ing.CreateBatchRequest(run_count=n, idempotency_key="big"))
    assert replay.is_cached
    assert replay.batch.id == batch.id
    assert replay.batch.sealed


async def test_header_only_stream_answers_state_and_seals_when_complete(api: Stub) -> None:
    batch = await create(api, 5)
    first = await api.StreamBatchItems(requests(batch.id, items([0, 1, 3])))  # internal id
    assert not first.sealed
    assert first.accepted_count == 3
    assert [(r.start, r.end) for r in first.missing_ranges] == [(2, 3), (4, 5)]
    state = await api.StreamBatchItems(requests(batch.friendly_id))
    assert not state.sealed
    assert [(r.start, r.end) for r in state.missing_ranges] == [(2, 3), (4, 5)]
    await api.StreamBatchItems(requests(batch.friendly_id, items([2, 4])))
    done = await api.StreamBatchItems(requests(batch.friendly_id))
    assert done.sealed
    assert done.accepted_count == 5


async def test_oversized_offloaded_and_keyed_items(
    api: Stub, seeded: Seeded, suite: Suite, s3_client: object
) -> None:
    # An earlier run holds key "k-existing": the item links to it.
    first = await create(api, 1)
    await api.StreamBatchItems(
        requests(
            first.id, [item(0, options=common_pb2.TriggerOptions(idempotency_key="k-existing"))]
        )
    )
    existing = (await all_runs(suite, first.id, seeded.env_id))[0]

    batch = await create(api, 6)
    big = b"x" * 8000  # >= offload threshold (4096), <= item maximum (16384)
    chunk = [
        item(0),
        item(1, payload=b"y" * 20000),  # above the maximum: pre-failed
        item(2, payload=big),
        item(3, options=common_pb2.TriggerOptions(idempotency_key="k-existing")),
        item(4, options=common_pb2.TriggerOptions(idempotency_key="k-new")),
        item(5, options=common_pb2.TriggerOptions(idempotency_key="k-new")),
    ]
    reply = await api.StreamBatchItems(requests(batch.friendly_id, chunk))
    assert reply.sealed
    assert reply.pre_failed_count == 1
    # This organization has no mollifier flag: its keys are SKIPPED by the claim and the run
    # store links items 3 and 5 as it writes them; linked_count counts only links known before
    # the write (ListBatchItems below reports both). tests/ingest/test_keyed.py: the flag on.
    assert reply.linked_count == 0
    assert reply.status == common_pb2.BATCH_STATUS_PARTIAL_FAILED

    runs = {
        r.batch_index: r
        for r in await all_runs(suite, batch.id, seeded.env_id)
        if r.batch_id == batch.friendly_id
    }
    assert runs[1].status == common_pb2.RUN_STATUS_SYSTEM_FAILURE
    assert runs[1].error.code == "PAYLOAD_TOO_LARGE"
    assert runs[1].payload == b""
    key = packet_key(batch.project_id, batch.environment_id, batch.id, 2)
    assert runs[2].payload == key.encode()
    assert runs[2].payload_type == STORE_PAYLOAD_TYPE
    stored = await s3_client.get_object(Bucket=suite.stack.s3_bucket, Key=key)  # type: ignore[attr-defined]
    async with stored["Body"] as body:
        assert await body.read() == big

    await database_of(suite, batch).wait_for_replica()  # ListBatchItems reads a replica
    outcomes = [
        o async for o in _pages(api, batch.friendly_id, ing.ITEM_FILTER_PRE_FAILED_OR_LINKED, 1)
    ]
    by_index = {o.index: o for o in outcomes}
    assert by_index[1].outcome == ing.ITEM_OUTCOME_PRE_FAILED
    assert by_index[1].error_code == "PAYLOAD_TOO_LARGE"
    assert by_index[3].outcome == ing.ITEM_OUTCOME_LINKED
    assert by_index[3].run_id == existing.friendly_id
    # Two items with one new key: one run, the second links to it.
    assert 5 in by_index
    assert by_index[5].outcome == ing.ITEM_OUTCOME_LINKED
    assert by_index[5].run_id == runs[4].friendly_id
    assert set(by_index) == {1, 3, 5}
    every = [o async for o in _pages(api, batch.id, ing.ITEM_FILTER_UNSPECIFIED, 4)]
    assert [o.index for o in every] == list(range(6))
    assert every[0].outcome == ing.ITEM_OUTCOME_CREATED
    assert every[0].run_id == runs[0].friendly_id


async def _pages(api: Stub, batch_id: str, filter: int, size: int):  # type: ignore[no-untyped-def]
    token = ""
    while True:
        reply = await api.ListBatchItems(
            ing.ListBatchItemsRequest(
                batch_id=batch_id,
                filter=ing.ItemFilter.ValueType(filter),
                page_size=size,
                page_token=token,
            )
        )
        for outcome in reply.items:
            yield outcome
        token = reply.next_page_token
        if not token:
            return


async def test_refusals_name_what_is_wrong_and_keep_what_was_accepted(
    api: Stub, ingest: Ingest, seeded: Seeded, suite: Suite
) -> None:
    batch = await create(api, 10)
    # Out of range: the earlier chunk stays accepted.
    exc = await expect_error(
        api.StreamBatchItems(requests(batch.id, items(range(3)), items([4, 12]))),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    d = details_of(exc)
    assert d.reason == "INDEX_OUT_OF_RANGE"
    assert d.fields == ["items[12].index"]
    assert d.metadata["index"] == "12"
    accepted = await replayed(suite, api, batch)
    assert accepted.accepted_count >= 3
    assert not accepted.sealed

    # Malformed options, named by index.
    bad = item(5, options=common_pb2.TriggerOptions(max_attempts=1000, tags=["a"] * 11))
    exc = await expect_error(
        api.StreamBatchItems(requests(batch.id, [bad])), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert set(details_of(exc).fields) == {"items[5].options.max_attempts", "items[5].options.tags"}
    exc = await expect_error(
        api.StreamBatchItems(requests(batch.id, [item(5, task="")])),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details_of(exc).fields == ["items[5].task"]

    # Missing header, repeated header, empty stream.
    exc = await expect_error(
        api.StreamBatchItems(requests(None, items([5]))), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details_of(exc).reason == "MISSING_HEADER"
    exc = await expect_error(api.StreamBatchItems(requests(None)), grpc.StatusCode.INVALID_ARGUMENT)
    assert details_of(exc).reason == "MISSING_HEADER"
    exc = await expect_error(
        api.StreamBatchItems(requests(batch.id, items([6]), header_again=True)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details_of(exc).reason == "REPEATED_HEADER"
    state = await api.StreamBatchItems(requests(batch.id))
    assert state.accepted_count >= 4  # items 0-2 and 6 (6 was in flight before the header)
    assert 6 not in [i for r in state.missing_ranges for i in range(r.start, r.end)]

    # Unknown batch, a bad id, another environment's batch.
    exc = await expect_error(
        api.StreamBatchItems(requests("batch_" + "0" * 25 + "1")), grpc.StatusCode.NOT_FOUND
    )
    assert details_of(exc).reason == "BATCH_NOT_FOUND"
    exc = await expect_error(
        api.GetBatch(ing.GetBatchRequest(batch_id="batch_NOPE")), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details_of(exc).fields == ["batch_id"]
    from runops.localstack.settings import ADMIN_TOKEN
    from tests.controlplane.harness import seed
    from tests.controlplane.harness import stub as cp_stub

    other = await seed(cp_stub(suite.controlplane_target, ADMIN_TOKEN))
    other_api = stub(ingest.app.target, other.api_key)
    for call in (
        other_api.StreamBatchItems(requests(batch.friendly_id, items([7]))),
        other_api.GetBatch(ing.GetBatchRequest(batch_id=batch.id)),
        other_api.ListBatchItems(ing.ListBatchItemsRequest(batch_id=batch.id)),
    ):
        exc = await expect_error(call, grpc.StatusCode.NOT_FOUND)
        assert details_of(exc).reason == "BATCH_NOT_FOUND"
    got = await api.GetBatch(ing.GetBatchRequest(batch_id=batch.friendly_id))
    assert got.batch.accepted_count == state.accepted_count

    # Bad API key / none.
    exc = await expect_error(
        stub(ingest.app.target, "tr_dev_not-a-key").GetBatch(
            ing.GetBatchRequest(batch_id=batch.id)
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    exc = await expect_error(
        stub(ingest.app.target, None).CreateBatch(ing.CreateBatchRequest(run_count=1)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert details_of(exc).reason == "MISSING_API_KEY"

    # Phase 1 bounds.
    for run_count in (0, 100_001):
        exc = await expect_error(
            api.CreateBatch(ing.CreateBatchRequest(run_count=run_count)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert details_of(exc).fields == ["run_count"]
    exc = await expect_error(
        api.CreateBatch(ing.CreateBatchRequest(run_count=1, resume_parent_on_completion=True)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details_of(exc).fields == ["parent_run_id"]


async def test_token_bucket_refuses_with_retry_info(suite: Suite, seeded: Seeded) -> None:
    from tests.ingest.harness import ingest_in_process

    async with ingest_in_process(
        suite, rate_limit_capacity=100, max_run_count=100, rate_limit_refill_per_second=10
    ) as small:
        api = stub(small.app.target, seeded.api_key)
        await api.CreateBatch(ing.CreateBatchRequest(run_count=80))
        exc = await expect_error(
            api.CreateBatch(ing.CreateBatchRequest(run_count=80)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        d = details_of(exc)
        assert d.reason == "BATCH_RATE_LIMITED"
        assert d.retry_after is not None
        assert d.retry_after > 0


async def test_aborted_batch_is_failed_precondition_for_the_sealing_stream_and_retries(
    api: Stub, seeded: Seeded, suite: Suite
) -> None:
    batch = await create(api, 2)
    # Every item pre-failed: the seal makes it ABORTED (EVERY_ITEM_FAILED), and the stream that
    # sealed it answers as every retry does.
    big = b"z" * 20000
    answers = [
        details_of(
            await expect_error(api.StreamBatchItems(stream), grpc.StatusCode.FAILED_PRECONDITION)
        )
        for stream in (
            requests(batch.id, items([0, 1], payload=big)),
            requests(batch.id),
            requests(batch.friendly_id, items([0, 1])),
        )
    ]
    for answer in answers:
        assert answer.reason == "BATCH_ABORTED"
        assert answer.metadata == {
            "batch_id": batch.friendly_id,
            "aborted_reason": "EVERY_ITEM_FAILED",
        }
        assert answer.message == answers[0].message
    assert f"batch {batch.friendly_id} was aborted (every item failed)" in answers[0].message
    after = await replayed(suite, api, batch)
    assert after.status == common_pb2.BATCH_STATUS_ABORTED
    assert after.accepted_count == 2


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_in_flight_never_exceeds_concurrency(
    suite: Suite, seeded: Seeded, concurrency: int
) -> None:
    from tests.ingest.harness import ingest_in_process

    async with ingest_in_process(suite, ingest_concurrency=concurrency, max_chunk_items=20) as svc:
        api = stub(svc.app.target, seeded.api_key)
        batch = await create(api, 600)
        # Three messages of 200 items: split into 30 units of 20.
        chunks = [items(range(i, i + 200)) for i in range(0, 600, 200)]
        reply = await api.StreamBatchItems(requests(batch.id, *chunks))
        assert reply.sealed
        phase2 = svc.servicer.ended[-1]
        assert phase2.pipeline.completed == 30
        assert 1 <= phase2.pipeline.peak_in_flight <= concurrency
        if concurrency == 1:
            assert phase2.pipeline.peak_in_flight == 1


async def test_object_store_down_fails_retryable_and_a_retry_completes(
    api: Stub, suite: Suite, seeded: Seeded
) -> None:
    from runops.localstack.ports import free_port
    from tests.ingest.harness import ingest_in_process

    batch = await create(api, 4)
    async with ingest_in_process(
        suite, s3_endpoint_url=f"http://127.0.0.1:{free_port()}"
    ) as broken:
        down = stub(broken.app.target, seeded.api_key)
        chunk = [item(0), item(1), item(2, payload=b"p" * 5000), item(3)]
        exc = await expect_error(
            down.StreamBatchItems(requests(batch.id, chunk)), grpc.StatusCode.UNAVAILABLE
        )
        d = details_of(exc)
        assert d.reason == "OBJECT_STORE_UNAVAILABLE"
        assert d.retry_after is not None
    got = await api.GetBatch(ing.GetBatchRequest(batch_id=batch.id))
    assert not got.batch.sealed
    assert got.batch.accepted_count == 0
    reply = await api.StreamBatchItems(requests(batch.id, chunk))
    assert reply.sealed
    assert reply.accepted_count == 4


async def test_watch_batch_until_completed(api: Stub, seeded: Seeded, suite: Suite) -> None:
    from runops.runstore.v1 import runstore_pb2 as rs
    from tests.runstore.harness import stub as runstore_stub

    batch = await create(api, 3)
    seen: list[common_pb2.Batch] = []

    async def watch() -> None:
        async for message in api.WatchBatch(ing.WatchBatchRequest(batch_id=batch.friendly_id)):
            seen.append(message.batch)

    watching = asyncio.create_task(watch())
    await api.StreamBatchItems(requests(batch.id, items(range(3))))
    store = runstore_stub(suite.runstore_target)
    for run in await all_runs(suite, batch.id, seeded.env_id):
        await store.CompleteRun(
            rs.CompleteRunRequest(
                run_id=run.friendly_id, environment_id=seeded.env_id, success=rs.RunSuccess()
            )
        )
    await asyncio.wait_for(watching, 10)
    assert seen[0].status == common_pb2.BATCH_STATUS_PENDING
    assert seen[-1].status == common_pb2.BATCH_STATUS_COMPLETED
    assert seen[-1].completed_run_count == 3


async def test_watch_ends_cleanly_at_shutdown(suite: Suite, seeded: Seeded) -> None:
    from tests.ingest.harness import ingest_in_process

    async with ingest_in_process(suite) as svc:
        api = stub(svc.app.target, seeded.api_key)
        batch = await create(api, 3)
        call = api.WatchBatch(ing.WatchBatchRequest(batch_id=batch.id))
        first = await call.read()
        assert isinstance(first, ing.WatchBatchResponse)
        assert first.batch.id == batch.id
        stopping = asyncio.create_task(svc.app.stop(grace=5))
        rest = [m async for m in call]
        assert await call.code() == grpc.StatusCode.OK
        assert all(m.batch.status == common_pb2.BATCH_STATUS_PENDING for m in rest)
        await stopping


async def test_health_follows_the_run_store(suite: Suite) -> None:
    """docs/ingest.md, Health: every RPC reads or writes batches in the run store, so it is a
    health dependency (as for the mollifier)."""
    store = await start_on_stack(suite.stack, split=True, name="runstore-ingest-health")
    own = dataclasses.replace(suite, runstore_target=store.app.target)
    async with ingest_in_process(own) as ingest:
        try:
            assert await health_status(ingest.app.target) == health_pb2.HealthCheckResponse.SERVING
        finally:
            await store.app.stop(grace=1)
        await until_health(ingest.app.target, health_pb2.HealthCheckResponse.NOT_SERVING)
