"""The rows every benchmark hands to `runops bench`, and the one table they make (spec §7):
benchmark, figure, raw floor, ratio, target, met or not."""

from __future__ import annotations

import statistics
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
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
    # min-max of `value` over repeated measurements (None: one window of >= 10 s).
    spread: tuple[float, float] | None = None

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
        spread: tuple[float, float] | None = None,
    ) -> Row:
        """A figure beside its floor; the target is on value / floor."""
        ratio = value / floor if floor else 0.0
        return cls(
            benchmark, figure, value, unit, floor, floor_name, ratio, target,
            _met(ratio, at_least, at_most), spread,
        )  # fmt: skip

    @classmethod
    def repeated(
        cls, benchmark: str, figure: str, values: Repeated, unit: str, floor: Repeated,
        floor_name: str, *, target: str = "", at_least: float | None = None,
    ) -> Row:  # fmt: skip
        """A figure beside its floor, both measured several times: the medians (and their
        ratio), the spread of the figure (none for a single measurement: `--smoke`)."""
        return cls.against(
            benchmark, figure, values.median, unit, floor.median, floor_name, target=target,
            at_least=at_least, spread=values.spread if len(values.values) > 1 else None,
        )  # fmt: skip


@dataclass(frozen=True)
class Repeated:
    """One figure measured several times (a phase shorter than 10 s, spec §7): the median is
    the figure, min-max its spread."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.values), max(self.values)


REPETITIONS = 3


async def repeat(times: int, measure: Callable[[int], Awaitable[float]]) -> Repeated:
    """`measure(i)` for i in 0..times-1, one after the other."""
    return Repeated(tuple([await measure(i) for i in range(times)]))


def _met(ratio: float, at_least: float | None, at_most: float | None) -> bool | None:
    if at_least is None and at_most is None:
        return None
    return (at_least is None or ratio >= at_least) and (at_most is None or ratio <= at_most)


def number(value: float, unit: str) -> str:
    if unit in ("MiB", "ms", "x"):
        return f"{value:,.1f} {unit}"
    return f"{value:,.0f} {unit}"


def spread(row: Row) -> str:
    """`low-high` without the unit ("": a single window)."""
    if row.spread is None:
        return ""
    low, high = (number(v, row.unit).rsplit(" ", 1)[0] for v in row.spread)
    return f"{low}-{high}"


def table(rows: Sequence[Row]) -> str:
    """A Markdown table (readable in a terminal too)."""
    head = ("benchmark", "figure", "value", "spread", "raw floor", "ratio", "target", "met")
    body = []
    for row in rows:
        floor = "" if row.floor is None else f"{number(row.floor, row.unit)} ({row.floor_name})"
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}"
        met = {None: "", True: "yes", False: "**NO**"}[row.met]
        body.append(
            (row.benchmark, row.figure, number(row.value, row.unit), spread(row), floor, ratio,
             row.target, met)
        )  # fmt: skip
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
