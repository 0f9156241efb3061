"""Batch ingest under load while a dependency fails (docs/architecture.md, Failure modes); each
test counts rows in Postgres afterwards: no acknowledged batch or item lost, none duplicated,
only retryable statuses during the fault, and recovery without a restart.

- The control plane down: an API key the ingest process has cached keeps working for the
  cache's lifetime; an uncached one (and the cached one once its TTL is over) gets UNAVAILABLE
  with RetryInfo, never UNAUTHENTICATED; both work again once the control plane is back.
- The run-ops Postgres writer stopped and started again mid-stream: the client library
  (IngestClient) retries and resends only the missing indexes; exactly one run per index.
- The object store erroring (its proxy closed), and separately slow (past the attempt timeout),
  mid-offload: one run per index, and every offloaded run's object is in the store, whole.
- Redis stopped, and separately hung (SIGSTOP), during a keyed batch (ingest and the mollifier
  it claims keys through share it): exactly one run per key, and the batch recovers at once when
  Redis is back (it never waits out a claim of its own that Redis applied after its call gave
  up).
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest

from runops.ingest.client import BatchResult, IngestClient, filter_items
from runops.ingest.v1 import ingest_pb2 as ing
from runops.kit.backoff import ExponentialBackoff
from runops.kit.errors import ErrorDetails, details_of
from runops.localstack import LocalStack, PostgresCluster
from runops.localstack.delay_proxy import DelayProxy
from runops.localstack.ports import HOST, free_port
from runops.localstack.redis import RedisServer
from runops.localstack.settings import ADMIN_TOKEN
from services.ingest.app import Ingest
from services.ingest.keyed import KEY_BUSY
from services.ingest.offload import STORE_PAYLOAD_TYPE, ObjectStore
from tests.controlplane.harness import Seeded, seed, start_control_plane
from tests.controlplane.harness import stub as controlplane_stub
from tests.harness import RETRYABLE, until
from tests.ingest.harness import (
    Suite,
    ingest_in_process,
    item,
    settings_for,
    store_config,
    stub,
)
from tests.ingest.test_keyed import keyed, outcomes
from tests.ingest.test_resilience import SlowItems, shuffled_with_repeats
from tests.mollifier.service_harness import body, seeded_env, start_mollifier
from tests.runstore.harness import private_runops, rows, run_store_on

# The ingest process's API-key cache lifetime here (30 s by default): short enough to see it end.
KEY_TTL = 6.0


def retrying_client(target: str, api_key: str) -> IngestClient:
    """A client whose retries (at most 1 s apart, 40 of them) outlast every outage here plus a
    restart; chunks of 20 items."""
    backoff = ExponentialBackoff(base=0.2, cap=1.0, jitter=0.5)
    return IngestClient(target, api_key, max_items=20, backoff=backoff, attempts=40)


def paced_stream(
    client: IngestClient,
    created: ing.CreateBatchResponse,
    source: list[ing.BatchItem],
    delay: float,
) -> tuple[asyncio.Task[ing.StreamBatchItemsResponse], BatchResult]:
    """Streams `source` into the batch in the background, `delay` seconds per item (so a fault
    lands mid-stream); resends come from `source`. The result records the client's failures."""
    result = BatchResult(created.batch.id, created, ing.StreamBatchItemsResponse())
    streaming = asyncio.create_task(
        client.stream_items(
            created.batch.friendly_id,
            SlowItems(source, delay).paced,
            items_for=functools.partial(filter_items, source),
            result=result,
        )
    )
    return streaming, result


async def batch_ids(stack: LocalStack, env_id: str) -> list[str]:
    """Every batch of `env_id`, read on both writers directly (bodies)."""
    found: list[str] = []
    for db in (stack.controlplane_db, stack.runops_db):
        found += [
            row["id"]
            for row in await rows(
                db.admin_writer_dsn, "SELECT id FROM batches WHERE environment_id = $1", env_id
            )
        ]
    return found


async def create_batch(target: str, key: str) -> ing.CreateBatchResponse | grpc.aio.AioRpcError:
    """One CreateBatch with `key`: its answer or its error."""
    try:
        return await stub(target, None).CreateBatch(
            ing.CreateBatchRequest(run_count=1),
            timeout=10,
            metadata=(("authorization", f"Bearer {key}"),),
        )
    except grpc.aio.AioRpcError as exc:
        return exc


@pytest.mark.slow
async def test_control_plane_down_cached_keys_work_for_their_ttl_uncached_are_unavailable(
    suite: Suite,
) -> None:
    port = free_port()
    plane = await start_control_plane(suite.stack, grpc_port=port)
    admin = controlplane_stub(plane.app.target, ADMIN_TOKEN)
    cached, uncached = await seed(admin), await seed(admin)
    acknowledged: list[str] = []  # batches created with the cached key
    refused_cached = 0
    codes: Counter[grpc.StatusCode] = Counter()
    try:
        async with ingest_in_process(suite, controlplane_target=plane.app.target) as ingest:
            target = ingest.app.target
            await asyncio.wait_for(ingest.control_plane.subscribed.wait(), 30)
            ingest.control_plane.cache.api_keys.ttl_seconds = KEY_TTL
            began = time.monotonic()
            first = await create_batch(target, cached.api_key)
            assert isinstance(first, ing.CreateBatchResponse), first
            acknowledged.append(first.batch.id)
            # The entry was stored after `began` and before now.
            cached_until, expired_after = began + KEY_TTL, time.monotonic() + KEY_TTL

            await plane.app.stop(grace=1)

            async def unsubscribed() -> bool:
                return not ingest.control_plane.subscribed.is_set()

            await until(unsubscribed, limit=10)
            # Load until past the TTL: four callers with the cached key, one with the other.
            while time.monotonic() < expired_after + 2.0:
                started = time.monotonic()
                outcomes = await asyncio.gather(
                    *(create_batch(target, cached.api_key) for _ in range(4)),
                    create_batch(target, uncached.api_key),
                )
                ended = time.monotonic()
                for position, outcome in enumerate(outcomes):
                    with_cached_key = position < 4
                    if isinstance(outcome, grpc.aio.AioRpcError):
                        codes[outcome.code()] += 1
                        assert outcome.code() == grpc.StatusCode.UNAVAILABLE, outcome
                        assert details_of(outcome).retry_after is not None, outcome
                        if with_cached_key:
                            refused_cached += 1
                            # Checked no later than it ended: its entry had expired by then.
                            assert ended > cached_until, "cached key refused within its TTL"
                        continue
                    assert with_cached_key, "an uncached key was checked without the plane"
                    # Checked no earlier than it started: its entry was still live then.
                    assert started < expired_after, "a cached key served after its TTL"
                    acknowledged.append(outcome.batch.id)
                await asyncio.sleep(0.1)
            served_while_down = len(acknowledged) - 1
            print(
                f"\ncontrol plane down {KEY_TTL + 2:.0f}s+, cached key TTL {KEY_TTL:g}s: "
                f"{served_while_down} batches created with the cached key, refused {dict(codes)}"
            )
            assert served_while_down > 0
            assert refused_cached > 0, "the cached key expires with its TTL"

            # Back on the same port: both keys work again, without restarting ingest.
            plane = await start_control_plane(suite.stack, grpc_port=port)

            async def both_work() -> bool:
                for key in (cached.api_key, uncached.api_key):
                    outcome = await create_batch(target, key)
                    if isinstance(outcome, grpc.aio.AioRpcError):
                        assert outcome.code() in RETRYABLE, outcome
                        return False
                    if key == cached.api_key:
                        acknowledged.append(outcome.batch.id)
                return True

            await until(both_work, limit=30, interval=0.2)
    finally:
        await plane.app.stop(grace=1)
    # Every batch acknowledged to the cached key's caller is in Postgres exactly once; one
    # nobody was told about can only come from a call that ended in an error.
    stored = await batch_ids(suite.stack, cached.env_id)
    assert len(stored) == len(set(stored))
    assert set(acknowledged) <= set(stored)
    assert len(stored) - len(acknowledged) <= refused_cached


# -- the run-ops writer stopped mid-stream ---------------------------------------------------------
STREAMS = 3
ITEMS = 600
OUTAGE_SECONDS = 3.0


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PostgresCluster]:
    async with private_runops(tmp_path_factory, "ingest-load") as pg:
        yield pg


@pytest.fixture(scope="module")
async def ingest_on_cluster(suite: Suite, cluster: PostgresCluster) -> AsyncIterator[Ingest]:
    """Ingest over a run store whose run-ops database is `cluster`."""
    async with (
        run_store_on(suite.stack, cluster, name="runstore-ingest-load") as store,
        ingest_in_process(suite, runstore_target=store.app.target) as started,
    ):
        yield started


async def runs_per_index(cluster: PostgresCluster, batch_id: str) -> Counter[int]:
    found = await rows(
        cluster.admin_writer_dsn, "SELECT batch_index FROM runs WHERE batch_id = $1", batch_id
    )
    return Counter(row["batch_index"] for row in found)


@pytest.mark.slow
async def test_run_ops_writer_stopped_mid_stream_loses_and_duplicates_nothing(
    ingest_on_cluster: Ingest, cluster: PostgresCluster, seeded: Seeded
) -> None:
    async with retrying_client(ingest_on_cluster.app.target, seeded.api_key) as client:
        results: list[BatchResult] = []
        streaming = []
        for stream in range(STREAMS):
            created = await client.create_batch(ITEMS, idempotency_key=f"writer-stop-{stream}")
            source = shuffled_with_repeats(ITEMS, random.Random(stream))
            task, result = paced_stream(client, created, source, 0.004)
            streaming.append(task)
            results.append(result)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(cluster.stop_server, "writer")
        try:
            await asyncio.sleep(OUTAGE_SECONDS)
        finally:
            await asyncio.to_thread(cluster.start_server, "writer")
        replies = await asyncio.wait_for(asyncio.gather(*streaming), 90)
    failures = [f.code for r in results for f in r.failures]
    print(
        f"\nrun-ops writer stopped {OUTAGE_SECONDS:g}s under {STREAMS} streams of {ITEMS}: "
        f"{sum(r.streams for r in results)} streams opened, failures {Counter(failures)}"
    )
    assert failures, "the outage was met mid-stream"
    assert set(failures) <= RETRYABLE
    for reply, result in zip(replies, results, strict=True):
        assert reply.sealed
        assert reply.accepted_count == ITEMS
        assert await runs_per_index(cluster, result.batch_id) == Counter(range(ITEMS))


# -- the object store erroring, and separately slow, mid-offload -----------------------------------
OFFLOAD_ITEMS = 300
# One way, per segment: a round trip takes twice this, past the attempt timeout below.
SLOW_DELAY = 1.5


def offloaded_and_not(indexes: list[int]) -> list[ing.BatchItem]:
    """Odd indexes carry a payload above the offload threshold (4 KiB here)."""
    return [item(i, size=5000 if i % 2 else 16) for i in indexes]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["erroring", "slow"])
async def test_object_store_erroring_or_slow_mid_offload_loses_nothing(
    fault: str, suite: Suite, seeded: Seeded
) -> None:
    moto = urlsplit(suite.stack.s3_endpoint_url)
    assert moto.hostname is not None
    assert moto.port is not None
    port = free_port()
    proxy = await DelayProxy(moto.hostname, moto.port, delay=0.01, port=port).start()
    results: list[BatchResult] = []
    try:
        async with (
            ingest_in_process(
                suite,
                s3_endpoint_url=f"http://{HOST}:{port}",
                s3_attempts=2,
                s3_attempt_timeout_seconds=1.0,
            ) as ingest,
            retrying_client(ingest.app.target, seeded.api_key) as client,
        ):
            streaming = []
            for stream in range(2):
                created = await client.create_batch(
                    OFFLOAD_ITEMS, idempotency_key=f"offload-{fault}-{stream}-{port}"
                )
                indexes = list(range(OFFLOAD_ITEMS))
                random.Random(stream).shuffle(indexes)
                task, result = paced_stream(client, created, offloaded_and_not(indexes), 0.006)
                streaming.append(task)
                results.append(result)
            await asyncio.sleep(0.5)
            if fault == "erroring":
                await proxy.close()  # connections reset, new ones refused
                await asyncio.sleep(OUTAGE_SECONDS)
                proxy = await DelayProxy(moto.hostname, moto.port, delay=0.01, port=port).start()
            else:
                proxy.delay = SLOW_DELAY
                await asyncio.sleep(OUTAGE_SECONDS)
                proxy.delay = 0.01
            replies = await asyncio.wait_for(asyncio.gather(*streaming), 90)
    finally:
        await proxy.close()
    failures = [f.code for r in results for f in r.failures]
    print(
        f"\nobject store {fault} {OUTAGE_SECONDS:g}s mid-offload, 2 streams of {OFFLOAD_ITEMS}: "
        f"{sum(r.streams for r in results)} streams opened, failures {Counter(failures)}"
    )
    assert failures, "the fault was met mid-stream"
    assert set(failures) <= RETRYABLE
    settings = settings_for(suite)
    async with ObjectStore(store_config(suite.stack, settings)) as store:
        for reply, result in zip(replies, results, strict=True):
            assert reply.sealed
            assert reply.accepted_count == OFFLOAD_ITEMS
            found = await rows(
                suite.stack.runops_db.admin_writer_dsn,
                "SELECT batch_index, payload, payload_type FROM runs WHERE batch_id = $1",
                result.batch_id,
            )
            assert Counter(row["batch_index"] for row in found) == Counter(range(OFFLOAD_ITEMS))
            for row in found:
                if row["batch_index"] % 2 == 0:
                    continue
                # Every offloaded run's payload is its key, and the object is there, whole.
                assert row["payload_type"] == STORE_PAYLOAD_TYPE
                stored = await store.get(bytes(row["payload"]).decode())
                assert stored == offloaded_and_not([row["batch_index"]])[0].payload


# -- Redis stopped, and separately hung, during a keyed batch ---------------------------------------
KEYED_ITEMS = 300
KEYS = 120
# From Redis back to the batch sealed: the client's retries (at most 1 s apart) and the rest of
# the stream; far below the claim TTL (30 s), which the batch must never wait out.
RECOVERY_SECONDS = 12.0


class TimedFailures(list[ErrorDetails]):
    """A BatchResult's failures, each with the monotonic time the client met it (`at`)."""

    def __init__(self) -> None:
        super().__init__()
        self.at: list[float] = []

    def append(self, details: ErrorDetails) -> None:
        self.at.append(time.monotonic())
        super().append(details)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["stopped", "hung"])
async def test_redis_stopped_or_hung_during_a_keyed_batch_gives_one_run_per_key(
    fault: str, suite: Suite, tmp_path: Path
) -> None:
    """Ingest and the mollifier it claims keys through share a Redis of this test's own."""
    env = await seeded_env(suite.controlplane_target, enabled=True)
    server = RedisServer(tmp_path)
    server.start()
    redis = {"url": server.url, "socket_timeout_seconds": 1, "retry_attempts": 1}
    mollifier = await start_mollifier(
        redis=redis,
        key_prefix=f"keyed-faults-{tmp_path.name}",
        runstore_target=suite.runstore_target,
        controlplane_target=suite.controlplane_target,
        drainer_enabled=True,
        # The claim TTL stays the default (30 s): a claim taken by a command the client gave up
        # on (Redis hung, then resumed; its unit's release timed out too) is held until it
        # expires, but by the batch as owner, so the batch's later units get it back at once.
    )
    try:
        async with (
            ingest_in_process(
                suite, mollifier_target=mollifier.app.target, redis=redis, max_chunk_items=20
            ) as ingest,
            retrying_client(ingest.app.target, env.api_key) as client,
        ):
            created = await client.create_batch(KEYED_ITEMS, idempotency_key=f"keyed-{fault}")
            indexes = list(range(KEYED_ITEMS))
            random.Random(17).shuffle(indexes)
            source = [keyed(i, f"k{i % KEYS}") for i in indexes]
            streaming, result = paced_stream(client, created, source, 0.01)
            result.failures = timed = TimedFailures()
            await asyncio.sleep(0.8)
            if fault == "stopped":
                await asyncio.to_thread(server.stop, True)  # SIGTERM; the AOF stays
                await asyncio.sleep(OUTAGE_SECONDS)
                await asyncio.to_thread(server.start)
            else:
                with server.suspended():
                    await asyncio.sleep(OUTAGE_SECONDS)
            resumed = time.monotonic()
            reply = await asyncio.wait_for(streaming, 90)
            recovery = time.monotonic() - resumed
            found = await outcomes(suite, stub(ingest.app.target, env.api_key), created.batch)
    finally:
        await mollifier.app.stop(grace=1)
        server.stop()
    failures = [f.code for f in result.failures]
    busy_after = [
        at - resumed
        for f, at in zip(timed, timed.at, strict=True)
        if f.reason == KEY_BUSY and at > resumed
    ]
    print(
        f"\nRedis {fault} {OUTAGE_SECONDS:g}s during a keyed batch of {KEYED_ITEMS} "
        f"({KEYS} keys): {result.streams} streams opened, failures {Counter(failures)}, "
        f"sealed {recovery:.1f}s after Redis was back"
    )
    assert set(failures) <= RETRYABLE
    # Recovery without waiting out a claim: no unit refused for a busy key once Redis is back.
    assert not busy_after, f"IDEMPOTENCY_KEY_BUSY at {busy_after} s after Redis was back"
    assert recovery < RECOVERY_SECONDS
    assert reply.sealed
    assert reply.accepted_count == KEYED_ITEMS
    # Every index has its run; the items of one key share one run; Postgres holds one run per
    # key and nothing else.
    assert sorted(found) == list(range(KEYED_ITEMS))
    run_of_key: dict[str, set[str]] = {}
    for index, outcome in found.items():
        assert outcome.run_id, index
        run_of_key.setdefault(f"k{index % KEYS}", set()).add(body(outcome.run_id))
    assert all(len(runs) == 1 for runs in run_of_key.values()), run_of_key
    stored = await rows(
        suite.stack.runops_db.admin_writer_dsn,
        "SELECT id, idempotency_key FROM runs WHERE environment_id = $1",
        env.env_id,
    )
    stored += await rows(
        suite.stack.controlplane_db.admin_writer_dsn,
        "SELECT id, idempotency_key FROM runs WHERE environment_id = $1",
        env.env_id,
    )
    assert len(stored) == KEYS
    assert {row["idempotency_key"]: {row["id"]} for row in stored} == run_of_key
