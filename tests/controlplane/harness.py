"""Control planes (in-process or as OS processes) and seeded environments for the tests."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from google.protobuf import duration_pb2

from runops.common.v1 import common_pb2
from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.controlplane.v1 import controlplane_pb2_grpc as cp_grpc
from runops.localstack import LocalStack
from runops.localstack.ports import free_port
from runops.localstack.services import ServiceProcess
from runops.localstack.settings import ADMIN_TOKEN, database, in_process_settings, process_env
from services.controlplane.app import ControlPlane, build_control_plane
from services.controlplane.settings import ControlPlaneSettings
from tests.harness import stub_on

if TYPE_CHECKING:
    from runops.controlplane.v1.controlplane_pb2_grpc import ControlPlaneServiceAsyncStub

    # The generated stub is typed by channel kind; ours are always grpc.aio.
    Stub: TypeAlias = ControlPlaneServiceAsyncStub
else:
    Stub = cp_grpc.ControlPlaneServiceStub


def settings_for(stack: LocalStack, **overrides: Any) -> ControlPlaneSettings:
    # controlplane_db={...} overrides single database settings, keeping the others.
    db = database(stack.controlplane_db, **overrides.pop("controlplane_db", {}))
    values = {"admin_token": ADMIN_TOKEN, **overrides, "controlplane_db": db}
    return in_process_settings(ControlPlaneSettings, **values)


async def start_control_plane(stack: LocalStack, **overrides: Any) -> ControlPlane:
    plane = await build_control_plane(settings_for(stack, **overrides))
    await plane.app.start()
    return plane


def stub(target: str, token: str | None) -> Stub:
    return stub_on(cp_grpc.ControlPlaneServiceStub, target, token)


@dataclass(frozen=True)
class Seeded:
    organization: cp.Organization
    project: cp.Project
    environment: cp.Environment
    api_key: str

    @property
    def env_id(self) -> str:
        return self.environment.id

    @property
    def org_id(self) -> str:
        return self.organization.id


async def seed(
    admin: Stub,
    env_type: common_pb2.EnvironmentType.ValueType = common_pb2.ENVIRONMENT_TYPE_DEVELOPMENT,
    organization: cp.Organization | None = None,
) -> Seeded:
    """A fresh organization (unless given), project and environment with its API key."""
    suffix = secrets.token_hex(4)
    if organization is None:
        organization = (
            await admin.CreateOrganization(
                cp.CreateOrganizationRequest(slug=f"org-{suffix}", title=f"Org {suffix}")
            )
        ).organization
    project = (
        await admin.CreateProject(
            cp.CreateProjectRequest(
                organization_id=organization.id, slug=f"proj-{suffix}", name=f"Project {suffix}"
            )
        )
    ).project
    created = await admin.CreateEnvironment(
        cp.CreateEnvironmentRequest(project_id=project.id, slug=f"env-{suffix}", type=env_type)
    )
    return Seeded(organization, project, created.environment, created.api_key)


@contextlib.asynccontextmanager
async def control_plane_process(
    stack: LocalStack, log_file: Path, **env: str
) -> AsyncIterator[str]:
    """A second control plane as a real OS process (`python -m services.controlplane`); yields
    its target once it answers health SERVING."""
    environ = process_env(stack, RUNOPS_ADMIN_TOKEN=ADMIN_TOKEN, **env)
    async with ServiceProcess("controlplane", free_port(), -1, log_file, env=environ) as process:
        yield process.target


@dataclass(frozen=True)
class Workers:
    """Two workers of one environment whose task defaults differ: `current` is the one new
    runs take theirs from, `other` the one they must not."""

    current: cp.RegisterWorkerResponse
    other: cp.RegisterWorkerResponse

    def expected(self, task_identifier: str) -> RunDefaults:
        """What a run of `task_identifier` without options takes from the current worker."""
        task = next(t for t in self.current.tasks if t.task_identifier == task_identifier)
        ttl = task.default_ttl.seconds if task.HasField("default_ttl") else None
        return RunDefaults(
            task.queue, ttl, task.max_attempts, task.machine_preset, self.current.worker.version
        )


@dataclass(frozen=True)
class RunDefaults:
    """The fields of a run that task defaults fill, and the worker version it took them from."""

    queue: str
    ttl_seconds: int | None
    max_attempts: int
    machine_preset: str
    worker_version: str

    @classmethod
    def of(cls, run: common_pb2.Run) -> RunDefaults:
        ttl = run.ttl.seconds if run.HasField("ttl") else None
        return cls(run.queue, ttl, run.max_attempts, run.machine_preset, run.worker_version)


# A run that took no task defaults: the run store's platform defaults.
PLATFORM_DEFAULTS = RunDefaults("", None, 0, "", "")
# Options that set every field task defaults fill, and what a run with them holds.
EXPLICIT_OPTIONS = common_pb2.TriggerOptions(
    queue="mine", ttl=duration_pb2.Duration(seconds=30), max_attempts=2, machine_preset="micro"
)


def explicit_defaults(worker_version: str) -> RunDefaults:
    return RunDefaults("mine", 30, 2, "micro", worker_version)


# The environment types whose current worker differs: the most recent, the promoted one.
ENV_TYPES = {
    "dev": common_pb2.ENVIRONMENT_TYPE_DEVELOPMENT,
    "deployed": common_pb2.ENVIRONMENT_TYPE_PRODUCTION,
}


def _worker_tasks(queue: str, ttl_seconds: int, max_attempts: int) -> list[cp.TaskDefinition]:
    return [
        cp.TaskDefinition(
            task_identifier="email/send",
            queue=queue,
            default_ttl=duration_pb2.Duration(seconds=ttl_seconds),
            max_attempts=max_attempts,
            machine_preset="large-1x",
        ),
        cp.TaskDefinition(task_identifier="sms/send"),  # the control plane's defaults
    ]


async def register_workers(admin: Stub, env: Seeded) -> Workers:
    """Worker "1" and then worker "2" (its tasks' defaults differ), with "1" promoted in a
    deployed environment: DEVELOPMENT takes the most recent ("2"), a deployed environment the
    promoted one ("1", not the most recent)."""
    first = await admin.RegisterWorker(
        cp.RegisterWorkerRequest(
            environment_id=env.env_id, version="1", tasks=_worker_tasks("first", 600, 5)
        )
    )
    deployed = env.environment.type != common_pb2.ENVIRONMENT_TYPE_DEVELOPMENT
    if deployed:
        await admin.PromoteWorker(
            cp.PromoteWorkerRequest(environment_id=env.env_id, worker_id=first.worker.id)
        )
    second = await admin.RegisterWorker(
        cp.RegisterWorkerRequest(
            environment_id=env.env_id, version="2", tasks=_worker_tasks("second", 1200, 7)
        )
    )
    return Workers(first, second) if deployed else Workers(second, first)
