"""Protobuf wire form by hand, for hops that forward serialized messages without decoding them
(the mollifier's drainer joins buffered RunInputs into one CreateRunsRequest). Concatenated
serializations parse as one message: a repeated field's elements add up, and a later occurrence
of a singular field wins (a message field merges into the earlier one)."""

from __future__ import annotations

LENGTH_DELIMITED = 2
VARINT = 0


def varint(value: int) -> bytes:
    """A non-negative integer as a base-128 varint."""
    if value < 0:
        raise ValueError("only non-negative varints are written by hand")
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(field_number: int, wire_type: int) -> bytes:
    """A field's key: its number and wire type."""
    return varint(field_number << 3 | wire_type)


def length_delimited(field_tag: bytes, payload: bytes) -> bytes:
    """A bytes, string or message field: its key, the payload's length, the payload."""
    return field_tag + varint(len(payload)) + payload
