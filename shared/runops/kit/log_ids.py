"""The ids every log line of a call carries (spec §0), bound by the kit, not by handlers.

The server interceptor hands each request message (each message of a client stream, so a
stream's header counts when it arrives) and, when calls are logged, the unary answer to
`bind_ids`. A field is an id when it is named like one of LOG_KEYS or carries the
`(runops.common.v1.log_key)` option (an entity's own id, e.g. a batch's `friendly_id`). Fields
are found at the top of the message and in its singular sub-messages, nearest first; repeated
fields and maps are not looked into (which of many would it be?). A key bound once in a call
keeps its value: the API key's environment, then the request's ids, then the answer's (a
server-minted id reaches the call's closing "rpc handled" line).

Where each message type's ids live is worked out once per descriptor.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from runops.common.v1 import options_pb2
from runops.kit.logging import bind_new, bound_keys

LOG_KEYS = ("environment_id", "batch_id", "run_id")
# How far below the message the search goes: a request's `run`, a stream's `header`, an
# answer's `batch` are one level down; deeper ids belong to something else.
MAX_DEPTH = 1

# (key, field path) in the order they are tried: shallower first, then field order.
_Plan = tuple[tuple[str, tuple[str, ...]], ...]
_plans: dict[Any, _Plan] = {}


def _key(fd: FieldDescriptor) -> str | None:
    if fd.type != FieldDescriptor.TYPE_STRING or fd.is_repeated:
        return None
    options = fd.GetOptions()
    if options.HasExtension(options_pb2.log_key):
        return str(options.Extensions[options_pb2.log_key]) or None
    return fd.name if fd.name in LOG_KEYS else None


def _plan(descriptor: Descriptor) -> _Plan:
    found: list[tuple[str, tuple[str, ...]]] = []
    level: list[tuple[Descriptor, tuple[str, ...]]] = [(descriptor, ())]
    for depth in range(MAX_DEPTH + 1):
        below: list[tuple[Descriptor, tuple[str, ...]]] = []
        for message_type, path in level:
            for fd in message_type.fields:
                key = _key(fd)
                if key is not None:
                    found.append((key, (*path, fd.name)))
                elif (
                    depth < MAX_DEPTH
                    and fd.type == FieldDescriptor.TYPE_MESSAGE
                    and not fd.is_repeated
                    and fd.message_type is not None
                ):
                    below.append((fd.message_type, (*path, fd.name)))
        level = below
    return tuple(found)


def _value(message: Any, path: tuple[str, ...]) -> str:
    for name in path[:-1]:
        if not message.HasField(name):
            return ""
        message = getattr(message, name)
    return str(getattr(message, path[-1]))


def bind_ids(message: Message) -> None:
    """Binds the ids `message` holds (empty ones skipped) that the call has not bound yet."""
    descriptor: Any = message.DESCRIPTOR  # upb's Descriptor, typed apart from the Python one
    plan = _plans.get(descriptor)
    if plan is None:
        plan = _plans[descriptor] = _plan(descriptor)
    if not plan:
        return
    bound = bound_keys()
    found: dict[str, str] = {}
    for key, path in plan:
        if key not in found and key not in bound:
            value = _value(message, path)
            if value:
                found[key] = value
    if found:
        bind_new(found)
