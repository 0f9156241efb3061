"""The mollifier benchmark runs end to end on the session's stack (services and the drainers as
processes, tiny sizes, not timed) and its figures and rows add up."""

from __future__ import annotations

from runops.bench.mollifier import run
from runops.bench.report import table
from runops.bench.suite import SIZES
from runops.localstack import LocalStack


async def test_mollifier_benchmark_smoke(stack: LocalStack) -> None:
    size = SIZES["mollifier"]["smoke"]
    # A low gate threshold so the tiny burst trips it and the drainers have work.
    result = await run(stack, **size, gate_threshold=10)

    # The run itself checked every trigger answered with a distinct id and that Postgres holds
    # exactly those runs; here the figures.
    assert result.triggers == size["triggers"]
    assert result.callers == size["callers"]
    assert len(result.floor_seconds) == size["repetitions"]
    assert all(seconds > 0 for seconds in result.floor_seconds)
    assert result.configurations == [1, 2]  # 1 and 2 server processes (and drainers)
    assert len(result.cycles) == 2 * size["repetitions"]
    for cycle in result.cycles:
        assert cycle.drainers == cycle.processes
        assert cycle.burst_seconds > 0
        assert cycle.empty_seconds > 0
        assert 0 < cycle.p50_ms <= cycle.p99_ms
        assert 0 < cycle.buffered < cycle.triggers
        # Everything not buffered passed the gate and was in Postgres when the burst ended;
        # the drainers wrote the rest.
        assert cycle.in_postgres_after_burst == cycle.triggers - cycle.buffered
        assert 0 < cycle.drained <= cycle.buffered
        assert cycle.drain_seconds > 0
    assert result.durability["fsync"] in ("on", "off")

    rows = result.rows()
    assert [row.unit for row in rows] == ["triggers/s", "ms", "runs/s"] * 2
    assert [row.benchmark for row in rows] == ["mollifier"] * 6
    accepted, p99, drain = rows[:3]
    assert accepted.floor_name == "empty unary RPC"
    assert accepted.floor == result.of(1)[0].empty_rate > 0
    assert accepted.met is not None
    assert p99.met is (p99.value <= 50)
    assert drain.floor_name == "unnest INSERT"
    assert drain.floor == result.floor_rate > 0
    assert drain.met is not None
    assert "2 processes" in rows[3].figure
    assert "2 drainers" in rows[5].figure
    rendered = table(rows)
    assert rendered.count("\n") == len(rows) + 1
    assert "drain into Postgres" in rendered
    assert "mollifier burst" in result.report()
