"""Request checks: every violation named in one INVALID_ARGUMENT (the kit already refused NUL,
invalid UTF-8, over-long strings and invalid times). The field rules are runops.kit.limits', the
run store's too, so a trigger the mollifier buffers is one the run store will accept when it
drains."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from google.protobuf import timestamp_pb2

from runops.common.v1 import common_pb2
from runops.kit import limits
from runops.kit.ids import ENVIRONMENT, RUN
from runops.kit.limits import (
    IDEMPOTENCY_KEY_LIMIT,
    MAX_KEYS_PER_CALL,
    TEXT_LIMIT,
    Violations,
)
from runops.mollifier.claims import KeyToClaim
from runops.mollifier.v1 import mollifier_pb2 as m
from runops.runstore.v1 import runstore_pb2 as rs

MAX_CLAIM_WAIT = timedelta(seconds=5)
# The keys of a Claim/Publish/ReleaseIdempotencyKeys request.
_Key = TypeVar("_Key", m.ClaimKeyInput, m.PublishKeyInput, m.ReleaseKeyInput)
_LEVELS = (
    common_pb2.CONSISTENCY_LEVEL_UNSPECIFIED,
    common_pb2.CONSISTENCY_LEVEL_REPLICA,
    common_pb2.CONSISTENCY_LEVEL_READ_YOUR_WRITES,
)


def environment(v: Violations, value: str, field: str = "environment_id") -> None:
    v.friendly_id(value, field, ENVIRONMENT)


def run_id(v: Violations, value: str, field: str = "run_id", *, required: bool = True) -> None:
    """A run's friendly id (`run_<body>`) or its body."""
    limits.id_body(v, value, field, RUN, bare=True, required=required)


def task(v: Violations, value: str, field: str = "task_identifier") -> None:
    limits.task_identifier(v, value, field)


def idempotency_key(v: Violations, value: str, field: str = "idempotency_key") -> None:
    v.required_text(value, field, IDEMPOTENCY_KEY_LIMIT)


def consistency(v: Violations, value: int) -> bool:
    """True for read-your-writes."""
    if value not in _LEVELS:
        v.add("consistency", f"must be a ConsistencyLevel (got {value})")
    return value == common_pb2.CONSISTENCY_LEVEL_READ_YOUR_WRITES


def _time(value: timestamp_pb2.Timestamp) -> datetime:
    return value.ToDatetime(tzinfo=UTC)


def trigger(request: m.TriggerRequest) -> rs.RunInput:
    """The trigger as a RunInput (organization and project come from the environment)."""
    v = Violations()
    environment(v, request.environment_id)
    task(v, request.task_identifier)
    run_id(v, request.run_id, required=False)
    run_id(v, request.parent_run_id, "parent_run_id", required=False)
    if request.resume_parent_on_completion and not request.parent_run_id:
        v.add("parent_run_id", "is required when resume_parent_on_completion is set")
    v.max_length(request.payload_type, "payload_type", TEXT_LIMIT)
    limits.trigger_options(v, request.options, "options")
    v.raise_if_any()
    return rs.RunInput(
        run_id=friendly_run_id(request.run_id),
        environment_id=request.environment_id,
        task_identifier=request.task_identifier,
        payload=request.payload,
        payload_type=request.payload_type,
        options=request.options,
        parent_run_id=friendly_run_id(request.parent_run_id),
        resume_parent_on_completion=request.resume_parent_on_completion,
    )


def friendly_run_id(value: str) -> str:
    return value if not value or value.startswith(f"{RUN}_") else f"{RUN}_{value}"


def _run(v: Violations, environment_id: str, run: str) -> None:
    environment(v, environment_id)
    run_id(v, run)


def run_ref(environment_id: str, run: str) -> None:
    v = Violations()
    _run(v, environment_id, run)
    v.raise_if_any()


def _key(v: Violations, environment_id: str, task_identifier: str, key: str) -> None:
    environment(v, environment_id)
    task(v, task_identifier)
    idempotency_key(v, key)


def key_ref(environment_id: str, task_identifier: str, key: str, level: int = 0) -> bool:
    """True for read-your-writes."""
    v = Violations()
    _key(v, environment_id, task_identifier, key)
    ryw = consistency(v, level)
    v.raise_if_any()
    return ryw


def get_run(request: m.GetRunRequest) -> bool:
    v = Violations()
    _run(v, request.environment_id, request.run_id)
    ryw = consistency(v, request.consistency)
    v.raise_if_any()
    return ryw


def claim(request: m.ClaimIdempotencyKeyRequest) -> KeyToClaim:
    v = Violations()
    _key(v, request.environment_id, request.task_identifier, request.idempotency_key)
    owner(v, request.owner)
    v.raise_if_any()
    return _key_to_claim(request)


def owner(v: Violations, value: str, field: str = "owner") -> None:
    """A claim's owner: optional (empty: none), and no longer than other free text."""
    v.max_length(value, field, TEXT_LIMIT)


def _key_to_claim(key: m.ClaimIdempotencyKeyRequest | m.ClaimKeyInput) -> KeyToClaim:
    expires = key.idempotency_key_expires_at
    return KeyToClaim(
        key.task_identifier,
        key.idempotency_key,
        _time(expires) if key.HasField("idempotency_key_expires_at") else None,
        key.owner,
    )


def token(v: Violations, value: str, field: str) -> None:
    v.required_text(value, field, 64)


def publish(request: m.PublishIdempotencyKeyRequest) -> KeyToClaim:
    v = Violations()
    _key(v, request.environment_id, request.task_identifier, request.idempotency_key)
    token(v, request.claim_token, "claim_token")
    run_id(v, request.run_id)
    v.raise_if_any()
    return KeyToClaim(request.task_identifier, request.idempotency_key)


def release(request: m.ReleaseIdempotencyKeyRequest) -> KeyToClaim:
    v = Violations()
    _key(v, request.environment_id, request.task_identifier, request.idempotency_key)
    token(v, request.claim_token, "claim_token")
    v.raise_if_any()
    return KeyToClaim(request.task_identifier, request.idempotency_key)


def _keys(v: Violations, environment_id: str, keys: Sequence[_Key]) -> Iterator[tuple[str, _Key]]:
    """Checks the environment, the number of keys and each key's task and idempotency key;
    yields each key checked with its field path for the caller's own checks of it (so every
    violation is named in field order)."""
    environment(v, environment_id)
    if not keys:
        v.add("keys", "is required")
    elif len(keys) > MAX_KEYS_PER_CALL:
        v.add("keys", f"must hold at most {MAX_KEYS_PER_CALL} keys (got {len(keys)})")
    for i, key in enumerate(keys[:MAX_KEYS_PER_CALL]):
        field = f"keys[{i}]"
        task(v, key.task_identifier, f"{field}.task_identifier")
        idempotency_key(v, key.idempotency_key, f"{field}.idempotency_key")
        yield field, key


def claim_many(
    request: m.ClaimIdempotencyKeysRequest, default_wait: float
) -> tuple[list[KeyToClaim], float]:
    v = Violations()
    claims: list[KeyToClaim] = []
    for field, key in _keys(v, request.environment_id, request.keys):
        owner(v, key.owner, f"{field}.owner")
        claims.append(_key_to_claim(key))
    wait = default_wait
    if request.HasField("wait"):
        asked = request.wait.ToTimedelta()
        if asked < timedelta(0) or asked > MAX_CLAIM_WAIT:
            v.add("wait", "must lie between 0 and 5 s")
        elif asked > timedelta(0):
            wait = asked.total_seconds()
    v.raise_if_any()
    return claims, wait


def publish_many(request: m.PublishIdempotencyKeysRequest) -> list[tuple[KeyToClaim, str, str]]:
    v = Violations()
    for field, key in _keys(v, request.environment_id, request.keys):
        token(v, key.claim_token, f"{field}.claim_token")
        run_id(v, key.run_id, f"{field}.run_id")
    v.raise_if_any()
    return [
        (KeyToClaim(k.task_identifier, k.idempotency_key), k.claim_token, friendly_run_id(k.run_id))
        for k in request.keys
    ]


def release_many(request: m.ReleaseIdempotencyKeysRequest) -> list[tuple[KeyToClaim, str]]:
    v = Violations()
    for field, key in _keys(v, request.environment_id, request.keys):
        token(v, key.claim_token, f"{field}.claim_token")
    v.raise_if_any()
    return [(KeyToClaim(k.task_identifier, k.idempotency_key), k.claim_token) for k in request.keys]


def add_tags(request: m.AddRunTagsRequest) -> None:
    v = Violations()
    _run(v, request.environment_id, request.run_id)
    if not request.tags:
        v.add("tags", "is required")
    limits.tags(v, request.tags, "tags")
    v.raise_if_any()


def update_metadata(request: m.UpdateRunMetadataRequest) -> None:
    v = Violations()
    _run(v, request.environment_id, request.run_id)
    limits.metadata_type(v, request.metadata_type)
    v.raise_if_any()


def reschedule(request: m.RescheduleRunRequest) -> datetime:
    v = Violations()
    _run(v, request.environment_id, request.run_id)
    limits.delay_until(v, request)
    v.raise_if_any()
    return _time(request.delay_until)


def cancel(request: m.CancelRunRequest) -> None:
    v = Violations()
    _run(v, request.environment_id, request.run_id)
    limits.cancel_reason(v, request.reason)
    v.raise_if_any()


def stats(request: m.GetBufferStatsRequest) -> None:
    if request.environment_id:
        v = Violations()
        environment(v, request.environment_id)
        v.raise_if_any()
