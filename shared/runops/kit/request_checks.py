"""The input check every request gets before its handler runs, whatever the service.

Every string field, at any depth (nested and repeated messages, map keys and values, oneofs), must
hold no NUL character and no lone surrogate, and at most its cap of characters: the field's
`(runops.common.v1.max_length)` option, else DEFAULT_MAX_LENGTH. Every `google.protobuf.Duration`
and `Timestamp` must be one the well-known types allow. Postgres rejects a NUL (and a driver a
surrogate) only once a handler reached it, as INTERNAL; here it is INVALID_ARGUMENT naming the
field path, e.g. `tasks[3].queue` or `set_extra["k"]`.

What to check is worked out once per message type (cached by descriptor) and pruned to the fields
that can hold a string or a time, so the walk costs about one regex scan per string.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from runops.common.v1 import options_pb2
from runops.kit.errors import FieldViolation, InvalidArgument, summarize_fields

# Characters (code points) a string field may hold unless its contract says otherwise.
DEFAULT_MAX_LENGTH = 4096
# Violations kept for the reply (the status carries fewer still); the rest are only counted.
KEPT_VIOLATIONS = 100
REASON = "INVALID_REQUEST_FIELD"

_FORBIDDEN = re.compile("[\x00\ud800-\udfff]")
# google/protobuf/duration.proto and timestamp.proto: the ranges the types define.
_MAX_DURATION_SECONDS = 315_576_000_000
_MAX_NANOS = 999_999_999
_MIN_TIMESTAMP_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z
_MAX_TIMESTAMP_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z

_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE
_DURATION = "google.protobuf.Duration"
_TIMESTAMP = "google.protobuf.Timestamp"

# Kinds of plan entries.
_STR, _STR_LIST, _MSG, _MSG_LIST, _MAP = range(5)


@dataclass
class _Plan:
    """What to check in one message type: entries of (kind, field name, cap, sub-plan, key
    cap) for its fields that can hold a string or a time; `time` for Duration/Timestamp."""

    time: str | None = None
    entries: list[tuple[int, str, int, _Plan | None, int]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.time is None and not self.entries


_plans: dict[Descriptor, _Plan] = {}


def max_length(fd: FieldDescriptor) -> int:
    """The most characters string field `fd` may hold (its contract's cap, else the default)."""
    options = fd.GetOptions()
    if options.HasExtension(options_pb2.max_length):
        return int(options.Extensions[options_pb2.max_length])
    return DEFAULT_MAX_LENGTH


def _plan(descriptor: Descriptor) -> _Plan:
    plan = _plans.get(descriptor)
    if plan is not None:
        return plan
    built: dict[Descriptor, _Plan] = {}
    root = _build(descriptor, built)
    _prune(built)
    _plans.update(built)
    return root


def _build(descriptor: Descriptor, built: dict[Descriptor, _Plan]) -> _Plan:
    known = _plans.get(descriptor) or built.get(descriptor)
    if known is not None:
        return known
    plan = built[descriptor] = _Plan()
    if descriptor.full_name in (_DURATION, _TIMESTAMP):
        plan.time = descriptor.full_name
        return plan
    for fd in descriptor.fields:
        cap = max_length(fd)
        if fd.type == _STRING:
            plan.entries.append((_STR_LIST if fd.is_repeated else _STR, fd.name, cap, None, 0))
        elif fd.type == _MESSAGE:
            sub_type = fd.message_type
            assert sub_type is not None  # a message field names its type
            if sub_type.GetOptions().map_entry:
                key, value = sub_type.fields_by_name["key"], sub_type.fields_by_name["value"]
                value_type: Descriptor | None = value.message_type
                value_plan = None if value_type is None else _build(value_type, built)
                if key.type != _STRING and value.type != _STRING and value_plan is None:
                    continue
                # A map's cap applies to its values; keys get the default.
                key_cap = DEFAULT_MAX_LENGTH if key.type == _STRING else 0
                value_cap = cap if value.type == _STRING else 0
                plan.entries.append((_MAP, fd.name, value_cap, value_plan, key_cap))
            else:
                sub = _build(sub_type, built)
                plan.entries.append((_MSG_LIST if fd.is_repeated else _MSG, fd.name, 0, sub, 0))
    return plan


def _prune(built: dict[Descriptor, _Plan]) -> None:
    """Drop message entries whose type can hold nothing to check (fixpoint: types may recurse)."""
    relevant = {id(p) for p in _plans.values() if not p.empty}
    changed = True
    while changed:
        changed = False
        for plan in built.values():
            if id(plan) in relevant:
                continue
            if plan.time or any(
                kind in (_STR, _STR_LIST)
                or (kind == _MAP and (key_cap or cap))
                or (sub is not None and id(sub) in relevant)
                for kind, _, cap, sub, key_cap in plan.entries
            ):
                relevant.add(id(plan))
                changed = True
    for plan in built.values():
        plan.entries = [
            e
            for e in plan.entries
            if e[0] in (_STR, _STR_LIST)
            or (e[0] == _MAP and (e[4] or e[2]))
            or (e[3] is not None and id(e[3]) in relevant)
        ]


# A field path, built only when a violation needs it: (parent, segment) links.
_Path = tuple[Any, ...] | None


def _render(path: _Path) -> str:
    parts: list[str] = []
    while path is not None:
        path, segment = path
        parts.append(segment)
    out = ""
    for segment in reversed(parts):
        if isinstance(segment, int):
            out += f"[{segment}]"
        elif segment.startswith("["):
            out += segment
        else:
            out += f".{segment}" if out else segment
    return out


def _key(key: object) -> str:
    return f"[{json.dumps(key[:64]) if isinstance(key, str) else key}]"


class _Walk:
    def __init__(self) -> None:
        self.found: list[FieldViolation] = []
        self.count = 0

    def add(self, path: _Path, description: str) -> None:
        self.count += 1
        if len(self.found) < KEPT_VIOLATIONS:
            self.found.append(FieldViolation(_render(path), description))

    def string(self, value: str, cap: int, path: _Path, what: str = "") -> None:
        if len(value) > cap:
            self.add(path, f"{what}must be at most {cap} characters (got {len(value)})")
        bad = _FORBIDDEN.search(value)
        if bad is not None:
            if bad.group() == "\x00":
                self.add(path, f"{what}must not contain a NUL character")
            else:
                self.add(path, f"{what}must be valid UTF-8 (holds a lone surrogate)")

    def time(self, kind: str, value: Any, path: _Path) -> None:
        seconds, nanos = value.seconds, value.nanos
        if kind == _DURATION:
            if not -_MAX_NANOS <= nanos <= _MAX_NANOS:
                self.add(path, f"nanos must be within ±{_MAX_NANOS:,} (got {nanos})")
            elif (seconds > 0 and nanos < 0) or (seconds < 0 and nanos > 0):
                self.add(path, "seconds and nanos must have the same sign")
            elif not -_MAX_DURATION_SECONDS <= seconds <= _MAX_DURATION_SECONDS:
                self.add(path, "must be within ±10,000 years")
        elif not 0 <= nanos <= _MAX_NANOS:
            self.add(path, f"nanos must be within 0..{_MAX_NANOS:,} (got {nanos})")
        elif not _MIN_TIMESTAMP_SECONDS <= seconds <= _MAX_TIMESTAMP_SECONDS:
            self.add(path, "must be between 0001-01-01 and 9999-12-31")

    def message(self, message: Any, plan: _Plan, path: _Path) -> None:
        if plan.time is not None:
            self.time(plan.time, message, path)
            return
        for kind, name, cap, sub, key_cap in plan.entries:
            if kind == _STR:
                value = getattr(message, name)
                if value:
                    self.string(value, cap, (path, name))
            elif kind == _STR_LIST:
                values = getattr(message, name)
                # All at once first (a request may carry thousands of ids): element by element,
                # field paths built, only when one of them fails.
                if values and (max(map(len, values)) > cap or _FORBIDDEN.search("".join(values))):
                    for i, value in enumerate(values):
                        self.string(value, cap, ((path, name), i))
            elif kind == _MSG:
                if message.HasField(name):
                    assert sub is not None
                    self.message(getattr(message, name), sub, (path, name))
            elif kind == _MSG_LIST:
                assert sub is not None
                for i, item in enumerate(getattr(message, name)):
                    self.message(item, sub, ((path, name), i))
            else:
                self.map(getattr(message, name), name, cap, sub, key_cap, path)

    def map(
        self, entries: Any, name: str, cap: int, sub: _Plan | None, key_cap: int, path: _Path
    ) -> None:
        for key, value in entries.items():
            at = ((path, name), _key(key))
            if key_cap:
                self.string(key, key_cap, at, "key ")
            if cap:
                self.string(value, cap, at)
            elif sub is not None:
                self.message(value, sub, at)


def request_violations(message: Message) -> tuple[list[FieldViolation], int]:
    """The first KEPT_VIOLATIONS violations of `message` and how many there are in all."""
    descriptor: Any = message.DESCRIPTOR  # upb's Descriptor, typed apart from the Python one
    plan = _plan(descriptor)
    if plan.empty:
        return [], 0
    walk = _Walk()
    walk.message(message, plan, None)
    return walk.found, walk.count


def check_request(message: Message) -> None:
    """Raises INVALID_ARGUMENT naming every bad string or time field of `message`."""
    found, count = request_violations(message)
    if count:
        raise InvalidArgument(
            f"the request has invalid fields: {summarize_fields([v.field for v in found], count)}",
            reason=REASON,
            violations=found,
            omitted_violations=count - len(found),
        )
