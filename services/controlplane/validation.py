"""Request validation: every field checked, every violation named in one INVALID_ARGUMENT."""

from __future__ import annotations

import re
from dataclasses import dataclass

from runops.common.v1 import common_pb2
from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.kit import limits
from runops.kit.ids import ENVIRONMENT, ORGANIZATION, PROJECT, WORKER
from runops.kit.limits import TASK_IDENTIFIER, TASK_IDENTIFIER_TEXT, Violations

SLUG = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?")
SLUG_TEXT = "a slug: lowercase letters, digits and inner dashes, 1-64 characters"
FLAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,63}")
FLAG_NAME_TEXT = "a flag name: 1-64 of letters, digits and _ . : - starting with a letter"
MACHINE_PRESETS = (
    "micro", "small-1x", "small-2x", "medium-1x", "medium-2x", "large-1x", "large-2x",
)  # fmt: skip
DEFAULT_MACHINE_PRESET = "small-1x"
DEFAULT_MAX_ATTEMPTS = 3
MAX_TTL_SECONDS = 30 * 24 * 3600
MAX_TASKS = 1000
MAX_BATCH_IDS = 1000
MAX_BOOTSTRAP_ENVIRONMENTS = 10
MAX_EXTRA_FLAGS = 100
MAX_FLAG_VALUE = 1024
TITLE_LIMIT = 256
VERSION_LIMIT = 128
# Matched against a worker id or version: whichever is longer.
WORKER_REF_LIMIT = 128

ENVIRONMENT_TYPES: dict[int, str] = {
    value: name.removeprefix("ENVIRONMENT_TYPE_")
    for name, value in common_pb2.EnvironmentType.items()
    if value != common_pb2.ENVIRONMENT_TYPE_UNSPECIFIED
}


def environment_id(value: str, field: str = "environment_id") -> str:
    v = Violations()
    v.friendly_id(value, field, ENVIRONMENT)
    v.raise_if_any()
    return value


def organization_id(value: str, field: str = "organization_id") -> str:
    v = Violations()
    v.friendly_id(value, field, ORGANIZATION)
    v.raise_if_any()
    return value


def environment_ids(values: list[str]) -> list[str]:
    v = Violations()
    if v.require(values, "environment_ids") and len(values) > MAX_BATCH_IDS:
        v.add("environment_ids", f"must hold at most {MAX_BATCH_IDS} ids (got {len(values)})")
    for i, value in enumerate(values[:MAX_BATCH_IDS]):
        v.friendly_id(value, f"environment_ids[{i}]", ENVIRONMENT)
    v.raise_if_any()
    return list(dict.fromkeys(values))


@dataclass(frozen=True)
class WorkerQuery:
    environment_id: str
    worker: str
    task_identifiers: tuple[str, ...]


def resolve_worker(request: cp.ResolveWorkerVersionRequest) -> WorkerQuery:
    v = Violations()
    v.friendly_id(request.environment_id, "environment_id", ENVIRONMENT)
    v.max_length(request.worker, "worker", WORKER_REF_LIMIT)
    if len(request.task_identifiers) > MAX_TASKS:
        v.add(
            "task_identifiers",
            f"must hold at most {MAX_TASKS} (got {len(request.task_identifiers)})",
        )
    for i, task in enumerate(request.task_identifiers[:MAX_TASKS]):
        v.matches(task, f"task_identifiers[{i}]", TASK_IDENTIFIER, TASK_IDENTIFIER_TEXT)
    v.raise_if_any()
    return WorkerQuery(request.environment_id, request.worker, tuple(request.task_identifiers))


def _slug(v: Violations, value: str, field: str) -> None:
    if v.required_text(value, field, 64):
        v.matches(value, field, SLUG, SLUG_TEXT)


def create_organization(request: cp.CreateOrganizationRequest) -> None:
    v = Violations()
    _slug(v, request.slug, "slug")
    v.required_text(request.title, "title", TITLE_LIMIT)
    v.raise_if_any()


def create_project(request: cp.CreateProjectRequest) -> None:
    v = Violations()
    v.friendly_id(request.organization_id, "organization_id", ORGANIZATION)
    _slug(v, request.slug, "slug")
    v.required_text(request.name, "name", TITLE_LIMIT)
    v.raise_if_any()


def create_environment(request: cp.CreateEnvironmentRequest) -> str:
    """Returns the environment type's database name."""
    v = Violations()
    v.friendly_id(request.project_id, "project_id", PROJECT)
    _slug(v, request.slug, "slug")
    v.enum(request.type, "type", ENVIRONMENT_TYPES)
    v.raise_if_any()
    return ENVIRONMENT_TYPES[request.type]


@dataclass(frozen=True)
class Bootstrap:
    slug: str
    title: str
    project_slug: str
    project_name: str
    # (slug, the type's database name) per environment, in the order requested
    environments: tuple[tuple[str, str], ...]


def bootstrap_organization(request: cp.BootstrapOrganizationRequest) -> Bootstrap:
    """Everything the store could refuse is checked here, so that a refusal costs no
    transaction; the transaction still makes any later failure leave nothing behind."""
    v = Violations()
    _slug(v, request.slug, "slug")
    v.required_text(request.title, "title", TITLE_LIMIT)
    if request.project_slug:
        _slug(v, request.project_slug, "project_slug")
    v.max_length(request.project_name, "project_name", TITLE_LIMIT)
    envs = request.environments
    if v.require(list(envs), "environments") and len(envs) > MAX_BOOTSTRAP_ENVIRONMENTS:
        v.add("environments", f"must hold at most {MAX_BOOTSTRAP_ENVIRONMENTS} (got {len(envs)})")
    seen: set[str] = set()
    for i, env in enumerate(envs[:MAX_BOOTSTRAP_ENVIRONMENTS]):
        at = f"environments[{i}]"
        _slug(v, env.slug, f"{at}.slug")
        if env.slug in seen:
            v.add(f"{at}.slug", f"{env.slug!r} appears twice")
        seen.add(env.slug)
        v.enum(env.type, f"{at}.type", ENVIRONMENT_TYPES)
    v.raise_if_any()
    return Bootstrap(
        request.slug,
        request.title,
        request.project_slug or request.slug,
        request.project_name or request.title,
        tuple((env.slug, ENVIRONMENT_TYPES[env.type]) for env in envs),
    )


@dataclass(frozen=True)
class FlagChanges:
    organization_id: str
    mollifier_enabled: bool | None
    mollifier_shadow_mode: bool | None
    set_extra: dict[str, str]
    remove_extra: tuple[str, ...]


def set_flags(request: cp.SetOrganizationFlagsRequest) -> FlagChanges:
    v = Violations()
    v.friendly_id(request.organization_id, "organization_id", ORGANIZATION)
    extra = dict(request.set_extra)
    if len(extra) + len(request.remove_extra) > MAX_EXTRA_FLAGS:
        v.add("set_extra", f"at most {MAX_EXTRA_FLAGS} flags may change at once")
    for name, value in extra.items():
        v.matches(name, f"set_extra[{name[:64]!r}]", FLAG_NAME, FLAG_NAME_TEXT)
        v.max_length(value, f"set_extra[{name[:64]!r}]", MAX_FLAG_VALUE)
    for i, name in enumerate(request.remove_extra):
        if v.matches(name, f"remove_extra[{i}]", FLAG_NAME, FLAG_NAME_TEXT) and name in extra:
            v.add(f"remove_extra[{i}]", f"flag {name!r} is both set and removed")
    v.raise_if_any()
    return FlagChanges(
        request.organization_id,
        request.mollifier_enabled if request.HasField("mollifier_enabled") else None,
        request.mollifier_shadow_mode if request.HasField("mollifier_shadow_mode") else None,
        extra,
        tuple(dict.fromkeys(request.remove_extra)),
    )


@dataclass(frozen=True)
class TaskRow:
    task_identifier: str
    queue: str
    default_ttl_ms: int | None
    max_attempts: int
    machine_preset: str


def register_worker(request: cp.RegisterWorkerRequest) -> tuple[TaskRow, ...]:
    """Validates the worker and returns its tasks with defaults filled in."""
    v = Violations()
    v.friendly_id(request.environment_id, "environment_id", ENVIRONMENT)
    v.required_text(request.version, "version", VERSION_LIMIT)
    v.max_length(request.sdk_version, "sdk_version", VERSION_LIMIT)
    if len(request.tasks) > MAX_TASKS:
        v.add("tasks", f"must hold at most {MAX_TASKS} tasks (got {len(request.tasks)})")
    rows: list[TaskRow] = []
    seen: set[str] = set()
    for i, task in enumerate(request.tasks[:MAX_TASKS]):
        at = f"tasks[{i}]"
        if limits.task_identifier(v, task.task_identifier, f"{at}.task_identifier"):
            if task.task_identifier in seen:
                v.add(f"{at}.task_identifier", f"{task.task_identifier!r} appears twice")
            seen.add(task.task_identifier)
        v.max_length(task.queue, f"{at}.queue", WORKER_REF_LIMIT)
        ttl_ms: int | None = None
        if task.HasField("default_ttl"):
            ttl = task.default_ttl
            if ttl.seconds < 0 or ttl.nanos < 0 or (ttl.seconds == 0 and ttl.nanos < 1_000_000):
                v.add(f"{at}.default_ttl", "must be at least 1ms")
            elif ttl.seconds > MAX_TTL_SECONDS:
                v.add(f"{at}.default_ttl", f"must be at most {MAX_TTL_SECONDS // 86400} days")
            else:
                ttl_ms = ttl.ToMilliseconds()
        limits.max_attempts(v, task.max_attempts, f"{at}.max_attempts")
        if task.machine_preset and task.machine_preset not in MACHINE_PRESETS:
            v.add(f"{at}.machine_preset", f"must be one of {', '.join(MACHINE_PRESETS)}")
        rows.append(
            TaskRow(
                task.task_identifier,
                task.queue or f"task/{task.task_identifier}",
                ttl_ms,
                task.max_attempts or DEFAULT_MAX_ATTEMPTS,
                task.machine_preset or DEFAULT_MACHINE_PRESET,
            )
        )
    v.raise_if_any()
    return tuple(rows)


def promote_worker(request: cp.PromoteWorkerRequest) -> None:
    v = Violations()
    v.friendly_id(request.environment_id, "environment_id", ENVIRONMENT)
    v.friendly_id(request.worker_id, "worker_id", WORKER)
    v.raise_if_any()
