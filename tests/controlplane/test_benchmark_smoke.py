"""The control-plane benchmark runs end to end on the session's stack and its figures add up."""

from __future__ import annotations

from runops.bench.controlplane import run
from runops.localstack import LocalStack


async def test_benchmark_smoke(stack: LocalStack) -> None:
    keys, concurrency = 3, 4
    result = await run(stack, seconds=0.5, concurrency=concurrency, keys=keys)

    for phase in (result.cached, result.uncached, result.health, result.client, result.floor):
        assert phase.errors == {}, f"{phase.name}: failed calls {phase.errors}"
        assert phase.calls > 0, phase.name
        assert phase.per_second > 0, phase.name
        assert 0 < phase.p50_ms <= phase.p99_ms, phase.name
        assert phase.seconds >= 0.5, phase.name
    assert result.ratio > 0
    assert result.uncached_ratio > 0
    assert result.client_ratio > 0

    cached, uncached = result.cached, result.uncached
    assert cached.cache_hits is not None
    assert cached.cache_misses is not None
    assert cached.server_ok is not None
    # Every key was cached during the warm-up: the measured calls were all served by the cache,
    # and the server handled (within the calls in flight at either edge) what the client counted.
    assert result.cached_entries == keys
    assert cached.cache_misses == 0
    assert abs(cached.cache_hits - cached.calls) <= 2 * concurrency
    assert abs(cached.server_ok - cached.calls) <= 2 * concurrency
    # The uncached control plane looked every call up (or joined a lookup in flight).
    assert uncached.cache_hits is not None
    assert uncached.cache_misses is not None
    assert uncached.cache_shared is not None
    assert uncached.cache_misses > 0
    assert uncached.cache_hits <= uncached.calls // 100 + 1
    lookups = uncached.cache_misses + uncached.cache_shared
    assert abs(lookups - uncached.calls) <= 2 * concurrency

    # ControlPlaneClient answered every measured call from its own cache (filled before the
    # warm-up, its invalidation subscription live throughout): none reached the control plane.
    client = result.client
    assert client.cache_hits is not None
    assert client.cache_misses == 0, client
    # The counters are sampled when the window's timer fires, late by however long a busy
    # machine delays it: at a cache hit's rate that can be thousands more hits than the window
    # counted, never fewer than its calls less those already in flight at its start.
    assert client.cache_hits >= client.calls - concurrency, client
    assert client.server_ok == 0, client

    report = result.report()
    assert "cached / floor" in report
    assert "client cached / floor" in report
    assert "who did what" in report
