"""Control planes (in-process or as OS processes) and seeded environments for the tests."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

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
