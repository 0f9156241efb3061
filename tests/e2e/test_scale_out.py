"""Two server processes of every service at once: the suite's own targets list both
(`ipv4:a,b`), so every client and every service spreads its calls over them with round_robin,
and each process serves some (read from each process's own metrics endpoint)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.ingest.v1 import ingest_pb2 as ing
from runops.mollifier.v1 import mollifier_pb2 as m
from runops.runstore.v1 import runstore_pb2 as rs
from tests.e2e.conftest import REPLICAS
from tests.e2e.suite import Clients, code_of, handled_calls, new_tenant

CALLS = 20


async def test_every_process_of_every_service_serves_calls(clients: Clients) -> None:
    metrics = clients.endpoints.metrics
    if not metrics:
        pytest.skip(f"{clients.endpoints.source}: per-process metrics are known only locally")
    tenant = await new_tenant(clients.admin)
    env = tenant.environment_id
    api = clients.ingest(tenant.api_key)
    calls: dict[str, tuple[str, Callable[[], Awaitable[object]]]] = {
        "controlplane": (
            "GetEnvironment",
            lambda: clients.controlplane.GetEnvironment(
                cp.GetEnvironmentRequest(environment_id=env)
            ),
        ),
        "runstore": (
            "GetRun",
            lambda: clients.runstore.GetRun(rs.GetRunRequest(run_id="run_x", environment_id=env)),
        ),
        "mollifier": (
            "GetBufferStats",
            lambda: clients.mollifier.GetBufferStats(m.GetBufferStatsRequest(environment_id=env)),
        ),
        "ingest": ("GetBatch", lambda: api.GetBatch(ing.GetBatchRequest(batch_id="batch_x"))),
    }
    assert set(calls) == set(metrics)
    for service, (method, call) in calls.items():
        urls = metrics[service]
        assert len(urls) == REPLICAS, service
        before = [await asyncio.to_thread(handled_calls, url, method) for url in urls]
        for _ in range(CALLS):
            await code_of(call())  # answered (NOT_FOUND is an answer) by one process
        after = [await asyncio.to_thread(handled_calls, url, method) for url in urls]
        served = [b - a for a, b in zip(before, after, strict=True)]
        assert sum(served) == CALLS, (service, served)
        assert all(n > 0 for n in served), f"{service}: a process served nothing: {served}"
