"""One unit's `AcceptBatchItemsRequest`, written as protobuf wire bytes from the unit's columns
and handed to gRPC as they are (`RunStoreClient.accept_batch_items_wire`), instead of a
`BatchItemInput` and a `RunInput` message built per item, copied into a request and serialized:
the hot path of small items (issue 16). No request message is held while the call is in flight
either (its arena was more than twice the bytes).

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
_BATCH_ID = _tag(rs.AcceptBatchItemsRequest, "batch_id")
_ENVIRONMENT_ID = _tag(rs.AcceptBatchItemsRequest, "environment_id")
_INDEX = bytes([rs.BatchItemInput.DESCRIPTOR.fields_by_name["index"].number << 3])
# result_shape IDS (a varint field): the answer is columns (`accepted`), not an AcceptedItem
# message per item.
_IDS = bytes(
    [
        rs.AcceptBatchItemsRequest.DESCRIPTOR.fields_by_name["result_shape"].number << 3,
        rs.RESULT_SHAPE_IDS,
    ]
)
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
) -> bytes:
    """The serialized request writing every item of `unit`, in its order, answered lean
    (`result_shape` IDS: `accepted` columns). By position k:
    `workers[k]` the worker an item with options locks to (absent: ""), `payloads[k]` a payload
    and type that replace the item's (offloaded), `special[k]` the whole input of an item that
    is not a plain run (its task defaults are the caller's)."""
    # Every message's fields in their numbers' order, defaults left out: upb's own encoding.
    parts = [_field(_BATCH_ID, batch_id.encode())]
    add = parts.append
    # (defaults key, payload type, payload size) -> the run's fields before its payload, its
    # payload type field, its default fields, and their size with the payload's: the same for
    # most items of a unit.
    shapes: dict[tuple[DefaultsKey, str, int], tuple[bytes, bytes, bytes, int]] = {}
    optioned = set(unit.with_options)
    for k, index in enumerate(unit.indexes):
        if k in special:
            body = special[k].SerializeToString()
            add(_ITEM + varint(len(body)) + body)
            continue
        key = (workers.get(k, ""), unit.tasks[k])
        if k in payloads:
            payload, payload_type = payloads[k]
        else:
            payload, payload_type = unit.payloads[k], unit.payload_types[k]
        shape = (key, payload_type, len(payload))
        known = shapes.get(shape)
        if known is None:
            head = _field(_TASK, key[1].encode())
            if payload:
                head += _PAYLOAD + varint(len(payload))
            type_field = _field(_PAYLOAD_TYPE, payload_type.encode())
            tail = defaults.get(key, b"")
            size = len(head) + len(payload) + len(type_field) + len(tail)
            known = shapes[shape] = (head, type_field, tail, size)
        head, type_field, tail, run_size = known
        if k in optioned:
            options = unit.items[k].options.SerializeToString()
            options_field = _OPTIONS + varint(len(options)) + options
            run_size += len(options_field)
        else:  # none: the run store's plain fast path (an empty message is the same options)
            options_field = b""
        item_head = (_INDEX + varint(index) if index else b"") + _RUN + varint(run_size)
        add(_ITEM + varint(len(item_head) + run_size) + item_head)
        add(head)
        add(payload)
        add(type_field)
        add(options_field)
        add(tail)
    add(_field(_ENVIRONMENT_ID, environment_id.encode()))
    add(_IDS)
    return b"".join(parts)
