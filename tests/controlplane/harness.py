"""Control-plane processes and seeded environments for the tests and the benchmark."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import pytest

from runops.common.v1 import common_pb2
from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.controlplane.v1 import controlplane_pb2_grpc as cp_grpc
from runops.kit.channels import create_channel
from runops.kit.settings import load_settings
from runops.localstack import LocalStack
from runops.localstack.ports import free_port
from runops.localstack.services import ServiceProcess
from services.controlplane.app import ControlPlane, build_control_plane
from services.controlplane.settings import ControlPlaneSettings

if TYPE_CHECKING:
    from runops.controlplane.v1.controlplane_pb2_grpc import ControlPlaneServiceAsyncStub

    # The generated stub is typed by channel kind; ours are always grpc.aio.
    Stub: TypeAlias = ControlPlaneServiceAsyncStub
else:
    Stub = cp_grpc.ControlPlaneServiceStub

ADMIN = "admin-token-for-tests"
INTERNAL = "internal-token-for-tests"


def settings_for(stack: LocalStack, **overrides: Any) -> ControlPlaneSettings:
    values: dict[str, Any] = {
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": -1,
        "grace_period_seconds": 2,
        "health_check_interval_seconds": 0.2,
        "admin_token": ADMIN,
        "internal_token": INTERNAL,
    }
    database: dict[str, Any] = {
        "writer_url": stack.controlplane_db.writer_dsn,
        "replica_url": stack.controlplane_db.replica_dsn,
    }
    # controlplane_db={...} overrides single database settings, keeping the others.
    database.update(overrides.pop("controlplane_db", {}))
    values.update(overrides, controlplane_db=database)
    return load_settings(ControlPlaneSettings, **values)


async def start_control_plane(stack: LocalStack, **overrides: Any) -> ControlPlane:
    plane = await build_control_plane(settings_for(stack, **overrides))
    await plane.app.start()
    return plane


# A grpc.aio channel closes when collected; stubs do not keep theirs alive.
_channels: list[grpc.aio.Channel] = []


def stub(target: str, token: str | None) -> Stub:
    channel = create_channel(target, token=token)
    _channels.append(channel)
    return cp_grpc.ControlPlaneServiceStub(channel)


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


async def expect_error(call: Any, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """Await `call`; it must fail with `code`. Returns the error for its details."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    exc = caught.value
    assert exc.code() == code, f"expected {code.name}, got {exc.code().name}: {exc.details()}"
    return exc


@contextlib.asynccontextmanager
async def control_plane_process(
    stack: LocalStack, log_file: Path, **env: str
) -> AsyncIterator[str]:
    """A second control plane as a real OS process (`python -m services.controlplane`); yields
    its target once it answers health SERVING."""
    environ = {
        **stack.service_env(),
        "RUNOPS_ADMIN_TOKEN": ADMIN,
        "RUNOPS_INTERNAL_TOKEN": INTERNAL,
        "RUNOPS_LOG_FORMAT": "console",
        **env,
    }
    async with ServiceProcess("controlplane", free_port(), -1, log_file, env=environ) as process:
        yield process.target


async def until(
    check: Callable[[], Awaitable[bool]], limit: float = 5.0, interval: float = 0.01
) -> float:
    """Poll `check` until it is true; returns the seconds it took (fails after `limit`)."""
    began = time.monotonic()
    while not await check():
        if time.monotonic() - began > limit:
            raise AssertionError(f"not true within {limit}s")
        await asyncio.sleep(interval)
    return time.monotonic() - began
