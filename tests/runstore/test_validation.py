"""The validation fast path: it accepts only what the field-by-field checks accept, and builds
the same row."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC
from typing import Any

import pytest
from google.protobuf import timestamp_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from runops.common.v1 import common_pb2
from runops.kit.errors import InvalidArgument
from runops.kit.limits import Violations
from runops.runstore.v1 import runstore_pb2 as rs
from services.runstore import validation
from services.runstore.rows import RunRow


def mostly(valid: list[Any], invalid: list[Any]) -> st.SearchStrategy[Any]:
    """Valid values 8 times in 9: a run with exactly one bad field is common."""
    return st.sampled_from(valid * 8 * max(1, len(invalid)) + invalid)


ids = mostly(["", "run_abc123", "run_" + "a" * 60], ["run_", "run_ABC", "abc123", "x_1"])
envs = mostly(["env_1", "env_" + "a" * 60], ["", "env_", "org_1", "env_a b", "e" * 65])
orgs = mostly(["org_1"], ["", "env_1", "org_"])
projects = mostly(["proj_1"], ["", "proj_"])
tasks = mostly(["email/send", "a" * 128, "t:1.x_y"], ["", "-bad", "a" * 129])
texts = mostly(["", "q", "x" * 256], ["x" * 257])
keys = mostly(["", "k", "k" * 512], ["k" * 513])
tag_lists = st.lists(mostly(["a", "b", "t" * 128], ["", "t" * 129]), max_size=11)
durations = st.tuples(
    mostly([0, 1, 2], [-1]), mostly([0, 1, 999_999_999], [-1, -1_000_000, -999_999_999])
)
counts = mostly([0, 1, 100], [101])


@st.composite
def run_inputs(draw: st.DrawFn) -> rs.RunInput:
    run = rs.RunInput(
        run_id=draw(ids),
        environment_id=draw(envs),
        organization_id=draw(orgs),
        project_id=draw(projects),
        task_identifier=draw(tasks),
        payload=b"{}",
        payload_type=draw(texts),
        parent_run_id=draw(ids),
        root_run_id=draw(ids),
        worker_version=draw(texts),
        default_queue=draw(texts),
        default_machine_preset=draw(texts),
        default_max_attempts=draw(counts),
    )
    options = run.options
    options.idempotency_key = draw(keys)
    options.queue = draw(texts)
    options.concurrency_key = draw(texts)
    options.machine_preset = draw(texts)
    options.lock_to_version = draw(texts)
    options.one_time_use_token = draw(texts)
    if draw(st.booleans()):
        options.debounce.key = draw(texts)
    options.tags.extend(draw(tag_lists))
    options.max_attempts = draw(counts)
    for duration in (options.idempotency_key_ttl, options.ttl, options.priority):
        if draw(st.booleans()):
            duration.seconds, duration.nanos = draw(durations)
    if draw(st.booleans()):
        run.default_ttl.seconds, run.default_ttl.nanos = draw(durations)
    if draw(st.booleans()):
        run.created_at.seconds = 1_700_000_000
    state = draw(st.sampled_from([None, "failed", "cancelled"]))
    if state == "failed":
        run.failed.code = draw(mostly(["E_X"], ["", "bad"]))
    elif state == "cancelled":
        run.cancelled.reason = "asked"
    return run


def _without_clock(row: RunRow) -> RunRow:
    """The row without the field computed from the clock (two builds differ there)."""
    return dataclasses.replace(row, idempotency_key_expires_at=None)


@settings(max_examples=500)
@given(run_inputs(), st.booleans())
def test_the_fast_path_accepts_only_valid_runs_and_builds_the_same_row(
    run: rs.RunInput, in_batch: bool
) -> None:
    v = Violations()
    slow = validation.run_input(v, run, "run", in_batch=in_batch)
    fast = validation._plain_run_row(run, in_batch=in_batch)
    if fast is not None:
        assert not v, "the fast path accepted a run the checks refuse"
        assert slow is not None
        assert _without_clock(fast) == _without_clock(slow)
    if slow is not None and run.WhichOneof("final_state") != "failed":
        # Every valid run without a negative duration part takes the fast path.
        parts = [run.options.idempotency_key_ttl, run.options.ttl, run.options.priority]
        if all(d.seconds >= 0 and d.nanos >= 0 for d in [*parts, run.default_ttl]):
            assert fast is not None


@given(
    st.integers(-62_135_596_800, 253_402_300_799),
    st.integers(0, 999_999_999),
)
def test_timestamps_read_as_to_datetime_reads_them(seconds: int, nanos: int) -> None:
    ts = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
    expected = ts.ToDatetime(tzinfo=UTC)
    got = validation._when(ts)
    assert got == expected
    assert got.tzinfo is expected.tzinfo


def test_minted_ids_only_for_runs_that_name_none() -> None:
    minted = iter(["m1", "m2"])
    request = rs.CreateRunsRequest(
        runs=[
            rs.RunInput(
                run_id=run_id,
                environment_id="env_1",
                organization_id="org_1",
                project_id="proj_1",
                task_identifier="t",
                options=common_pb2.TriggerOptions(max_attempts=3),
            )
            for run_id in ("", "run_given", "")
        ]
    )
    runs = validation.create_runs(request, lambda: next(minted))
    assert runs.ids == ["m1", "given", "m2"]


def _valid_run() -> rs.RunInput:
    return rs.RunInput(
        run_id="run_abc123",
        environment_id="env_1",
        organization_id="org_1",
        project_id="proj_1",
        task_identifier="email/send",
        parent_run_id="run_p1",
        root_run_id="run_r1",
        options=common_pb2.TriggerOptions(queue="q", max_attempts=3, tags=["a"]),
    )


def _set(path: str, value: Any) -> Callable[[rs.RunInput], None]:
    def change(run: rs.RunInput) -> None:
        *parents, name = path.split(".")
        target: Any = run
        for parent in parents:
            target = getattr(target, parent)
        if isinstance(value, list):
            getattr(target, name).extend(value)
        elif isinstance(value, tuple):  # (seconds, nanos) of a Duration
            getattr(target, name).seconds, getattr(target, name).nanos = value
        else:
            setattr(target, name, value)

    return change


# One bad field each: (field path as named in the violation, the change).
ONE_BAD_FIELD = [
    ("run.run_id", _set("run_id", "run_ABC")),
    ("run.run_id", _set("run_id", "abc123")),
    ("run.environment_id", _set("environment_id", "org_1")),
    ("run.organization_id", _set("organization_id", "env_1")),
    ("run.project_id", _set("project_id", "proj_")),
    ("run.task_identifier", _set("task_identifier", "")),
    ("run.task_identifier", _set("task_identifier", "-bad")),
    ("run.task_identifier", _set("task_identifier", "a" * 129)),
    ("run.parent_run_id", _set("parent_run_id", "x_1")),
    ("run.root_run_id", _set("root_run_id", "run_")),
    ("run.options.idempotency_key", _set("options.idempotency_key", "k" * 513)),
    ("run.options.queue", _set("options.queue", "x" * 257)),
    ("run.options.concurrency_key", _set("options.concurrency_key", "x" * 257)),
    ("run.options.machine_preset", _set("options.machine_preset", "x" * 257)),
    ("run.options.lock_to_version", _set("options.lock_to_version", "x" * 257)),
    ("run.options.one_time_use_token", _set("options.one_time_use_token", "x" * 257)),
    ("run.options.debounce.key", _set("options.debounce.key", "x" * 257)),
    ("run.payload_type", _set("payload_type", "x" * 257)),
    ("run.worker_version", _set("worker_version", "x" * 257)),
    ("run.default_queue", _set("default_queue", "x" * 257)),
    ("run.default_machine_preset", _set("default_machine_preset", "x" * 257)),
    ("run.options.tags", _set("options.tags", ["t"] * 10)),
    ("run.options.tags[1]", _set("options.tags", [""])),
    ("run.options.tags[1]", _set("options.tags", ["t" * 129])),
    ("run.options.idempotency_key_ttl", _set("options.idempotency_key_ttl", (-1, 0))),
    ("run.options.ttl", _set("options.ttl", (0, -1_000_000))),
    ("run.options.ttl", _set("options.ttl", (0, -1))),
    ("run.options.priority", _set("options.priority", (-5, 0))),
    ("run.default_ttl", _set("default_ttl", (-1, 0))),
    ("run.options.max_attempts", _set("options.max_attempts", 101)),
    ("run.default_max_attempts", _set("default_max_attempts", 101)),
    ("run.failed.code", _set("failed.code", "bad")),
]


@pytest.mark.parametrize(("field", "change"), ONE_BAD_FIELD)
def test_one_bad_field_takes_the_slow_path_and_is_named(
    field: str, change: Callable[[rs.RunInput], None]
) -> None:
    run = _valid_run()
    assert validation._plain_run_row(run) is not None
    change(run)
    v = Violations()
    validation.run_input(v, run, "run")
    assert validation._plain_run_row(run) is None
    with pytest.raises(InvalidArgument) as raised:
        v.raise_if_any()
    assert [violation.field for violation in raised.value.violations] == [field]


@st.composite
def plain_inputs(draw: st.DrawFn) -> rs.RunInput:
    """A run without options (or with empty ones) or final state: the columns alone carry it."""
    run = draw(run_inputs())
    run.ClearField("options")
    if draw(st.booleans()):
        run.options.SetInParent()
    run.ClearField("final_state")
    return run


chunks = st.lists(st.one_of(run_inputs(), plain_inputs()), min_size=1, max_size=5)


def _negative_part(run: rs.RunInput) -> bool:
    parts = [run.options.idempotency_key_ttl, run.options.ttl, run.options.priority]
    return any(d.seconds < 0 or d.nanos < 0 for d in [*parts, run.default_ttl])


def _rows_one_by_one(
    runs: list[rs.RunInput], in_batch: bool
) -> tuple[list[RunRow | None], list[str]]:
    v = Violations()
    rows = [
        validation.run_input(v, run, f"runs[{i}]", in_batch=in_batch) for i, run in enumerate(runs)
    ]
    try:
        v.raise_if_any()
    except InvalidArgument as err:
        return rows, [f"{f.field}: {f.description}" for f in err.violations]
    return rows, []


@settings(max_examples=500)
@given(chunks, st.booleans())
def test_the_chunk_fast_path_accepts_only_valid_chunks_and_builds_the_same_rows(
    runs: list[rs.RunInput], in_batch: bool
) -> None:
    fast = validation._plain_chunk(runs, in_batch=in_batch, mint=None)
    rows, violations = _rows_one_by_one(runs, in_batch)
    if fast is not None:
        assert not violations, "the fast path accepted a chunk the checks refuse"
        assert [_without_clock(fast.row(k)) for k in range(len(runs))] == [
            _without_clock(row) for row in rows if row is not None
        ]
    elif not violations:
        assert any(_negative_part(run) for run in runs), "a valid chunk missed the fast path"


def _as_columns(runs: list[rs.RunInput], broadcast: bool) -> rs.RunColumns:
    """The same runs as RunColumns (with `broadcast`, a column whose runs agree holds one
    entry, and one whose runs all hold the default none)."""
    columns = rs.RunColumns(count=len(runs))
    for name in validation._INPUT_COLUMNS:
        values = [getattr(run, name) for run in runs]
        if broadcast and len(set(values)) == 1:
            values = [] if values[0] == getattr(rs.RunInput(), name) else values[:1]
        getattr(columns, name).extend(values)
    columns.default_ttl_ms.extend(run.default_ttl.ToMilliseconds() for run in runs)
    columns.created_at_us.extend(
        run.created_at.ToMicroseconds() if run.HasField("created_at") else 0 for run in runs
    )
    for k, run in enumerate(runs):
        if run.HasField("options"):
            columns.options[k].CopyFrom(run.options)
        if run.HasField("failed"):
            columns.failed[k].CopyFrom(run.failed)
        elif run.HasField("cancelled"):
            columns.cancelled[k].CopyFrom(run.cancelled)
    return columns


def _whole_ms(run: rs.RunInput) -> bool:
    """A default TTL columns can carry as it is (whole milliseconds, not zero when set, seconds
    and nanos of one sign: a mixed-sign Duration is refused as a row, while its milliseconds in
    a column are a plain number)."""
    ttl = run.default_ttl
    return not run.HasField("default_ttl") or (
        ttl.nanos % 1_000_000 == 0 and ttl.ToMilliseconds() != 0 and ttl.seconds * ttl.nanos >= 0
    )


@settings(max_examples=300)
@given(chunks, st.booleans(), st.booleans())
def test_columns_check_and_build_as_the_rows_they_stand_for(
    runs: list[rs.RunInput], in_batch: bool, broadcast: bool
) -> None:
    for run in runs:
        if not _whole_ms(run):
            run.ClearField("default_ttl")
    v = Violations()
    chunk = validation.run_columns(
        v, _as_columns(runs, broadcast), "columns", in_batch=in_batch, mint=None
    )
    rows, violations = _rows_one_by_one(runs, in_batch)
    try:
        v.raise_if_any()
        got: list[str] = []
    except InvalidArgument as err:
        got = [f"{f.field}: {f.description}" for f in err.violations]
    assert got == [violation.replace("runs[", "columns[", 1) for violation in violations]
    if chunk is not None:
        assert [_without_clock(chunk.row(k)) for k in range(len(runs))] == [
            _without_clock(row) for row in rows if row is not None
        ]


def test_a_column_of_the_wrong_length_is_named() -> None:
    columns = rs.RunColumns(count=3, task_identifier=["a", "b"], environment_id=["env_1"])
    columns.options[5].queue = "q"
    v = Violations()
    assert validation.run_columns(v, columns, "columns", in_batch=False, mint=None) is None
    with pytest.raises(InvalidArgument) as refused:
        v.raise_if_any()
    assert [f.field for f in refused.value.violations] == [
        "columns.task_identifier",
        "columns.options",
    ]
