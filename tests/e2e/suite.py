"""What the end-to-end tests know about the suite they drive: its endpoints and tokens, read
from the variables `runops up` writes to runops.env (and docker/e2e.env names for compose), and
gRPC stubs over them. Nothing here imports a service: the suite is reached only through its
public contracts, as an outside client would."""

from __future__ import annotations

import asyncio
import secrets
import shlex
import time
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from runops.common.v1 import common_pb2
from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.controlplane.v1 import controlplane_pb2_grpc as cp_grpc
from runops.ingest.v1 import ingest_pb2_grpc as ing_grpc
from runops.kit.channels import create_channel
from runops.mollifier.v1 import mollifier_pb2_grpc as m_grpc
from runops.runstore.v1 import runstore_pb2_grpc as rs_grpc

if TYPE_CHECKING:
    from runops.controlplane.v1.controlplane_pb2_grpc import ControlPlaneServiceAsyncStub
    from runops.ingest.v1.ingest_pb2_grpc import BatchIngestServiceAsyncStub
    from runops.mollifier.v1.mollifier_pb2_grpc import MollifierServiceAsyncStub
    from runops.runstore.v1.runstore_pb2_grpc import RunStoreServiceAsyncStub

    ControlPlane: TypeAlias = ControlPlaneServiceAsyncStub
    Ingest: TypeAlias = BatchIngestServiceAsyncStub
    Mollifier: TypeAlias = MollifierServiceAsyncStub
    RunStore: TypeAlias = RunStoreServiceAsyncStub
else:
    ControlPlane = cp_grpc.ControlPlaneServiceStub
    Ingest = ing_grpc.BatchIngestServiceStub
    Mollifier = m_grpc.MollifierServiceStub
    RunStore = rs_grpc.RunStoreServiceStub

# What the suite needs to find and call the services (runops.env / docker/e2e.env).
REQUIRED = (
    "RUNOPS_CONTROLPLANE_TARGET",
    "RUNOPS_RUNSTORE_TARGET",
    "RUNOPS_MOLLIFIER_TARGET",
    "RUNOPS_INGEST_TARGET",
    "RUNOPS_ADMIN_TOKEN",
    "RUNOPS_INTERNAL_TOKEN",
)


def read_env_file(path: Path) -> dict[str, str]:
    """`export NAME=value` (runops.env, shell-quoted) or `NAME=value` (compose .env) lines;
    blank lines and comments are skipped."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line, comments=True)
        if words and words[0] == "export":
            words = words[1:]
        if len(words) != 1 or "=" not in words[0]:
            raise ValueError(f"{path}:{number}: expected [export] NAME=value, got {raw!r}")
        name, _, value = words[0].partition("=")
        values[name] = value
    return values


@dataclass(frozen=True)
class Endpoints:
    """The suite under test. `metrics`: each server process's metrics URL by service, and
    `logs`: every process's log file, known only for the suite the tests started themselves
    (empty against an env file's)."""

    controlplane: str
    runstore: str
    mollifier: str
    ingest: str
    admin_token: str
    internal_token: str
    source: str
    metrics: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    logs: tuple[Path, ...] = ()

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str],
        source: str,
        metrics: Mapping[str, tuple[str, ...]] = {},
        logs: tuple[Path, ...] = (),
    ) -> Endpoints:
        missing = [name for name in REQUIRED if not env.get(name)]
        if missing:
            raise ValueError(f"{source} does not set {', '.join(missing)}")
        return cls(
            controlplane=env["RUNOPS_CONTROLPLANE_TARGET"],
            runstore=env["RUNOPS_RUNSTORE_TARGET"],
            mollifier=env["RUNOPS_MOLLIFIER_TARGET"],
            ingest=env["RUNOPS_INGEST_TARGET"],
            admin_token=env["RUNOPS_ADMIN_TOKEN"],
            internal_token=env["RUNOPS_INTERNAL_TOKEN"],
            source=source,
            metrics=dict(metrics),
            logs=logs,
        )


class Clients:
    """Stubs over the suite's public contracts; channels closed by close()."""

    def __init__(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints
        self._channels: list[grpc.aio.Channel] = []
        self.admin: ControlPlane = cp_grpc.ControlPlaneServiceStub(
            self.channel(endpoints.controlplane, endpoints.admin_token)
        )
        self.controlplane: ControlPlane = cp_grpc.ControlPlaneServiceStub(
            self.channel(endpoints.controlplane, endpoints.internal_token)
        )
        self.runstore: RunStore = rs_grpc.RunStoreServiceStub(
            self.channel(endpoints.runstore, endpoints.internal_token)
        )
        self.mollifier: Mollifier = m_grpc.MollifierServiceStub(
            self.channel(endpoints.mollifier, endpoints.internal_token)
        )

    def channel(self, target: str, token: str) -> grpc.aio.Channel:
        made = create_channel(target, token=token)
        self._channels.append(made)
        return made

    def ingest(self, api_key: str) -> Ingest:
        """The public entry as a client holding `api_key`."""
        return ing_grpc.BatchIngestServiceStub(self.channel(self.endpoints.ingest, api_key))

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))


@dataclass(frozen=True)
class Tenant:
    organization_id: str
    project_id: str
    environment_id: str
    api_key: str


async def new_tenant(
    admin: ControlPlane, *, mollifier: bool = False, organization_id: str = ""
) -> Tenant:
    """A fresh organization (unless given), project and DEVELOPMENT environment through the
    admin RPCs; the organization's mollifier flag set as asked."""
    suffix = secrets.token_hex(4)
    if not organization_id:
        org = await admin.CreateOrganization(
            cp.CreateOrganizationRequest(slug=f"e2e-{suffix}", title=f"e2e {suffix}")
        )
        organization_id = org.organization.id
        await admin.SetOrganizationFlags(
            cp.SetOrganizationFlagsRequest(
                organization_id=organization_id, mollifier_enabled=mollifier
            )
        )
    project = await admin.CreateProject(
        cp.CreateProjectRequest(organization_id=organization_id, slug=f"p-{suffix}", name="e2e")
    )
    created = await admin.CreateEnvironment(
        cp.CreateEnvironmentRequest(
            project_id=project.project.id,
            slug=f"dev-{suffix}",
            type=common_pb2.ENVIRONMENT_TYPE_DEVELOPMENT,
        )
    )
    return Tenant(organization_id, project.project.id, created.environment.id, created.api_key)


async def eventually(
    check: Callable[[], Awaitable[bool]], limit: float, what: str, interval: float = 0.05
) -> float:
    """Seconds until `check()` holds; AssertionError naming `what` after `limit` seconds (a
    liveness bound, not a performance target)."""
    began = time.monotonic()
    while not await check():
        if time.monotonic() - began > limit:
            raise AssertionError(f"{what}: not within {limit:.0f}s")
        await asyncio.sleep(interval)
    return time.monotonic() - began


async def code_of(call: Awaitable[Any]) -> grpc.StatusCode:
    """OK, or the status code the call failed with."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def handled_calls(metrics_url: str, method: str) -> float:
    """grpc_server_handled_total of `method` (any code) on one process's metrics endpoint."""
    with urllib.request.urlopen(metrics_url, timeout=5) as reply:
        text = reply.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("grpc_server_handled_total{") and f'grpc_method="{method}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total
