"""Exactly one run per index whatever happens to a stream: cut by the client at random points
and resumed by the client library, the ingest process SIGKILLed mid-stream and restarted, two
clients streaming one batch through two ingest processes at once."""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from runops.ingest.client import BatchResult, CannotResend, IngestClient, filter_items
from runops.ingest.v1 import ingest_pb2 as ing
from runops.kit.backoff import ExponentialBackoff
from runops.localstack.ports import free_port
from services.ingest.app import Ingest
from tests.controlplane.harness import Seeded
from tests.ingest.harness import FAST, Suite, ingest_process, item
from tests.ingest.test_service import all_runs

N = 200


def shuffled_with_repeats(n: int, rng: random.Random) -> list[ing.BatchItem]:
    indexes = list(range(n)) + rng.sample(range(n), n // 10)
    rng.shuffle(indexes)
    return [item(i) for i in indexes]


async def exactly_one_run_per_index(suite: Suite, batch_id: str, env_id: str, n: int) -> None:
    runs = await all_runs(suite, batch_id, env_id)
    assert [r.batch_index for r in runs] == list(range(n))
    assert len({r.id for r in runs}) == n


async def test_client_cuts_at_random_points_then_resumes(
    ingest: Ingest, seeded: Seeded, suite: Suite
) -> None:
    rng = random.Random(20260101)
    trials = 45
    async with IngestClient(
        ingest.app.target, seeded.api_key, backoff=FAST, max_items=rng.randint(7, 40)
    ) as client:
        for trial in range(trials):
            source = shuffled_with_repeats(N, rng)
            created = await client.create_batch(N, idempotency_key=f"cut-{trial}-{rng.random()}")
            batch_id = created.batch.friendly_id
            cut_after = rng.randint(0, len(source))
            reached = asyncio.Event()

            async def until_cut(
                items: list[ing.BatchItem] = source,
                cut_after: int = cut_after,
                reached: asyncio.Event = reached,
            ) -> AsyncIterator[ing.BatchItem]:
                for position, one in enumerate(items):
                    if position == cut_after:
                        reached.set()
                        await asyncio.sleep(3600)
                    yield one
                    if rng.random() < 0.05:
                        await asyncio.sleep(0)

            first = asyncio.create_task(client.stream_items(batch_id, until_cut()))
            done, _ = await asyncio.wait(
                {first, asyncio.create_task(reached.wait())}, return_when=asyncio.FIRST_COMPLETED
            )
            if first not in done:
                await asyncio.sleep(rng.random() * 0.02)
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)
            # Resume from the re-iterable source: only the missing indexes are sent.
            result = BatchResult(batch_id, None, ing.StreamBatchItemsResponse())
            reply = await client.stream_items(batch_id, source, result=result)
            assert reply.sealed, trial
            assert reply.accepted_count == N
            await exactly_one_run_per_index(suite, batch_id, seeded.env_id, N)


async def test_one_shot_iterator_cannot_resend(ingest: Ingest, seeded: Seeded) -> None:
    async with IngestClient(ingest.app.target, seeded.api_key, backoff=FAST) as client:
        created = await client.create_batch(10)
        with pytest.raises(CannotResend) as caught:
            await client.stream_items(created.batch.id, iter([item(i) for i in range(5)]))
        assert caught.value.ranges == [(5, 10)]


class SlowItems:
    """A re-iterable source that paces itself, so a process can be killed mid-stream."""

    def __init__(self, items: list[ing.BatchItem], delay: float) -> None:
        self.items = items
        self.delay = delay

    def __iter__(self) -> Iterator[ing.BatchItem]:
        return iter(self.items)

    async def paced(self) -> AsyncIterator[ing.BatchItem]:
        for one in self.items:
            await asyncio.sleep(self.delay)
            yield one


async def test_ingest_sigkilled_mid_stream_and_restarted(
    seeded: Seeded, suite: Suite, tmp_path: Path
) -> None:
    rng = random.Random(7)
    port = free_port()
    process = ingest_process(suite, tmp_path / "ingest-0.log", port)
    await process.__aenter__()
    try:
        async with IngestClient(
            process.target,
            seeded.api_key,
            max_items=10,
            backoff=ExponentialBackoff(base=0.5, cap=2.0, jitter=0.5),
            attempts=15,  # a restart under load can take several seconds
        ) as client:
            for trial in range(5):
                source = shuffled_with_repeats(N, rng)
                created = await client.create_batch(
                    N, idempotency_key=f"kill-{trial}-{rng.random()}"
                )
                batch_id = created.batch.friendly_id
                slow = SlowItems(source, 0.002)
                # The first pass is paced; resends come from items_for.
                streaming = asyncio.create_task(
                    client.stream_items(
                        batch_id,
                        slow.paced,
                        items_for=functools.partial(filter_items, source),
                    )
                )
                await asyncio.sleep(rng.uniform(0.05, 0.35))
                assert process.proc is not None
                process.proc.kill()
                await asyncio.to_thread(process.proc.wait)
                process = ingest_process(suite, tmp_path / f"ingest-{trial + 1}.log", port)
                await process.__aenter__()
                reply = await asyncio.wait_for(streaming, 60)
                assert reply.sealed
                assert reply.accepted_count == N
                await exactly_one_run_per_index(suite, batch_id, seeded.env_id, N)
    finally:
        await process.__aexit__(None, None, None)


async def test_two_clients_two_processes_one_batch(
    seeded: Seeded, suite: Suite, tmp_path: Path
) -> None:
    rng = random.Random(11)
    n = 2000
    one = ingest_process(suite, tmp_path / "a.log")
    two = ingest_process(suite, tmp_path / "b.log")
    await asyncio.gather(one.__aenter__(), two.__aenter__())
    try:
        async with (
            IngestClient(one.target, seeded.api_key, backoff=FAST, max_items=50) as a,
            IngestClient(two.target, seeded.api_key, backoff=FAST, max_items=73) as b,
        ):
            created = await a.create_batch(n, idempotency_key="two-clients")
            batch_id = created.batch.friendly_id
            replies = await asyncio.gather(
                a.stream_items(batch_id, shuffled_with_repeats(n, rng)),
                b.stream_items(batch_id, shuffled_with_repeats(n, rng)),
            )
            assert all(r.sealed and r.accepted_count == n for r in replies)
            await exactly_one_run_per_index(suite, batch_id, seeded.env_id, n)
            batch = await a.get_batch(batch_id)
            assert batch.sealed
            assert batch.accepted_count == n
    finally:
        await asyncio.gather(one.__aexit__(None, None, None), two.__aexit__(None, None, None))
