"""The kit's input check, through a real server: every string (NUL, length cap), Duration and
Timestamp of every request, before any handler runs; malformed bytes are INVALID_ARGUMENT."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from runops.kit.errors import details_of
from runops.kit.request_checks import DEFAULT_MAX_LENGTH, request_violations
from runops.testing.v1 import testing_pb2 as t
from tests.kit.harness import INTERNAL, METHOD, auth, behave, stub


async def _refused(channel: grpc.aio.Channel, request: t.BehaveRequest) -> dict[str, str]:
    """Behave must answer INVALID_ARGUMENT; returns its violations by field."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(channel).Behave(request, metadata=auth(INTERNAL))
    details = details_of(info.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.reason == "INVALID_REQUEST_FIELD"
    return {v.field: v.description for v in details.violations}


def _duration(seconds: int, nanos: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


async def test_a_valid_request_reaches_its_handler(channel: grpc.aio.Channel) -> None:
    request = behave(
        text="x" * DEFAULT_MAX_LENGTH,
        short_text="y" * 16,
        names=["a", "é" * 100],
        delay=_duration(-1, -500),
        at=timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_999_999),
        labels={"k": "v"},
        blob=b"\x00\xff",  # bytes are not text: a NUL is fine
    )
    reply = await stub(channel).Behave(request, metadata=auth(INTERNAL))
    assert len(reply.echo.text) == DEFAULT_MAX_LENGTH


async def test_a_nul_anywhere_names_its_field(channel: grpc.aio.Channel) -> None:
    nested = t.Nested(children=[t.Nested(), t.Nested(children=[t.Nested(note="a\x00b")])])
    request = behave(
        text="\x00",
        names=["ok", "bad\x00"],
        nested=nested,
        labels={"fine": "v\x00", "k\x00": "v"},
    )
    request.probe.picked_text = "p\x00"
    violations = await _refused(channel, request)
    assert violations == {
        "probe.text": "must not contain a NUL character",
        "probe.names[1]": "must not contain a NUL character",
        "probe.nested.children[1].children[0].note": "must not contain a NUL character",
        'probe.labels["fine"]': "must not contain a NUL character",
        'probe.labels["k\\u0000"]': "key must not contain a NUL character",
        "probe.picked_text": "must not contain a NUL character",
    }


async def test_the_check_runs_before_the_handler(channel: grpc.aio.Channel) -> None:
    # "boom" would be INTERNAL if the handler ran.
    violations = await _refused(channel, behave("boom", text="\x00"))
    assert list(violations) == ["probe.text"]


async def test_length_caps_are_the_fields_option_or_the_default(
    channel: grpc.aio.Channel,
) -> None:
    request = behave(text="x" * (DEFAULT_MAX_LENGTH + 1), short_text="y" * 17)
    request.probe.picked_nested.note = "z" * (DEFAULT_MAX_LENGTH + 1)
    assert await _refused(channel, request) == {
        "probe.text": f"must be at most {DEFAULT_MAX_LENGTH} characters (got 4097)",
        "probe.short_text": "must be at most 16 characters (got 17)",
        "probe.picked_nested.note": f"must be at most {DEFAULT_MAX_LENGTH} characters (got 4097)",
    }
    # Characters, not bytes: 16 two-byte characters fit a 16-character cap.
    reply = await stub(channel).Behave(behave(short_text="é" * 16), metadata=auth(INTERNAL))
    assert reply.echo.behaviour == ""


@pytest.mark.parametrize(
    ("delay", "why"),
    [
        (_duration(0, 1_000_000_000), "nanos must be within ±999,999,999 (got 1000000000)"),
        (_duration(0, -1_000_000_000), "nanos must be within ±999,999,999 (got -1000000000)"),
        (_duration(1, -1), "seconds and nanos must have the same sign"),
        (_duration(-1, 1), "seconds and nanos must have the same sign"),
        (_duration(315_576_000_001, 0), "must be within ±10,000 years"),
    ],
)
async def test_an_invalid_duration_is_refused(
    channel: grpc.aio.Channel, delay: duration_pb2.Duration, why: str
) -> None:
    assert await _refused(channel, behave(delay=delay)) == {"probe.delay": why}


@pytest.mark.parametrize(
    ("at", "why"),
    [
        (timestamp_pb2.Timestamp(seconds=0, nanos=-1), "nanos must be within 0..999,999,999"),
        (timestamp_pb2.Timestamp(seconds=253_402_300_800), "must be between 0001-01-01"),
        (timestamp_pb2.Timestamp(seconds=-62_135_596_801), "must be between 0001-01-01"),
    ],
)
async def test_an_invalid_timestamp_is_refused(
    channel: grpc.aio.Channel, at: timestamp_pb2.Timestamp, why: str
) -> None:
    violations = await _refused(channel, behave(at=at))
    assert list(violations) == ["probe.at"]
    assert violations["probe.at"].startswith(why)


async def test_a_server_stream_request_is_checked(channel: grpc.aio.Channel) -> None:
    call = stub(channel).Watch(t.WatchRequest(interval=_duration(1, -5)), metadata=auth(INTERNAL))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    assert details_of(info.value).fields == ["interval"]


async def test_every_message_of_a_client_stream_is_checked(channel: grpc.aio.Channel) -> None:
    async def requests() -> AsyncIterator[t.UploadRequest]:
        yield t.UploadRequest(probe=t.Probe(text="fine"))
        yield t.UploadRequest(probe=t.Probe(names=["x", "y\x00"]))

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(channel).Upload(requests(), metadata=auth(INTERNAL))
    details = details_of(info.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.fields == ["probe.names[1]"]

    async def fine() -> AsyncIterator[t.UploadRequest]:
        for _ in range(3):
            yield t.UploadRequest(probe=t.Probe(text="fine"))

    assert (await stub(channel).Upload(fine(), metadata=auth(INTERNAL))).received == 3


# Raw bytes an independent client might send. BehaveRequest: field 1 = probe (a message);
# Probe: field 2 = text (a string).
MALFORMED = {
    "not a message": bytes.fromhex("0a02fffe"),
    "truncated": bytes.fromhex("0a05"),
    "invalid UTF-8": bytes.fromhex("0a031201ff"),
    "lone surrogate": bytes.fromhex("0a051203eda080"),
}


@pytest.mark.parametrize("name", MALFORMED)
async def test_malformed_bytes_are_invalid_argument(channel: grpc.aio.Channel, name: str) -> None:
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        f"{METHOD}Behave"
    )  # no serializers: raw bytes both ways
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(MALFORMED[name], metadata=auth(INTERNAL))
    details = details_of(info.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "MALFORMED_REQUEST"
    assert details.message == "the request is not a valid runops.testing.v1.BehaveRequest message"


async def test_malformed_bytes_in_a_client_stream_are_invalid_argument(
    channel: grpc.aio.Channel,
) -> None:
    call: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(f"{METHOD}Upload")

    async def chunks() -> AsyncIterator[bytes]:
        yield t.UploadRequest(probe=t.Probe(text="fine")).SerializeToString()
        yield bytes.fromhex("0a051203eda080")

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(chunks(), metadata=auth(INTERNAL))
    details = details_of(info.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "MALFORMED_REQUEST"
    assert "class" not in details.message


async def test_malformed_bytes_still_need_credentials(channel: grpc.aio.Channel) -> None:
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"{METHOD}Behave")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(MALFORMED["not a message"])
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_large_request_is_walked_once_per_string() -> None:
    """10,000 nested items: every string visited, violations kept bounded but all counted."""
    probe = t.Probe(nested=t.Nested(children=[t.Nested(note=f"n{i}\x00") for i in range(10_000)]))
    found, count = request_violations(t.BehaveRequest(probe=probe))
    assert count == 10_000
    assert len(found) == 100
    assert found[-1].field == "probe.nested.children[99].note"
