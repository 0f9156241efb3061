"""`runops bench`'s table and its composition (no servers: the benchmarks themselves have smoke
tests beside their services)."""

from __future__ import annotations

from runops.bench.report import Repeated, Row, table
from runops.bench.suite import BENCHMARKS, SIZES, controlplane_rows
from runops.cli.bench import durability_lines
from runops.cli.main import build_parser


def test_rows_and_table() -> None:
    rows = [
        Row.against("ingest", "small", 600, "items/s", 1000, "unnest", target=">= 0.5",
                    at_least=0.5),
        Row.against("ingest", "small", 300, "items/s", 1000, "COPY", target=">= 0.5",
                    at_least=0.5),
        Row.against("run store", "GetRun", 500, "calls/s", 1000, "raw"),
    ]  # fmt: skip
    assert [row.met for row in rows] == [True, False, None]
    assert rows[0].ratio == 0.6
    lines = table(rows).splitlines()
    assert len(lines) == 5
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == [
        "benchmark", "figure", "value", "spread", "raw floor", "ratio", "target", "met",
    ]  # fmt: skip
    assert "yes" in lines[2]
    assert "**NO**" in lines[3]
    assert lines[4].split("|")[-2].strip() == ""  # no target: neither met nor missed


def test_a_repeated_figure_is_its_median_with_its_spread() -> None:
    figure, floor = Repeated((900.0, 1200.0, 1000.0)), Repeated((2100.0, 1900.0, 2000.0))
    row = Row.repeated("ingest", "small", figure, "items/s", floor, "unnest", at_least=0.5)
    assert (row.value, row.floor, row.ratio) == (1000.0, 2000.0, 0.5)
    assert row.met is True
    assert row.spread == (900.0, 1200.0)
    cells = [cell.strip() for cell in table([row]).splitlines()[2].strip("|").split("|")]
    assert cells[2:4] == ["1,000 items/s", "900-1,200"]


def test_every_benchmark_has_both_sizes() -> None:
    assert set(SIZES) == set(BENCHMARKS)
    for name, sizes in SIZES.items():
        assert set(sizes) == {"full", "smoke"}, name


def test_controlplane_rows_from_a_result() -> None:
    class Phase:
        def __init__(self, rate: float) -> None:
            self.per_second = rate

    class Result:
        floor, client, cached, health = Phase(4000), Phase(80_000), Phase(1600), Phase(2000)

    rows = controlplane_rows(Result())
    assert rows[0].ratio == 20
    assert rows[0].met is True
    assert rows[1].met is None
    assert rows[2].floor_name == "empty RPC, same server"
    assert rows[2].ratio == 0.8


def test_command_is_registered() -> None:
    args = build_parser().parse_args(["bench", "--durable", "--only", "ingest"])
    assert args.durable
    assert args.only == ["ingest"]
    lines = durability_lines({"fsync": "on", "synchronous_commit": "on"}, durable=True)
    assert "fsync=on" in lines[1]
    assert "appendfsync everysec" in lines[2]
