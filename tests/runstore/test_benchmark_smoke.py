"""The run-store benchmark runs end to end on the session's stack (the service as its own
process) and its table has every row."""

from __future__ import annotations

import pytest

from runops.bench.runstore import run
from runops.localstack import LocalStack

pytestmark = pytest.mark.slow


async def test_benchmark_smoke(stack: LocalStack) -> None:
    items = 2_000
    result = await run(
        stack,
        seconds=0.5,
        concurrency=2,
        write_concurrency=1,
        chunk=50,
        runs=20,
        batch_items=items,
        batch_chunk=500,
    )

    for phase in result.phases():
        assert phase.errors == {}, f"{phase.name}: failed calls {phase.errors}"
        assert phase.calls > 0, phase.name
        assert phase.per_second > 0, phase.name
        assert 0 < phase.p50_ms <= phase.p99_ms, phase.name
        assert phase.seconds >= 0.5, phase.name
        assert phase.service_cores is not None, phase.name  # the service is a local process
    for phase in (result.create_runs, result.floor_insert_runs, result.accept):
        assert phase.rows == phase.calls * 50, phase.name  # whole chunks, each written once
    assert result.get_run_overhead > 0
    assert result.get_run_share > 0  # routed GetRun / the bare servicer's
    assert result.get_run_2 is not None  # and on a run store of 2 processes
    assert result.create_runs_2 is not None
    assert result.create_runs_2.rows == result.create_runs_2.calls * 50
    assert result.create_runs_share > 0
    assert result.accept_share > 0
    assert result.durability["synchronous_commit"] == "off"  # the local stack's setting

    batch = result.batch
    assert batch.figures["listed"] == items
    assert batch.figures["duplicates"] > 0
    assert batch.figures["missing_end_ranges"] == len(range(997 // 2, items, 997))
    for rss in (batch.rss_tenth_kib, batch.rss_all_kib, batch.rss_listed_kib, batch.hwm_kib):
        assert rss is not None
        assert rss > 10 * 1024  # a Python gRPC server holds more than 10 MiB
    assert batch.rss_ratio is not None

    report = result.report()
    for phase in result.phases():
        assert phase.name in report
    for line in (
        "of the bare servicer's",
        "raw / routed",
        "CreateRuns:",
        "AcceptBatchItems:",
        "service RSS",
        "durability",
    ):
        assert line in report
