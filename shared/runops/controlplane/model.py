"""What the control plane answers, shared by the server and its client helper: the API-key
hash, the task selection of a resolved worker, and the refusals both raise (a client answering
from its cache refuses exactly as the server would)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from runops.common.v1 import common_pb2
from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.kit.errors import (
    FailedPrecondition,
    FieldViolation,
    NotFound,
    Unauthenticated,
    not_found,
)

WorkerResolution = tuple[cp.BackgroundWorker, tuple[cp.TaskDefinition, ...]]


# Reasons of a confirmed absence: cached like a found value, by the server and by clients.
INVALID_API_KEY = "INVALID_API_KEY"
ENVIRONMENT_NOT_FOUND = "ENVIRONMENT_NOT_FOUND"
ORGANIZATION_NOT_FOUND = "ORGANIZATION_NOT_FOUND"
WORKER_NOT_FOUND = "WORKER_NOT_FOUND"
NO_CURRENT_WORKER = "NO_CURRENT_WORKER"


def invalid_api_key() -> Unauthenticated:
    """One answer for every key that is not live (wrong, rotated, malformed, empty), so a
    caller learns nothing about why."""
    return Unauthenticated("the API key is not valid", reason=INVALID_API_KEY)


def environment_not_found(environment_id: str) -> NotFound:
    return not_found("environment", environment_id, "environment_id")


def organization_not_found(organization_id: str) -> NotFound:
    return not_found("organization", organization_id, "organization_id")


def no_worker(env: cp.Environment, worker: str) -> NotFound | FailedPrecondition:
    """The refusal of a worker resolution that found none: `worker` names no worker of `env`
    (WORKER_NOT_FOUND), or `env` has no current one yet (NO_CURRENT_WORKER)."""
    if worker:
        return NotFound(
            f"environment {env.id} has no worker {worker!r}",
            reason=WORKER_NOT_FOUND,
            violations=[
                FieldViolation("worker", "matches no worker id or version of the environment")
            ],
        )
    return FailedPrecondition(
        f"environment {env.id} has no "
        + (
            "registered worker"
            if env.type == common_pb2.ENVIRONMENT_TYPE_DEVELOPMENT
            else "promoted current worker"
        )
        + " yet: register (and in deployed environments promote) one first",
        reason=NO_CURRENT_WORKER,
        metadata={"environment_id": env.id},
    )


def hash_api_key(api_key: str) -> bytes:
    """sha256 of the key: what is stored, indexed, cached and named in invalidations."""
    return hashlib.sha256(api_key.encode()).digest()


def select_tasks(resolution: WorkerResolution, wanted: Sequence[str]) -> WorkerResolution:
    """The resolution with only the `wanted` tasks, in that order (all of them when empty);
    NotFound naming each `task_identifiers[i]` the worker does not have."""
    worker, tasks = resolution
    if not wanted:
        return resolution
    by_id = {t.task_identifier: t for t in tasks}
    unknown = [(i, task) for i, task in enumerate(wanted) if task not in by_id]
    if unknown:
        names = ", ".join(task for _, task in unknown)
        raise NotFound(
            f"worker {worker.version} has no task {names}",
            reason="TASK_NOT_FOUND",
            metadata={"worker_id": worker.id, "tasks": names},
            violations=[
                FieldViolation(f"task_identifiers[{i}]", "is not a task of the resolved worker")
                for i, _ in unknown
            ],
        )
    return worker, tuple(by_id[task] for task in dict.fromkeys(wanted))
