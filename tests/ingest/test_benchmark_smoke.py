"""The ingest benchmark runs end to end on the session's stack (services as processes, tiny
sizes, not timed) and its figures and rows add up."""

from __future__ import annotations

from runops.bench.ingest import run
from runops.bench.report import table
from runops.bench.suite import SIZES
from runops.localstack import LocalStack


async def test_ingest_benchmark_smoke(stack: LocalStack) -> None:
    # Two repetitions of the short phases (smoke sizes have one): the rows get their spread.
    size = SIZES["ingest"]["smoke"] | {"repetitions": 2}
    result = await run(stack, **size)

    # Every batch was checked sealed whole, its runs counted in Postgres (offloaded ones by
    # payload type) before a figure was kept; here the figures themselves.
    for figure in (
        result.small_seconds,
        result.small_2_seconds,
        result.floor_unnest_seconds,
        result.floor_copy_seconds,
    ):
        assert len(figure) == size["repetitions"]
        assert all(seconds > 0 for seconds in figure)
    for large in (result.large_c1, result.large_c10):
        assert large.seconds > 0
        assert 0 < large.idle_kib <= large.peak_kib, large
    assert result.large_c1.concurrency == 1
    assert result.large_c10.concurrency == 10
    assert result.rss_at_mark_kib > 0
    assert result.rss_at_end_kib > 0
    assert result.durability["fsync"] in ("on", "off")

    rows = result.rows()
    figures = [row.figure for row in rows]
    assert figures == [
        "small items end to end",
        "small items end to end",
        "small items end to end, 2 processes",
        "256 KiB offloaded, c=10 vs c=1",
        "peak RSS, c=10",
        "peak RSS, c=1",
        "RSS at 100 items",
    ]
    assert [row.floor_name for row in rows[:3]] == ["unnest INSERT", "COPY", "unnest INSERT"]
    for row in rows[:3]:  # repeated figures: the median, within its spread
        assert row.spread is not None
        assert row.spread[0] <= row.value <= row.spread[1]
    for row in rows:
        assert row.benchmark == "ingest"
        assert row.ratio is not None
        assert row.ratio > 0
        assert row.met is not None, row  # every ingest row has a target
    rendered = table(rows)
    assert rendered.count("\n") == len(rows) + 1
    assert "c=10 vs c=1" in rendered
    assert "ingest" in result.report()
