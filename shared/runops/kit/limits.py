"""What a run's fields may hold: one set of rules for every service that checks them (the
control plane for task definitions, the run store that writes runs, and the mollifier and ingest,
which refuse first so a caller learns which item or field is wrong).

A checker adds each violation it finds to a `Violations`, which fails once naming them all.
`trigger_options_fit` says whether `trigger_options` would find nothing without building a field
path (the run store's per-row fast path), so no service holds a copy of these rules.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from operator import attrgetter

from google.protobuf import duration_pb2
from google.protobuf.message import Message

from runops.common.v1 import common_pb2
from runops.kit.errors import FieldViolation, InvalidArgument, summarize_fields
from runops.kit.ids import EPOCH, split_friendly_id

__all__ = [
    "DEFAULT_IDEMPOTENCY_KEY_TTL",
    "DEFAULT_PAGE_SIZE",
    "EPOCH",
    "FINAL_BATCH_STATUSES",
    "IDEMPOTENCY_KEY_LIMIT",
    "ID_BODY",
    "ID_LIMIT",
    "MAX_ATTEMPTS",
    "MAX_INDEX",
    "MAX_ITEMS_PER_CALL",
    "MAX_KEYS_PER_CALL",
    "MAX_MISSING_RANGES",
    "MAX_PAGE_SIZE",
    "MAX_RUNS_PER_CALL",
    "MAX_RUN_COUNT",
    "MAX_TAGS",
    "OPTION_DURATIONS",
    "OPTION_TEXT_LIMITS",
    "REASON_LIMIT",
    "TAG_LIMIT",
    "TASK_IDENTIFIER",
    "TASK_IDENTIFIER_LIMIT",
    "TASK_IDENTIFIER_TEXT",
    "TEXT_LIMIT",
    "Violations",
    "cancel_reason",
    "delay_until",
    "id_body",
    "ids_fit",
    "max_attempts",
    "metadata_type",
    "negative",
    "tags",
    "task_identifier",
    "trigger_options",
    "trigger_options_fit",
]

# An id body (the part after "<prefix>_"): LEGACY and NEW bodies both fit.
ID_BODY = re.compile(r"[0-9a-z]{1,64}")
# Characters of a whole id, prefix included.
ID_LIMIT = 64
TASK_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}")
TASK_IDENTIFIER_TEXT = "1-128 of letters, digits and _ . : / - starting with a letter or digit"
TASK_IDENTIFIER_LIMIT = 128
IDEMPOTENCY_KEY_LIMIT = 512
# Queue names, concurrency keys, machine presets, versions and other short texts.
TEXT_LIMIT = 256
# Why a run was cancelled.
REASON_LIMIT = TEXT_LIMIT * 16
MAX_TAGS = 10
TAG_LIMIT = 128
MAX_ATTEMPTS = 100
# How long an idempotency key stays claimed when the trigger does not say.
DEFAULT_IDEMPOTENCY_KEY_TTL = timedelta(days=30)
# Batch indexes are Postgres integers.
MAX_INDEX = 2**31 - 1
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
# Missing index ranges one answer carries at most (more: `truncated`).
MAX_MISSING_RANGES = 1000
# Idempotency keys one claim, publish or release call may carry.
MAX_KEYS_PER_CALL = 10_000
# Runs one CreateRuns call, and items one AcceptBatchItems call, may carry.
MAX_RUNS_PER_CALL = 10_000
MAX_ITEMS_PER_CALL = 10_000
# The largest batch the run store writes (ingest's RUNOPS_MAX_RUN_COUNT may not exceed it).
MAX_RUN_COUNT = 1_000_000
# A batch in one of these statuses changes no more.
FINAL_BATCH_STATUSES = frozenset(
    {common_pb2.BATCH_STATUS_COMPLETED, common_pb2.BATCH_STATUS_ABORTED}
)


class Violations:
    """Collects every field violation of a request before failing once, naming them all."""

    def __init__(self) -> None:
        self._items: list[FieldViolation] = []

    def __bool__(self) -> bool:
        return bool(self._items)

    def add(self, field_path: str, description: str) -> None:
        self._items.append(FieldViolation(field_path, description))

    def require(self, value: object, field_path: str) -> bool:
        if value in ("", None, b"") or (isinstance(value, (list, tuple)) and not value):
            self.add(field_path, "is required")
            return False
        return True

    def max_length(self, value: str, field_path: str, limit: int) -> bool:
        if len(value) > limit:
            self.add(field_path, f"must be at most {limit} characters (got {len(value)})")
            return False
        return True

    def required_text(self, value: str, field_path: str, limit: int) -> bool:
        return self.require(value, field_path) and self.max_length(value, field_path, limit)

    def matches(self, value: str, field_path: str, pattern: re.Pattern[str], what: str) -> bool:
        """`value` must fully match `pattern`; `what` tells the caller what that means."""
        if pattern.fullmatch(value) is None:
            self.add(field_path, f"must be {what} (got {value[:64]!r})")
            return False
        return True

    def friendly_id(self, value: str, field_path: str, prefix: str) -> bool:
        """A required `<prefix>_<body>` id of at most ID_LIMIT characters."""
        if not self.required_text(value, field_path, ID_LIMIT):
            return False
        if split_friendly_id(value) is None or not value.startswith(prefix + "_"):
            self.add(field_path, f"must be an id like {prefix}_<body> (got {value[:64]!r})")
            return False
        return True

    def enum(self, value: int, field_path: str, allowed: Mapping[int, str]) -> bool:
        """`allowed` maps the accepted numeric values to their names (UNSPECIFIED excluded)."""
        if value not in allowed:
            names = ", ".join(sorted(allowed.values()))
            self.add(field_path, f"must be one of {names} (got {value})")
            return False
        return True

    def raise_if_any(self, message: str = "the request has invalid fields") -> None:
        if self._items:
            fields = summarize_fields([v.field for v in self._items], len(self._items))
            raise InvalidArgument(f"{message}: {fields}", violations=self._items)


def id_body(
    v: Violations,
    value: str,
    field: str,
    prefix: str,
    *,
    bare: bool = False,
    required: bool = True,
) -> str:
    """The body of a `<prefix>_<body>` id (with `bare`, of a bare body too); "" when the id is
    absent or refused."""
    if not value:
        if required:
            v.add(field, "is required")
        return ""
    body = value.removeprefix(prefix + "_")
    if (body == value and not bare) or len(value) > ID_LIMIT or ID_BODY.fullmatch(body) is None:
        shape = " or the bare body" if bare else ""
        v.add(
            field,
            f"must be an id like {prefix}_<body>{shape} (the body 1-64 lowercase letters and "
            f"digits; got {value[:64]!r})",
        )
        return ""
    return body


def ids_fit(values: Iterable[str], prefix: str) -> bool:
    """True exactly when `id_body(..., prefix, required=False)` refuses none of `values` (each
    empty or a `<prefix>_<body>` id): a whole column in one pass, no field path built (the run
    store's bulk fast path; tests/kit/test_limits.py holds the two to agreement)."""
    return all(map(_optional_id(prefix).fullmatch, values))


@functools.cache
def _optional_id(prefix: str) -> re.Pattern[str]:
    """id_body's rule as one pattern: the body ID_BODY, the whole id at most ID_LIMIT long."""
    return re.compile(rf"(?:{re.escape(prefix)}_[0-9a-z]{{1,{ID_LIMIT - len(prefix) - 1}}})?")


def task_identifier(v: Violations, value: str, field: str) -> bool:
    return v.require(value, field) and v.matches(
        value, field, TASK_IDENTIFIER, TASK_IDENTIFIER_TEXT
    )


def tags(v: Violations, values: Sequence[str], field: str) -> None:
    if len(values) > MAX_TAGS:
        v.add(field, f"must hold at most {MAX_TAGS} tags (got {len(values)})")
    for i, tag in enumerate(values[:MAX_TAGS]):
        v.required_text(tag, f"{field}[{i}]", TAG_LIMIT)


def max_attempts(v: Violations, value: int, field: str) -> None:
    if value > MAX_ATTEMPTS:
        v.add(field, f"must be at most {MAX_ATTEMPTS} (got {value})")


def metadata_type(v: Violations, value: str, field: str = "metadata_type") -> None:
    v.max_length(value, field, TEXT_LIMIT)


def cancel_reason(v: Violations, value: str, field: str = "reason") -> None:
    v.max_length(value, field, REASON_LIMIT)


def delay_until(v: Violations, request: Message, field: str = "delay_until") -> bool:
    """A rescheduled run's new time: `request`'s Timestamp field `field`, required."""
    if not request.HasField(field):
        v.add(field, "is required")
        return False
    return True


def negative(duration: duration_pb2.Duration) -> bool:
    """A negative duration, however short (the kit's request check already refused one whose
    seconds and nanos disagree in sign)."""
    return duration.seconds < 0 or duration.nanos < 0


# A trigger's options, wherever a trigger enters: the mollifier's Trigger, an ingest batch item,
# the run store's CreateRun / CreateRuns / AcceptBatchItems. Texts and their limits, by path below
# the options; durations that must not be negative.
OPTION_TEXT_LIMITS: Mapping[str, int] = {
    "idempotency_key": IDEMPOTENCY_KEY_LIMIT,
    "queue": TEXT_LIMIT,
    "concurrency_key": TEXT_LIMIT,
    "machine_preset": TEXT_LIMIT,
    "lock_to_version": TEXT_LIMIT,
    "one_time_use_token": TEXT_LIMIT,
    "debounce.key": TEXT_LIMIT,
}
OPTION_DURATIONS = ("idempotency_key_ttl", "ttl", "priority")
_OPTION_TEXTS = [(path, limit, attrgetter(path)) for path, limit in OPTION_TEXT_LIMITS.items()]
_OPTION_DURATIONS = [(path, attrgetter(path)) for path in OPTION_DURATIONS]


def trigger_options(v: Violations, options: common_pb2.TriggerOptions, field: str) -> None:
    """Every rule of TriggerOptions, each violation named under `field` (e.g. "options")."""
    for path, limit, value in _OPTION_TEXTS:
        v.max_length(value(options), f"{field}.{path}", limit)
    tags(v, options.tags, f"{field}.tags")
    for path, duration in _OPTION_DURATIONS:
        if negative(duration(options)):
            v.add(f"{field}.{path}", "must not be negative")
    max_attempts(v, options.max_attempts, f"{field}.max_attempts")


def trigger_options_fit(options: common_pb2.TriggerOptions) -> bool:
    """True exactly when `trigger_options` finds nothing, building no field path: the run
    store's per-row fast path. The same rules written out, several times faster than walking
    the tables above; tests/kit/test_limits.py holds the two to agreement."""
    tags = options.tags
    return (
        len(options.idempotency_key) <= IDEMPOTENCY_KEY_LIMIT
        and len(options.queue) <= TEXT_LIMIT
        and len(options.concurrency_key) <= TEXT_LIMIT
        and len(options.machine_preset) <= TEXT_LIMIT
        and len(options.lock_to_version) <= TEXT_LIMIT
        and len(options.one_time_use_token) <= TEXT_LIMIT
        and len(options.debounce.key) <= TEXT_LIMIT
        and (not tags or (len(tags) <= MAX_TAGS and all(0 < len(t) <= TAG_LIMIT for t in tags)))
        and all(
            d.seconds >= 0 and d.nanos >= 0
            for d in (options.idempotency_key_ttl, options.ttl, options.priority)
        )
        and options.max_attempts <= MAX_ATTEMPTS
    )
