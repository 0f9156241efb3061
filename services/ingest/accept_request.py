"""One unit's `AcceptBatchItemsRequest`, written as protobuf wire bytes from the unit's columns
and parsed once (upb, in C), instead of a `BatchItemInput` and a `RunInput` message built and
then copied into the request per item: the hot path of small items (issue 16).

An item's run is its task, payload, payload type and options, plus the task defaults of its
(worker, task) pair: those are resolved once per distinct pair (`TaskDefaults.fill` on one
prototype run each) and appended as the pair's serialized fields. The few items that are not a
plain run (pre-failed, linked to an existing run) are given as messages and serialized alone.
"""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.message import Message

from runops.common.v1 import common_pb2
from runops.controlplane.defaults import TaskDefaults
from runops.runstore.v1 import runstore_pb2 as rs
from services.ingest.validation import CheckedUnit

# (worker the run locks to, task): the key of a run's task defaults.
DefaultsKey = tuple[str, str]


_LENGTH_DELIMITED = 2  # the wire type of strings, bytes and messages


def _tag(message: type[Message], name: str) -> bytes:
    """The one-byte key of a length-delimited field (every field used here is numbered < 16)."""
    number: int = message.DESCRIPTOR.fields_by_name[name].number
    assert number < 16
    return bytes([number << 3 | _LENGTH_DELIMITED])


_TASK = _tag(rs.RunInput, "task_identifier")
_PAYLOAD = _tag(rs.RunInput, "payload")
_PAYLOAD_TYPE = _tag(rs.RunInput, "payload_type")
_OPTIONS = _tag(rs.RunInput, "options")
_RUN = _tag(rs.BatchItemInput, "run")
_ITEM = _tag(rs.AcceptBatchItemsRequest, "items")
_INDEX = bytes([rs.BatchItemInput.DESCRIPTOR.fields_by_name["index"].number << 3])
# Options present and empty (`RunInput(options=item.options)` wrote them so); 2 bytes.
_NO_OPTIONS = _OPTIONS + b"\x00"
_SMALL = [bytes([n]) for n in range(0x80)]


def varint(value: int) -> bytes:
    """`value`'s base-128 varint (the protobuf encoding of an unsigned integer)."""
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, value: bytes) -> bytes:
    return tag + varint(len(value)) + value if value else b""


async def defaults_by_key(
    defaults: TaskDefaults, environment_id: str, keys: Mapping[DefaultsKey, int]
) -> dict[DefaultsKey, bytes]:
    """The serialized task-default fields of each (worker, task) key (empty: platform
    defaults), resolved as `TaskDefaults.fill` resolves a run; `keys` counts the runs of each."""
    prototypes = {
        key: rs.RunInput(
            task_identifier=key[1], options=common_pb2.TriggerOptions(lock_to_version=key[0])
        )
        for key in keys
    }
    await defaults.fill(environment_id, list(prototypes.values()), counts=list(keys.values()))
    out: dict[DefaultsKey, bytes] = {}
    for key, run in prototypes.items():
        # What fill set, and nothing else.
        run.ClearField("task_identifier")
        run.ClearField("options")
        out[key] = run.SerializeToString()
    return out


def encode(
    unit: CheckedUnit,
    *,
    environment_id: str,
    batch_id: str,
    workers: Mapping[int, str],
    defaults: Mapping[DefaultsKey, bytes],
    payloads: Mapping[int, tuple[bytes, str]],
    special: Mapping[int, rs.BatchItemInput],
) -> rs.AcceptBatchItemsRequest:
    """The request writing every item of `unit`, in its order. By position k: `workers[k]` the
    worker an item with options locks to (absent: ""), `payloads[k]` a payload and type that
    replace the item's (offloaded), `special[k]` the whole input of an item that is not a plain
    run (its task defaults are the caller's)."""
    parts: list[bytes] = []
    add = parts.append
    heads: dict[DefaultsKey, bytes] = {}  # a run's task field and its default fields
    types: dict[str, bytes] = {}
    # (head, payload type field, payload size) -> the run's fields up to its payload, and its
    # size: the same for most items of a unit.
    shapes: dict[tuple[bytes, bytes, int], tuple[bytes, int]] = {}
    optioned = set(unit.with_options)
    for k, index in enumerate(unit.indexes):
        if k in special:
            body = special[k].SerializeToString()
            add(_ITEM + varint(len(body)) + body)
            continue
        key = (workers.get(k, ""), unit.tasks[k])
        head = heads.get(key)
        if head is None:
            head = heads[key] = _field(_TASK, key[1].encode()) + defaults.get(key, b"")
        if k in payloads:
            payload, payload_type = payloads[k]
        else:
            payload, payload_type = unit.payloads[k], unit.payload_types[k]
        type_field = types.get(payload_type)
        if type_field is None:
            type_field = types[payload_type] = _field(_PAYLOAD_TYPE, payload_type.encode())
        shape = (head, type_field, len(payload))
        known = shapes.get(shape)
        if known is None:
            payload_head = head + (_PAYLOAD + varint(len(payload)) if payload else b"")
            known = shapes[shape] = (
                payload_head,
                len(payload_head) + len(payload) + len(type_field),
            )
        payload_head, run_size = known
        if k in optioned:
            options = unit.items[k].options.SerializeToString()
            options_field = _OPTIONS + varint(len(options)) + options
            run_size += len(options_field)
        else:
            options_field = _NO_OPTIONS
            run_size += 2
        item_head = _INDEX + varint(index) + _RUN + varint(run_size)
        add(_ITEM + varint(len(item_head) + run_size) + item_head)
        add(payload_head)
        add(payload)
        add(type_field)
        add(options_field)
    request = rs.AcceptBatchItemsRequest.FromString(b"".join(parts))
    request.environment_id = environment_id
    request.batch_id = batch_id
    return request
