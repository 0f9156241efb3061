"""The rows every benchmark hands to `runops bench`, and the one table they make (spec §7):
benchmark, figure, raw floor, ratio, target, met or not."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import asyncpg

# What changes Postgres' durability (the local stack turns the first three off for speed).
DURABILITY_SETTINGS = ("synchronous_commit", "fsync", "full_page_writes", "wal_level")

Check = Callable[[float], bool]


@dataclass(frozen=True)
class Row:
    """One line of the table. `ratio` is value / floor when both are given (or a figure's own
    ratio, e.g. a speedup, with no floor); `met` is None when the row has no target."""

    benchmark: str
    figure: str
    value: float
    unit: str
    floor: float | None = None
    floor_name: str = ""
    ratio: float | None = None
    target: str = ""
    met: bool | None = None

    @classmethod
    def against(
        cls,
        benchmark: str,
        figure: str,
        value: float,
        unit: str,
        floor: float,
        floor_name: str,
        *,
        target: str = "",
        at_least: float | None = None,
        at_most: float | None = None,
    ) -> Row:
        """A figure beside its floor; the target is on value / floor."""
        ratio = value / floor if floor else 0.0
        return cls(
            benchmark, figure, value, unit, floor, floor_name, ratio, target,
            _met(ratio, at_least, at_most),
        )  # fmt: skip


def _met(ratio: float, at_least: float | None, at_most: float | None) -> bool | None:
    if at_least is None and at_most is None:
        return None
    return (at_least is None or ratio >= at_least) and (at_most is None or ratio <= at_most)


def number(value: float, unit: str) -> str:
    if unit in ("MiB", "ms", "x"):
        return f"{value:,.1f} {unit}"
    return f"{value:,.0f} {unit}"


def table(rows: Sequence[Row]) -> str:
    """A Markdown table (readable in a terminal too)."""
    head = ("benchmark", "figure", "value", "raw floor", "ratio", "target", "met")
    body = []
    for row in rows:
        floor = "" if row.floor is None else f"{number(row.floor, row.unit)} ({row.floor_name})"
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}"
        met = {None: "", True: "yes", False: "**NO**"}[row.met]
        body.append(
            (row.benchmark, row.figure, number(row.value, row.unit), floor, ratio, row.target, met)
        )
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]

    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join(
        [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)]
    )


def settings(values: Mapping[str, str]) -> str:
    """Settings as the reports print them: `name=value, ...`."""
    return ", ".join(f"{name}={value}" for name, value in values.items())


def cores(value: float | None) -> str:
    """A CPU figure in cores for a report's column ("-": not measurable here)."""
    return "-" if value is None else f"{value:.2f}"


async def durability(dsn: str) -> dict[str, str]:
    """The durability settings of the server behind `dsn`, as SHOW prints them."""
    conn = await asyncpg.connect(dsn)
    try:
        return {name: str(await conn.fetchval(f"SHOW {name}")) for name in DURABILITY_SETTINGS}
    finally:
        await conn.close()
