"""However many violations a request has, its INVALID_ARGUMENT fits a default client's 8 KiB
trailer limit (otherwise the client sees RESOURCE_EXHAUSTED instead)."""

from __future__ import annotations

import grpc
import pytest

from runops.kit.errors import (
    MAX_LISTED_VIOLATIONS,
    MAX_MESSAGE_CHARS,
    FieldViolation,
    InvalidArgument,
    details_of,
    rich_status,
)
from runops.testing.v1 import testing_pb2 as t
from tests.kit.harness import INTERNAL, auth, behave, stub


def _trailer_bytes(exc: grpc.aio.AioRpcError) -> int:
    return sum(len(k) + len(v) for k, v in exc.trailing_metadata() or ())


@pytest.mark.parametrize("where", ["names", "labels"])
async def test_a_thousand_bad_values_still_answer_invalid_argument(
    channel: grpc.aio.Channel, where: str
) -> None:
    # Long, NUL-holding values; as map keys their paths are as long as paths get.
    values = [f"{i:04d}\x00" + "é" * 64 + "x" * 4100 for i in range(1000)]
    request = behave(names=values) if where == "names" else behave(labels={v: v for v in values})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(channel).Behave(request, metadata=auth(INTERNAL), timeout=30)
    details = details_of(info.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT, details.message
    assert 0 < len(details.violations) <= MAX_LISTED_VIOLATIONS
    listed = len(details.violations)
    # Two violations per value (too long, NUL; keys too): the rest are counted, not listed.
    per_value = 2 if where == "names" else 4
    assert details.metadata["omitted_violations"] == str(1000 * per_value - listed)
    assert len(details.message) <= MAX_MESSAGE_CHARS
    assert details.message.endswith(f"and {1000 * per_value - 3} more")
    assert all(len(v.field) <= 128 and len(v.description) <= 200 for v in details.violations)
    assert _trailer_bytes(info.value) < 6 * 1024


def test_a_status_is_bounded_whatever_the_error_holds() -> None:
    err = InvalidArgument(
        "m" * 10_000,
        metadata={"id": "x" * 10_000},
        violations=[FieldViolation("f" * 10_000, "d" * 10_000) for _ in range(1000)],
    )
    status = rich_status(err)
    assert len(status.details) <= MAX_MESSAGE_CHARS * 4  # percent-encoding at worst x3
    size = sum(len(k) + len(v) for k, v in status.trailing_metadata)
    assert size < 5 * 1024


async def test_few_violations_are_listed_in_full(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(channel).Behave(
            t.BehaveRequest(probe=t.Probe(text="\x00", names=["\x00"])), metadata=auth(INTERNAL)
        )
    details = details_of(info.value)
    assert details.fields == ["probe.text", "probe.names[0]"]
    assert "omitted_violations" not in details.metadata
    assert details.message == "the request has invalid fields: probe.text, probe.names[0]"
