"""The mollifier benchmark runs end to end on the session's stack (services and the drainer as
processes, tiny sizes, not timed) and its figures and rows add up."""

from __future__ import annotations

from runops.bench.mollifier import run
from runops.bench.report import table
from runops.bench.suite import SIZES
from runops.localstack import LocalStack


async def test_mollifier_benchmark_smoke(stack: LocalStack) -> None:
    size = SIZES["mollifier"]["smoke"]
    # A low gate threshold so the tiny burst trips it and the drainer has work.
    result = await run(stack, **size, gate_threshold=10)

    # The run itself checked every trigger answered with a distinct id and that Postgres holds
    # exactly those runs; here the figures.
    assert result.triggers == size["triggers"]
    assert result.callers == size["callers"]
    assert result.burst_seconds > 0
    assert result.floor_seconds > 0
    assert 0 < result.p50_ms <= result.p99_ms
    assert 0 < result.buffered < result.triggers
    # Everything not buffered passed the gate and was in Postgres when the burst ended; the
    # drainer wrote the rest.
    assert result.in_postgres_after_burst == result.triggers - result.buffered
    assert 0 < result.drained <= result.buffered
    assert result.drain_seconds > 0
    assert result.durability["fsync"] in ("on", "off")

    rows = result.rows()
    assert [row.unit for row in rows] == ["triggers/s", "ms", "runs/s"]
    assert [row.benchmark for row in rows] == ["mollifier"] * 3
    drain = rows[2]
    assert drain.floor_name == "unnest INSERT"
    assert drain.floor == result.floor_rate > 0
    assert drain.met is not None
    rendered = table(rows)
    assert rendered.count("\n") == len(rows) + 1
    assert "drain into Postgres" in rendered
    assert "mollifier burst" in result.report()
