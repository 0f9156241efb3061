"""The drainer against real Redis and the 3-master Cluster, writing through an in-memory run
writer (the collaborator the run store replaces; Redis stays real)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

import pytest

from runops.kit.backoff import ExponentialBackoff
from runops.kit.redis import RedisClient
from services.mollifier.buffer import MollifierBuffer
from services.mollifier.drainer.drainer import (
    DRAIN_FAILED_CODE,
    Drainer,
    DrainItem,
    DrainKind,
    WriteResult,
    WriteStatus,
)
from services.mollifier.entries import EntryStatus
from services.mollifier.sweeper import StaleSweeper
from tests.mollifier.helpers import accept_all, now, snapshot


class MemoryWriter:
    """Keeps written runs by id (a repeated id is OK, as in the run store); `script` answers
    per call (a status for every item) before falling back to OK."""

    def __init__(self, script: Sequence[WriteStatus | Exception] = ()) -> None:
        self.runs: dict[str, DrainItem] = {}
        self.calls: list[list[DrainItem]] = []
        self.writes = Counter[str]()
        self._script = list(script)
        self.block: asyncio.Event | None = None
        self.called = asyncio.Event()

    async def create_runs(self, items: Sequence[DrainItem]) -> Sequence[WriteResult]:
        self.calls.append(list(items))
        self.called.set()
        if self.block is not None:
            await self.block.wait()
        if self._script:
            step = self._script.pop(0)
            if isinstance(step, Exception):
                raise step
            if step is not WriteStatus.OK:
                return [WriteResult(step, "run store said no")] * len(items)
        for item in items:
            self.runs[item.run.run_id] = item
            self.writes[item.run.run_id] += 1
        return [WriteResult(WriteStatus.OK)] * len(items)


def drainer_of(buffer: MollifierBuffer, writer: MemoryWriter, **kwargs: object) -> Drainer:
    options: dict[str, object] = {
        "batch_size": 200,
        "env_batch_size": 20,
        "backoff": ExponentialBackoff(base=0.01, cap=0.05),
        "idle_seconds": 0.01,
    }
    options.update(kwargs)
    return Drainer(buffer, writer, **options)  # type: ignore[arg-type]


async def run_until(
    drainers: Sequence[Drainer], done: Callable[[], Awaitable[bool]], *, polls: int
) -> None:
    """Runs `drainers` at once until `done()` (asked up to `polls` times, 20 ms apart), then
    stops them."""
    tasks = [asyncio.create_task(d.run()) for d in drainers]
    for _ in range(polls):
        if await done():
            break
        await asyncio.sleep(0.02)
    for d in drainers:
        d.request_stop()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)


async def drain_all(drainer: Drainer, buffer: MollifierBuffer, *, limit: int = 10_000) -> None:
    for _ in range(limit):
        report = await drainer.tick()
        if report.popped == 0 and not await buffer.environments():
            return
    raise AssertionError("the buffer did not drain")


async def test_five_thousand_entries_of_several_environments_drain_fairly_without_loss(
    buffer: MollifierBuffer,
) -> None:
    # org_a has one busy environment; org_b has three smaller ones.
    layout = {("org_a", "env_a1"): 2_000, ("org_b", "env_b1"): 1_000}
    layout |= {("org_b", "env_b2"): 1_000, ("org_b", "env_b3"): 1_000}
    created: dict[str, datetime] = {}

    async def fill(org: str, env: str, count: int) -> None:
        for _ in range(count):
            snap = snapshot(env, organization_id=org)
            created[snap.run_id] = now()
            await buffer.accept(snap, created_at=created[snap.run_id])

    await asyncio.gather(*(fill(org, env, n) for (org, env), n in layout.items()))
    writer = MemoryWriter()
    await drain_all(drainer_of(buffer, writer), buffer)

    assert len(writer.runs) == 5_000 == len(created)
    assert set(writer.runs) == set(created)
    assert max(writer.writes.values()) == 1  # no duplicates
    assert all(item.created_at == created[run_id] for run_id, item in writer.runs.items())
    # Fair: while both organizations had entries, each call carried both equally.
    for call in writer.calls[:5]:
        per_org = Counter(item.run.organization_id for item in call)
        assert per_org["org_a"] == per_org["org_b"] == 100
        # Interleaved, not one environment's block after another.
        assert call[0].run.organization_id != call[1].run.organization_id
    # org_b's environments take turns.
    served = [Counter(i.run.environment_id for i in call) for call in writer.calls[:3]]
    assert {env for s in served for env in s if env != "env_a1"} == {"env_b1", "env_b2", "env_b3"}
    assert await buffer.environments() == {}


async def test_several_drainers_at_once_write_each_run_once(buffer: MollifierBuffer) -> None:
    snaps = [snapshot(f"env_{i % 3}") for i in range(600)]
    await accept_all(buffer, snaps)
    writer = MemoryWriter()
    drainers = [drainer_of(buffer, writer, batch_size=50, env_batch_size=10) for _ in range(4)]

    async def all_written() -> bool:
        return len(writer.runs) == 600

    await run_until(drainers, all_written, polls=500)
    assert set(writer.runs) == {s.run_id for s in snaps}
    assert max(writer.writes.values()) == 1


async def test_a_drainer_abandoned_mid_write_is_recovered_by_another(
    buffer: MollifierBuffer,
) -> None:
    snaps = [snapshot("env_k") for _ in range(30)]
    await accept_all(buffer, snaps)
    stuck = MemoryWriter()
    stuck.block = asyncio.Event()  # the write never returns: as good as a dead process
    dead = drainer_of(buffer, stuck, batch_size=20, env_batch_size=20)
    dead_tick = asyncio.create_task(dead.tick())
    await asyncio.wait_for(stuck.called.wait(), 10)
    assert (await buffer.stats("env_k")).draining == 20

    writer = MemoryWriter()
    rescuer = drainer_of(
        buffer, writer, visibility_timeout_seconds=0.5, recovery_interval_seconds=0.1
    )
    await rescuer.tick()  # drains the 10 it can; 20 still DRAINING
    assert len(writer.runs) == 10
    await asyncio.sleep(0.6)
    await drain_all(rescuer, buffer)
    assert set(writer.runs) == {s.run_id for s in snaps}
    assert max(writer.writes.values()) == 1
    recovered = [writer.runs[s.run_id].entry for s in snaps[:20]]
    assert all(entry.attempts == 1 for entry in recovered)

    # The dead drainer wakes up: its late results change nothing (ack of finished entries).
    stuck.block.set()
    await asyncio.wait_for(dead_tick, 5)
    assert await buffer.size("env_k") == 0


@pytest.mark.parametrize("index", ["kept", "lost"])
async def test_entries_draining_with_nothing_queued_are_recovered_and_written(
    buffer: MollifierBuffer, redis: RedisClient, index: str
) -> None:
    # A drainer killed while its write was in flight: every entry of the environment DRAINING
    # under its token, none queued. "lost": it died inside forget_if_empty, between the HDEL
    # and the HSET back (the code before this test's fix could); the sweep's reindex repairs it.
    snaps = [snapshot("env_dead") for _ in range(5)]
    await accept_all(buffer, snaps)
    assert len(await buffer.pop("env_dead", 10, "dead:0")) == 5
    if index == "lost":
        await redis.hdel(buffer.global_keys.environments, "env_dead")
        report = await StaleSweeper(buffer).sweep_once()
        assert report is not None
        assert report.reindexed == 1
    writer = MemoryWriter()
    rescuer = drainer_of(
        buffer, writer, visibility_timeout_seconds=0.5, recovery_interval_seconds=0.1
    )

    async def written() -> bool:
        return len(writer.runs) == 5

    began = time.monotonic()
    await run_until([rescuer], written, polls=150)
    # Within the visibility timeout + a recovery interval and a tick (slack for a busy machine).
    assert time.monotonic() - began < 2.0
    assert set(writer.runs) == {s.run_id for s in snaps}
    assert await buffer.size("env_dead") == 0


async def test_retryable_failures_back_off_then_write_a_system_failure_run_after_three(
    buffer: MollifierBuffer,
) -> None:
    snap = snapshot("env_r")
    await buffer.accept(snap, created_at=now())
    writer = MemoryWriter([WriteStatus.RETRYABLE] * 3)
    drainer = drainer_of(buffer, writer, max_attempts=3)
    task = asyncio.create_task(drainer.run())
    for _ in range(500):
        if snap.run_id in writer.runs:
            break
        await asyncio.sleep(0.01)
    drainer.request_stop()
    await asyncio.wait_for(task, 5)
    kinds = [call[0].kind for call in writer.calls]
    assert kinds == [DrainKind.CREATE] * 3 + [DrainKind.FAILED]
    failed = writer.runs[snap.run_id]
    assert failed.error_code == DRAIN_FAILED_CODE
    assert "3 attempts" in failed.error_message
    entry = await buffer.get("env_r", snap.run_id)
    assert entry is not None
    assert entry.status is EntryStatus.FAILED


async def test_a_permanent_refusal_writes_a_failure_run_and_an_outage_costs_no_attempt(
    buffer: MollifierBuffer,
) -> None:
    refused, fine = snapshot("env_p"), snapshot("env_p")
    await buffer.accept(refused, created_at=now())
    writer = MemoryWriter([WriteStatus.PERMANENT])
    drainer = drainer_of(buffer, writer, batch_size=1, env_batch_size=1)
    await drainer.tick()
    await drainer.tick()
    assert writer.runs[refused.run_id].kind is DrainKind.FAILED

    await buffer.accept(fine, created_at=now())
    down = MemoryWriter([ConnectionError("run store down")] * 5)
    outage = drainer_of(buffer, down)
    for _ in range(5):
        report = await outage.tick()
        assert report.requeued == 1
    await outage.tick()
    assert down.runs[fine.run_id].kind is DrainKind.CREATE
    assert down.runs[fine.run_id].entry.attempts == 0


async def test_cancelled_and_mutated_entries_drain_as_changed(buffer: MollifierBuffer) -> None:
    cancelled, tagged = snapshot("env_c"), snapshot("env_c", tags=("a",))
    await buffer.accept(cancelled, created_at=now())
    await buffer.accept(tagged, created_at=now())
    await buffer.cancel("env_c", cancelled.run_id, "user asked")
    await buffer.add_tags("env_c", tagged.run_id, ["b"])
    writer = MemoryWriter()
    await drain_all(drainer_of(buffer, writer), buffer)
    assert writer.runs[cancelled.run_id].kind is DrainKind.CANCELLED
    assert writer.runs[cancelled.run_id].error_message == "user asked"
    assert list(writer.runs[tagged.run_id].run.options.tags) == ["a", "b"]


async def test_graceful_stop_requeues_what_a_cancelled_tick_holds(buffer: MollifierBuffer) -> None:
    snaps = [snapshot("env_s") for _ in range(5)]
    await accept_all(buffer, snaps)
    stuck = MemoryWriter()
    stuck.block = asyncio.Event()
    drainer = drainer_of(buffer, stuck)
    worker = drainer.worker(stop_timeout=0.2)
    worker.start()
    await asyncio.wait_for(stuck.called.wait(), 10)
    await worker.stopping()  # finish the tick in hand…
    assert await worker.stop()  # …which hangs: cancelled, and what it held is requeued
    stats = await buffer.stats("env_s")
    assert (stats.depth, stats.draining) == (5, 0)
    entries = await buffer.pop("env_s", 5, "next")
    assert [e.run_id for e in entries] == [s.run_id for s in snaps]
    assert all(e.attempts == 0 for e in entries)


class GatedWriter(MemoryWriter):
    """Holds every call until `gate` opens, counting the calls in flight at once."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = self.block = asyncio.Event()
        self.in_flight = 0
        self.peak = 0

    async def create_runs(self, items: Sequence[DrainItem]) -> Sequence[WriteResult]:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            return await super().create_runs(items)
        finally:
            self.in_flight -= 1


async def wait_for_calls(writer: MemoryWriter, count: int) -> None:
    for _ in range(500):
        if len(writer.calls) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(writer.calls)} writes in flight, expected {count}")


async def test_ticks_in_flight_are_bounded_and_a_stop_finishes_them(
    buffer: MollifierBuffer,
) -> None:
    snaps = [snapshot("env_q") for _ in range(100)]
    await accept_all(buffer, snaps)
    writer = GatedWriter()
    drainer = drainer_of(buffer, writer, batch_size=10, env_batch_size=10, pipeline_depth=3)
    task = asyncio.create_task(drainer.run())
    await wait_for_calls(writer, 3)
    await asyncio.sleep(0.2)  # room for a fourth tick, if the bound did not hold
    assert (len(writer.calls), writer.peak) == (3, 3)
    stats = await buffer.stats("env_q")
    assert (stats.depth, stats.draining) == (70, 30)
    # Distinct owners, disjoint entries, in queue order across the ticks.
    taken = [item.run.run_id for call in writer.calls for item in call]
    assert taken == [s.run_id for s in snaps[:30]]

    drainer.request_stop()
    writer.gate.set()
    await asyncio.wait_for(task, 10)
    # The three ticks in flight were written and acked; nothing else was taken.
    assert set(writer.runs) == {s.run_id for s in snaps[:30]}
    assert max(writer.writes.values()) == 1
    stats = await buffer.stats("env_q")
    assert (stats.depth, stats.draining) == (70, 0)


async def test_a_cancelled_drainer_requeues_every_tick_in_flight(buffer: MollifierBuffer) -> None:
    snaps = [snapshot("env_x") for _ in range(40)]
    await accept_all(buffer, snaps)
    writer = GatedWriter()
    drainer = drainer_of(buffer, writer, batch_size=10, env_batch_size=10, pipeline_depth=3)
    task = asyncio.create_task(drainer.run())
    await wait_for_calls(writer, 3)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    assert writer.in_flight == 0
    assert not writer.runs
    stats = await buffer.stats("env_x")
    assert (stats.depth, stats.draining) == (40, 0)
    entries = await buffer.pop("env_x", 40, "next")
    assert sorted(e.run_id for e in entries) == sorted(s.run_id for s in snaps)
    assert all(e.attempts == 0 for e in entries)


async def test_a_pipelined_drainer_drains_several_environments_once(
    buffer: MollifierBuffer,
) -> None:
    snaps = [snapshot(f"env_m{i % 4}", organization_id=f"org_{i % 2}") for i in range(1_000)]
    await accept_all(buffer, snaps)
    writer = MemoryWriter()
    drainers = [drainer_of(buffer, writer, batch_size=40, pipeline_depth=4) for _ in range(2)]

    async def all_drained() -> bool:
        return len(writer.runs) == len(snaps) and not await buffer.environments()

    await run_until(drainers, all_drained, polls=1_000)
    assert set(writer.runs) == {s.run_id for s in snaps}
    assert max(writer.writes.values()) == 1
    assert await buffer.environments() == {}
