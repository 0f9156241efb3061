"""Single triggers under a burst: the mollifier buffers what the gate holds back, every caller
gets its run id at once, and every run reaches the run store with that id."""

from __future__ import annotations

import asyncio

import pytest

from runops.common.v1 import common_pb2
from runops.mollifier.v1 import mollifier_pb2 as m
from tests.e2e.suite import Clients, eventually, new_tenant

TASK = "e2e/burst"
TRIGGERS = 1500
CALLERS = 50


def trigger(environment_id: str, n: int) -> m.TriggerRequest:
    return m.TriggerRequest(
        environment_id=environment_id,
        task_identifier=TASK,
        payload=f'{{"n":{n}}}'.encode(),
        payload_type="application/json",
    )


@pytest.mark.slow
async def test_a_burst_of_single_triggers_reaches_the_run_store(clients: Clients) -> None:
    tenant = await new_tenant(clients.admin, mollifier=True)
    env = tenant.environment_id
    replies: list[m.TriggerResponse] = []

    async def caller(first: int) -> None:
        for n in range(first, TRIGGERS, CALLERS):
            replies.append(await clients.mollifier.Trigger(trigger(env, n)))

    await asyncio.gather(*(caller(i) for i in range(CALLERS)))
    shown = {r.run.friendly_id: r.run for r in replies}
    assert len(shown) == TRIGGERS, "every trigger got a run id of its own"
    assert all(r.run.environment_id == env for r in replies)
    buffered = [r for r in replies if r.buffered]
    assert all(r.run.status == common_pb2.RUN_STATUS_QUEUED and r.notice for r in buffered)
    print(f"\nburst: {len(buffered)} of {TRIGGERS} triggers buffered")
    if clients.endpoints.metrics:  # our own suite's gate trips at 20 per window
        assert buffered, "the gate tripped"

    async def drained() -> bool:
        stats = await clients.mollifier.GetBufferStats(m.GetBufferStatsRequest(environment_id=env))
        return all(s.depth == 0 and s.draining == 0 for s in stats.environments)

    waited = await eventually(drained, limit=90, what="the buffer drained")
    print(f"burst: buffer empty {waited:.1f}s after the last trigger")

    # Every run, read back through the mollifier (run store first, then the buffer): in the
    # run store now, with the id and creation time its caller was shown.
    limit = asyncio.Semaphore(CALLERS)

    async def read(run_id: str) -> common_pb2.Run:
        async with limit:
            reply = await clients.mollifier.GetRun(
                m.GetRunRequest(environment_id=env, run_id=run_id)
            )
            return reply.run

    stored = await asyncio.gather(*(read(run_id) for run_id in shown))
    assert not [r.friendly_id for r in stored if r.buffered], "a run is still only buffered"
    for run in stored:
        assert run.created_at == shown[run.friendly_id].created_at, run.friendly_id
        assert run.task_identifier == TASK
