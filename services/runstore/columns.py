"""The bulk writes' rows as columns (struct of arrays): what `CreateRuns` and `AcceptBatchItems`
hand to one `unnest` statement, built without a Python object per row, and what they answer.

A column is a list with one value per run, or None when every run holds `RunRow`'s default for
that field (most fields of most chunks: nothing to build, and NULL travels to the statement).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from runops.common.v1 import common_pb2
from services.runstore import sql
from services.runstore.records import created_run
from services.runstore.rows import CreatedRun, ItemRow, RunRow

Column = list[Any] | None

FIELDS = tuple(name for name, _ in sql.RUN_INPUT_FIELDS)
# RunRow's default of each field (every field but the five ids has one).
DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(RunRow) if f.default is not dataclasses.MISSING
}


@dataclass(slots=True)
class RunChunk:
    """Runs as columns, one per sql.RUN_INPUT_FIELDS name (`id`: the body)."""

    count: int
    columns: dict[str, Column]

    @classmethod
    def from_rows(cls, rows: Sequence[RunRow]) -> RunChunk:
        return cls(len(rows), {name: [getattr(row, name) for row in rows] for name in FIELDS})

    @property
    def ids(self) -> list[str]:
        ids = self.columns["id"]
        assert ids is not None
        return ids

    def values(self, name: str) -> list[Any]:
        """Column `name` with the default filled in."""
        column = self.columns[name]
        return [DEFAULTS[name]] * self.count if column is None else column

    def value(self, name: str, k: int) -> Any:
        column = self.columns[name]
        return DEFAULTS[name] if column is None else column[k]

    def set(self, name: str, k: int, value: Any) -> None:
        """Run k's `name` becomes `value` (a default column is filled in first if needed)."""
        column = self.columns[name]
        if column is None:
            if value == DEFAULTS[name]:
                return
            column = self.columns[name] = [DEFAULTS[name]] * self.count
        column[k] = value

    def put_row(self, k: int, row: RunRow) -> None:
        """Run k becomes `row` (a run whose fields were worked out one by one)."""
        for name in FIELDS:
            self.set(name, k, getattr(row, name))

    def take(self, positions: Sequence[int]) -> RunChunk:
        """The runs at `positions`, in that order."""
        if len(positions) == self.count and list(positions) == list(range(self.count)):
            return self
        return RunChunk(
            len(positions),
            {
                name: None if column is None else [column[k] for k in positions]
                for name, column in self.columns.items()
            },
        )

    def row(self, k: int) -> RunRow:
        return RunRow(*[self.value(name, k) for name in FIELDS])

    def rows(self) -> list[RunRow]:
        """Every run as a row (whole answers), transposed at once."""
        columns = [self.values(name) for name in FIELDS]
        return [RunRow(*values) for values in zip(*columns, strict=True)]

    def params(self, *leading: list[Any] | None) -> list[Any]:
        """The parameters of `sql._unnest` over `leading` columns (None: every row NULL) and
        these runs: an array per field, then a scalar per field. A field whose every run holds
        one value travels as that scalar and a NULL array; the ids always as an array (so
        unnest makes one row per run)."""
        arrays: list[Any] = list(leading)
        scalars: list[Any] = [None] * len(leading)
        for name in FIELDS:
            column = self.columns[name]
            if column is None:
                arrays.append(None)
                scalars.append(_sql_value(name, DEFAULTS[name]))
            elif name != "id" and column.count(column[0]) == self.count:
                arrays.append(None)
                scalars.append(_sql_value(name, column[0]))
            else:
                arrays.append(
                    [_sql_value(name, tags) for tags in column] if name == "tags" else column
                )
                scalars.append(None)
        return arrays + scalars


def _sql_value(name: str, value: Any) -> Any:
    """A field's value as its statement parameter takes it: tags as a JSON array (a text[][]
    must be rectangular), NULL for none."""
    if name == "tags":
        return json.dumps(list(value)) if value else None
    return value


@dataclass(slots=True)
class ItemChunk:
    """A chunk of batch items: indexes, links (`existing_run_id`, bodies, None: the item has its
    own run) and the items' runs (a linked item's run holds defaults and is not written)."""

    indexes: list[int]
    runs: RunChunk
    existing_run_id: list[str | None] | None = None
    # Per item: the linked run lives in the other database and was final there.
    existing_run_final: list[bool] | None = None

    @classmethod
    def from_rows(cls, items: Sequence[ItemRow]) -> ItemChunk:
        runs = [NO_RUN if item.existing_run_id else (item.run or NO_RUN) for item in items]
        links = [item.existing_run_id for item in items]
        return cls(
            [item.index for item in items],
            RunChunk.from_rows(runs),
            links if any(links) else None,
            [item.existing_run_final for item in items] if any(links) else None,
        )

    @property
    def count(self) -> int:
        return len(self.indexes)

    def link(self, k: int) -> str | None:
        return None if self.existing_run_id is None else self.existing_run_id[k]

    def links(self) -> list[str | None]:
        return [None] * self.count if self.existing_run_id is None else self.existing_run_id

    def set_link(self, k: int, run_id: str, *, final: bool = False) -> None:
        """Item k links to run `run_id` (its own run is not written)."""
        if self.existing_run_id is None:
            self.existing_run_id = [None] * self.count
        if self.existing_run_final is None:
            self.existing_run_final = [False] * self.count
        self.existing_run_id[k] = run_id
        self.existing_run_final[k] = final

    def finals(self) -> list[bool]:
        return [False] * self.count if self.existing_run_final is None else self.existing_run_final


# Fills the run columns of linked items (no run is written for them).
NO_RUN = RunRow(id="", environment_id="", organization_id="", project_id="", task_identifier="")


@dataclass(slots=True)
class CreatedRuns:
    """What CreateRuns wrote, by request position: the answered run's body (the one written, or
    the live run returned with is_cached; "" where refused), its creation time in microseconds,
    is_cached; the INSERT's record of each run written (a whole answer is built from it and the
    input), the whole existing run of each cached position, and the refused positions with the
    constraint that refused them."""

    ids: list[str]
    created_at_us: list[int]
    is_cached: list[bool]
    records: dict[int, Any]
    existing: dict[int, common_pb2.Run]
    conflicts: dict[int, str]

    @classmethod
    def empty(cls, count: int) -> CreatedRuns:
        return cls([""] * count, [0] * count, [False] * count, {}, {}, {})

    def cached(self, k: int, run: common_pb2.Run) -> None:
        self.ids[k] = run.id
        self.created_at_us[k] = run.created_at.seconds * 1_000_000 + run.created_at.nanos // 1000
        self.is_cached[k] = True
        self.existing[k] = run

    def merge(self, positions: Iterable[int], part: CreatedRuns) -> None:
        """`part` answered the runs at `positions` (its own positions 0, 1, ...)."""
        if len(part.ids) == len(self.ids):
            # Every run (positions is 0, 1, ...): taken as it is.
            self.ids, self.created_at_us, self.is_cached = (
                part.ids,
                part.created_at_us,
                part.is_cached,
            )
            self.records, self.existing, self.conflicts = (
                part.records,
                part.existing,
                part.conflicts,
            )
            return
        for n, k in enumerate(positions):
            self.ids[k] = part.ids[n]
            self.created_at_us[k] = part.created_at_us[n]
            self.is_cached[k] = part.is_cached[n]
            if n in part.records:
                self.records[k] = part.records[n]
            elif n in part.existing:
                self.existing[k] = part.existing[n]
            elif n in part.conflicts:
                self.conflicts[k] = part.conflicts[n]

    def results(self, runs: RunChunk) -> list[CreatedRun]:
        """Whole answers, one per run (`runs`: what was asked)."""
        results: list[CreatedRun] = []
        for k, row in enumerate(runs.rows()):
            if k in self.conflicts:
                results.append(CreatedRun(None, conflict=self.conflicts[k]))
            elif k in self.existing:
                results.append(CreatedRun(self.existing[k], is_cached=True))
            else:
                results.append(CreatedRun(created_run(row, self.records[k])))
        return results
