"""The bounded-concurrency engine: the bound holds (instrumented), 1 is strictly sequential, the
producer is pulled lazily, the first failure stops pulling and propagates after in-flight work,
cancellation cancels in-flight work."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY

from services.ingest.pipeline import Pipeline, process_peak_in_flight, split_units

LIVENESS = 10.0  # generous bound for anything that must finish


class Producer:
    """An async iterator of 0..n-1 that records how far it was pulled."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at
        self.pulled = 0
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[int]:
        try:
            for i in range(self.n):
                await asyncio.sleep(0)
                if i == self.fail_at:
                    raise ValueError(f"bad message {i}")
                self.pulled += 1
                yield i
        finally:
            self.closed = True


def gauge(name: str) -> float:
    value = REGISTRY.get_sample_value(name)
    assert value is not None, name
    return value


@pytest.mark.parametrize("concurrency", [1, 3, 10])
async def test_in_flight_never_exceeds_the_bound(concurrency: int) -> None:
    pipeline: Pipeline[int] = Pipeline(concurrency)
    producer = Producer(200)
    seen_in_flight: list[int] = []
    done: list[int] = []

    async def work(unit: int) -> None:
        seen_in_flight.append(pipeline.in_flight)
        await asyncio.sleep(random.uniform(0, 0.003))
        # Never more pulled-and-unfinished units than slots.
        assert producer.pulled - len(done) <= concurrency
        done.append(unit)

    assert await asyncio.wait_for(pipeline.run(aiter(producer), work), LIVENESS) == 200
    assert sorted(done) == list(range(200))
    assert max(seen_in_flight) <= concurrency
    assert pipeline.peak_in_flight == concurrency  # the bound is also reached
    assert pipeline.in_flight == 0
    assert process_peak_in_flight() >= concurrency
    assert gauge("runops_ingest_stream_units_in_flight_peak") == process_peak_in_flight()
    assert gauge("runops_ingest_units_in_flight") == 0


async def test_concurrency_one_is_strictly_sequential() -> None:
    pipeline: Pipeline[int] = Pipeline(1)
    producer = Producer(50)
    events: list[str] = []

    async def work(unit: int) -> None:
        events.append(f"start {unit} pulled {producer.pulled}")
        await asyncio.sleep(0.001)
        await asyncio.sleep(0)
        events.append(f"end {unit}")

    await asyncio.wait_for(pipeline.run(aiter(producer), work), LIVENESS)
    # start 0, end 0, start 1, end 1, ...; and unit k+1 is pulled only after unit k ended.
    expected = []
    for i in range(50):
        expected += [f"start {i} pulled {i + 1}", f"end {i}"]
    assert events == expected
    assert pipeline.peak_in_flight == 1


async def test_producer_is_pulled_lazily() -> None:
    pipeline: Pipeline[int] = Pipeline(4)
    producer = Producer(1000)
    release = asyncio.Event()

    async def work(_unit: int) -> None:
        await release.wait()

    run = asyncio.create_task(pipeline.run(aiter(producer), work))
    for _ in range(100):
        await asyncio.sleep(0)
    # Every slot is busy: exactly 4 units pulled, nothing read ahead (backpressure).
    assert producer.pulled == 4
    assert pipeline.in_flight == 4
    release.set()
    assert await asyncio.wait_for(run, LIVENESS) == 1000


async def test_first_failure_stops_pulling_waits_for_in_flight_and_propagates() -> None:
    pipeline: Pipeline[int] = Pipeline(3)
    producer = Producer(1000)
    finished: list[int] = []

    async def work(unit: int) -> None:
        if unit == 5:
            raise RuntimeError("unit 5 failed")
        await asyncio.sleep(0.05 if unit in (6, 7) else 0)
        finished.append(unit)

    with pytest.raises(RuntimeError, match="unit 5 failed"):
        await asyncio.wait_for(pipeline.run(aiter(producer), work), LIVENESS)
    # Pulling stopped right away: at most the units that were already in flight.
    assert producer.pulled <= 5 + 3
    # Units in flight when 5 failed were allowed to finish (what they wrote stays written).
    assert set(range(5)) <= set(finished)
    assert {u for u in (6, 7) if u < producer.pulled} <= set(finished)
    assert pipeline.in_flight == 0
    assert producer.closed


async def test_a_failing_producer_propagates_after_in_flight_work() -> None:
    pipeline: Pipeline[int] = Pipeline(3)
    producer = Producer(100, fail_at=10)
    finished: list[int] = []

    async def work(unit: int) -> None:
        await asyncio.sleep(0.01)
        finished.append(unit)

    with pytest.raises(ValueError, match="bad message 10"):
        await asyncio.wait_for(pipeline.run(aiter(producer), work), LIVENESS)
    assert sorted(finished) == list(range(10))  # everything pulled before it was processed


async def test_failure_while_the_client_is_idle_ends_the_run() -> None:
    """A unit fails while the producer waits for a message that never comes."""
    pipeline: Pipeline[int] = Pipeline(2)
    never = asyncio.Event()

    async def idle_after_one() -> AsyncIterator[int]:
        yield 0
        await never.wait()
        yield 1

    async def work(_unit: int) -> None:
        raise RuntimeError("store down")

    with pytest.raises(RuntimeError, match="store down"):
        await asyncio.wait_for(pipeline.run(idle_after_one(), work), LIVENESS)


async def test_cancellation_cancels_in_flight_work() -> None:
    pipeline: Pipeline[int] = Pipeline(3)
    started = 0
    cancelled = 0
    all_started = asyncio.Event()

    async def work(_unit: int) -> None:
        nonlocal started, cancelled
        started += 1
        if started == 3:
            all_started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled += 1
            raise

    run = asyncio.create_task(pipeline.run(aiter(Producer(100)), work))
    await asyncio.wait_for(all_started.wait(), LIVENESS)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(run, LIVENESS)
    assert cancelled == 3
    assert pipeline.in_flight == 0
    assert gauge("runops_ingest_units_in_flight") == 0


async def test_a_pipeline_runs_once_and_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        Pipeline(0)
    pipeline: Pipeline[int] = Pipeline(1)

    async def work(_unit: int) -> None:
        return None

    assert await pipeline.run(aiter(Producer(3)), work) == 3
    with pytest.raises(RuntimeError, match="runs once"):
        await pipeline.run(aiter(Producer(3)), work)


async def test_split_units() -> None:
    async def chunks() -> AsyncIterator[list[int]]:
        yield list(range(7))
        yield [7]
        yield []
        yield list(range(8, 12))

    units = [u async for u in split_units(chunks(), 3)]
    assert units == [[0, 1, 2], [3, 4, 5], [6], [7], [8, 9, 10], [11]]
    with pytest.raises(ValueError, match="max_items"):
        [u async for u in split_units(chunks(), 0)]
