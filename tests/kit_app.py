"""A service built with the kit and nothing else, for the kit's own tests.

`GetEnvironment` behaves by the id it is given ("sleep:2", "missing", "invalid", "boom",
"pg-down", "deadline", "relay:<target>"), `CreateOrganization` needs the admin token, and the
dependency "marker" is down while the file named by KIT_APP_DOWN_FILE exists.
Run as a process with `python -m tests.kit_app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.controlplane.v1 import controlplane_pb2_grpc as cp_grpc
from runops.kit.auth import Access
from runops.kit.channels import create_channel
from runops.kit.errors import FieldViolation, InvalidArgument, NotFound
from runops.kit.server import ServiceApp, run_service
from runops.kit.settings import ServerSettings

SERVICE = "runops.controlplane.v1.ControlPlaneService"


class KitAppServicer(cp_grpc.ControlPlaneServiceServicer):
    def __init__(self, internal_token: str | None, shutting_down: asyncio.Event) -> None:
        self._token = internal_token
        self._shutting_down = shutting_down

    async def WatchInvalidations(
        self, request: cp.WatchInvalidationsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[cp.WatchInvalidationsResponse]:
        """Streams until the server shuts down, like a real watch."""
        sequence = 0
        while not self._shutting_down.is_set():
            sequence += 1
            yield cp.WatchInvalidationsResponse(
                invalidation=cp.Invalidation(sequence=sequence), reset=sequence == 1
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._shutting_down.wait(), timeout=0.1)

    async def GetEnvironment(
        self, request: cp.GetEnvironmentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> cp.GetEnvironmentResponse:
        key, _, arg = request.environment_id.partition(":")
        if key == "sleep":
            await asyncio.sleep(float(arg))
        elif key == "missing":
            raise NotFound("environment missing does not exist", reason="ENVIRONMENT_NOT_FOUND")
        elif key == "invalid":
            raise InvalidArgument(
                "environment_id is malformed",
                violations=[FieldViolation("environment_id", "must start with env_")],
            )
        elif key == "boom":
            raise RuntimeError("a bug")
        elif key == "pg-down":
            raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed")
        elif key == "deadline":
            return cp.GetEnvironmentResponse(
                environment=cp.Environment(id="deadline", slug=repr(context.time_remaining()))
            )
        elif key == "relay":
            async with create_channel(arg, token=self._token) as channel:
                downstream = cp_grpc.ControlPlaneServiceStub(channel)
                return await downstream.GetEnvironment(
                    cp.GetEnvironmentRequest(environment_id="deadline")
                )
        return cp.GetEnvironmentResponse(environment=cp.Environment(id=request.environment_id))

    async def CreateOrganization(
        self, request: cp.CreateOrganizationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> cp.CreateOrganizationResponse:
        return cp.CreateOrganizationResponse(organization=cp.Organization(slug=request.slug))


def build_app(settings: ServerSettings, down_file: Path | None = None) -> ServiceApp:
    app = ServiceApp("kit-app", settings)
    app.add_service(
        SERVICE,
        cp_grpc.add_ControlPlaneServiceServicer_to_server,
        # Implements only what the kit tests call; the rest answer UNIMPLEMENTED.
        KitAppServicer(  # type: ignore[abstract]
            settings.internal_token.get_secret_value() if settings.internal_token else None,
            app.shutting_down,
        ),
        access=Access.INTERNAL,
        method_access={"CreateOrganization": Access.ADMIN},
    )
    if down_file is not None:
        marker = down_file

        async def check_marker() -> None:
            if marker.exists():
                raise ConnectionError(f"{marker} exists")

        app.add_dependency("marker", check_marker)
    return app


async def _build(settings: ServerSettings) -> ServiceApp:
    down = os.environ.get("KIT_APP_DOWN_FILE")
    return build_app(settings, Path(down) if down else None)


if __name__ == "__main__":
    run_service(ServerSettings, _build)
