"""The group commit of pass-through creates through the real service and run store: concurrent
triggers that pass the gate share `CreateRuns` calls and each caller gets its own run, written
once; with the run store down each caller gets UNAVAILABLE (retryable), as with `CreateRun`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC

import grpc

from runops.localstack import LocalStack
from services.mollifier.app import Mollifier
from tests.controlplane.harness import Seeded
from tests.mollifier.service_harness import body, runs_in_postgres, stub, trigger_request
from tests.runstore.harness import start_on_stack

Factory = Callable[..., Awaitable[Mollifier]]
# Every trigger passes the gate; batches wait long enough to gather the concurrent callers.
OPEN = {"gate_threshold": 100_000, "drainer_enabled": False}


async def test_concurrent_pass_throughs_each_get_their_own_run_written_once(
    services: Factory, env: Seeded, stack: LocalStack
) -> None:
    service = await services(**OPEN, create_batch_max_wait_seconds=0.05)
    client = stub(service.app.target)
    calls = 0
    create_runs = service.run_store.create_runs

    async def counted(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        return await create_runs(*args, **kwargs)  # type: ignore[arg-type]

    service.run_store.create_runs = counted  # type: ignore[method-assign,assignment]
    requests = [trigger_request(env.env_id, payload=f'{{"i": {i}}}'.encode()) for i in range(40)]
    replies = await asyncio.gather(*(client.Trigger(request) for request in requests))
    assert not any(reply.buffered for reply in replies)
    assert [reply.run.payload for reply in replies] == [request.payload for request in requests]
    ids = [reply.run.friendly_id for reply in replies]
    assert len(set(ids)) == 40
    assert 1 <= calls < 40, "the callers shared CreateRuns calls"
    stored = await runs_in_postgres(stack, env.env_id)
    assert set(stored) == {body(run_id) for run_id in ids}
    for reply in replies:
        assert stored[body(reply.run.friendly_id)] == reply.run.created_at.ToDatetime(tzinfo=UTC)


async def test_with_the_run_store_down_each_caller_gets_unavailable(
    services: Factory, env: Seeded, stack: LocalStack
) -> None:
    store = await start_on_stack(stack, split=True, name="runstore-group-commit-down")
    try:
        service = await services(**OPEN, runstore_target=store.app.target)
    finally:
        await store.app.stop(grace=0.5)
    client = stub(service.app.target)

    async def trigger() -> grpc.StatusCode:
        try:
            await client.Trigger(trigger_request(env.env_id))
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    codes = await asyncio.gather(*(trigger() for _ in range(20)))
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 20
