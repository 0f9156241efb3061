"""The run-field rules: `trigger_options_fit` (the run store's per-row fast path) accepts exactly
what `trigger_options` accepts, field by field of the rule tables."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runops.common.v1 import common_pb2
from runops.kit import limits
from runops.kit.errors import InvalidArgument
from runops.kit.limits import Violations


def _violations(options: common_pb2.TriggerOptions) -> list[str]:
    v = Violations()
    limits.trigger_options(v, options, "options")
    try:
        v.raise_if_any()
    except InvalidArgument as err:
        return [violation.field for violation in err.violations]
    return []


def _text(limit: int) -> st.SearchStrategy[str]:
    return st.sampled_from(["", "x", "x" * limit, "x" * (limit + 1)])


durations = st.tuples(st.sampled_from([0, 1, -1]), st.sampled_from([0, 1, -1, -999_999_999]))


@st.composite
def trigger_options(draw: st.DrawFn) -> common_pb2.TriggerOptions:
    options = common_pb2.TriggerOptions()
    for path, limit in limits.OPTION_TEXT_LIMITS.items():
        *parents, name = path.split(".")
        target: Any = options
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, name, draw(_text(limit)))
    options.tags.extend(
        draw(st.lists(st.sampled_from(["a", "", "t" * limits.TAG_LIMIT, "t" * 129]), max_size=11))
    )
    for path in limits.OPTION_DURATIONS:
        if draw(st.booleans()):
            seconds, nanos = draw(durations)
            duration = getattr(options, path)
            duration.seconds, duration.nanos = seconds, nanos
    options.max_attempts = draw(st.sampled_from([0, 1, limits.MAX_ATTEMPTS, 101]))
    return options


@settings(max_examples=500)
@given(trigger_options())
def test_the_fast_form_accepts_exactly_what_the_checks_accept(
    options: common_pb2.TriggerOptions,
) -> None:
    assert limits.trigger_options_fit(options) == (not _violations(options))


def _bad(path: str) -> common_pb2.TriggerOptions:
    """Options whose only violation is at `path`."""
    options = common_pb2.TriggerOptions()
    if path in limits.OPTION_TEXT_LIMITS:
        *parents, name = path.split(".")
        target: Any = options
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, name, "x" * (limits.OPTION_TEXT_LIMITS[path] + 1))
    else:
        getattr(options, path).nanos = -1
    return options


@pytest.mark.parametrize("path", [*limits.OPTION_TEXT_LIMITS, *limits.OPTION_DURATIONS])
def test_every_rule_of_the_tables_is_in_the_fast_form(path: str) -> None:
    options = _bad(path)
    assert _violations(options) == [f"options.{path}"]
    assert not limits.trigger_options_fit(options)


def test_a_negative_duration_is_refused_however_short() -> None:
    """The copies disagreed: the run store rounded to milliseconds (-1 ns passed), the mollifier
    and ingest refused it. Negative is negative."""
    options = common_pb2.TriggerOptions()
    options.ttl.nanos = -1
    assert _violations(options) == ["options.ttl"]


_id_parts = st.sampled_from(["", "run_", "run", "env_", "RUN_", "run_run_", "_"])
_id_bodies = st.text(alphabet="0123456789az_A-\n ", max_size=70)


@settings(max_examples=500)
@given(st.lists(st.tuples(_id_parts, _id_bodies), max_size=5), st.sampled_from(["run", "env"]))
def test_the_column_form_of_ids_accepts_exactly_what_id_body_accepts(
    parts: list[tuple[str, str]], prefix: str
) -> None:
    values = [head + body for head, body in parts]
    v = Violations()
    for value in values:
        limits.id_body(v, value, "id", prefix, required=False)
    assert limits.ids_fit(values, prefix) == (not v)


@pytest.mark.parametrize("length", [59, 60, 61, 64, 65])
def test_the_column_form_of_ids_keeps_the_length_limit(length: int) -> None:
    value = "run_" + "a" * length
    v = Violations()
    limits.id_body(v, value, "id", "run", required=False)
    assert limits.ids_fit([value], "run") == (not v) == (length <= 60)
