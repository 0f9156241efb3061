"""A service built with the kit and nothing else, on the test-only `runops.testing.v1` contract.

`Behave` does what `probe.behaviour` says ("" echo, "sleep:<s>", "missing", "invalid", "boom",
"pg-down", "deadline", "relay:<target>", "log" (one line, whose ids the kit bound from the
request), "mint:<run id>" (answers with that run id)); each RPC's access level is the contract's. API keys "key-<environment id>" resolve to that environment. The
dependency "marker" is down while the file named by KIT_APP_DOWN_FILE exists.
Run as a process with `python -m tests.kit.app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import structlog

from runops.kit.channels import create_channel
from runops.kit.context import current_principal
from runops.kit.errors import FieldViolation, InvalidArgument, NotFound, Unauthenticated
from runops.kit.server import ServiceApp, run_service
from runops.kit.settings import ServerSettings
from runops.testing.v1 import testing_pb2 as t
from runops.testing.v1 import testing_pb2_grpc as t_grpc

SERVICE = t.DESCRIPTOR.services_by_name["TestingService"]
Context = grpc.aio.ServicerContext[Any, Any]
log = structlog.get_logger("tests.kit.app")


@dataclass(frozen=True)
class Environment:
    """What the API-key resolver returns, shaped like the control plane's Environment."""

    id: str


async def resolve_api_key(key: str) -> Environment:
    if not key.startswith("key-"):
        raise Unauthenticated("the API key is not valid", reason="INVALID_API_KEY")
    return Environment(key.removeprefix("key-"))


class TestingServicer(t_grpc.TestingServiceServicer):
    __test__ = False  # not a pytest class, despite its name

    def __init__(self, internal_token: str | None, shutting_down: asyncio.Event) -> None:
        self._token = internal_token
        self._shutting_down = shutting_down

    async def _echo(self, probe: t.Probe, context: Context) -> t.Echo:
        key, _, arg = probe.behaviour.partition(":")
        echo = t.Echo(
            behaviour=probe.behaviour,
            text=probe.text,
            caller=current_principal.get().caller.value,
        )
        if key == "sleep":
            await asyncio.sleep(float(arg))
        elif key == "missing":
            raise NotFound("thing missing does not exist", reason="THING_NOT_FOUND")
        elif key == "invalid":
            raise InvalidArgument(
                "probe.text is malformed",
                violations=[FieldViolation("probe.text", "must start with ok_")],
            )
        elif key == "boom":
            raise RuntimeError("a bug")
        elif key == "pg-down":
            raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed")
        elif key == "deadline":
            echo.time_remaining = context.time_remaining() or 0.0
        elif key == "relay":
            async with create_channel(arg, token=self._token) as channel:
                downstream: Any = t_grpc.TestingServiceStub(channel)
                reply = await downstream.Behave(
                    t.BehaveRequest(probe=t.Probe(behaviour="deadline"))
                )
                echo.time_remaining = reply.echo.time_remaining
        elif key == "log":
            log.info("behaved")
        elif key == "mint":
            echo.minted_run_id = arg
        return echo

    async def Behave(self, request: t.BehaveRequest, context: Context) -> t.BehaveResponse:
        return t.BehaveResponse(echo=await self._echo(request.probe, context))

    async def AdminOnly(self, request: t.AdminOnlyRequest, context: Context) -> t.AdminOnlyResponse:
        return t.AdminOnlyResponse(echo=await self._echo(request.probe, context))

    async def Open(self, request: t.OpenRequest, context: Context) -> t.OpenResponse:
        return t.OpenResponse(echo=await self._echo(request.probe, context))

    async def WithApiKey(
        self, request: t.WithApiKeyRequest, context: Context
    ) -> t.WithApiKeyResponse:
        return t.WithApiKeyResponse(echo=await self._echo(request.probe, context))

    async def Undeclared(
        self, request: t.UndeclaredRequest, context: Context
    ) -> t.UndeclaredResponse:
        raise AssertionError("the kit must refuse a method without an access level")

    async def Watch(
        self, request: t.WatchRequest, context: Context
    ) -> AsyncIterator[t.WatchResponse]:
        """Ticks until the server shuts down, like a real watch."""
        interval = request.interval.ToTimedelta().total_seconds() or 0.1
        sequence = 0
        while not self._shutting_down.is_set():
            sequence += 1
            yield t.WatchResponse(sequence=sequence)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._shutting_down.wait(), timeout=interval)

    async def Upload(self, request_iterator: Any, context: Context) -> t.UploadResponse:
        received = size = 0
        async for request in request_iterator:
            received += 1
            size += request.ByteSize()
            if request.probe.behaviour == "log":
                log.info("uploaded", received=received)
        return t.UploadResponse(received=received, bytes=size)


def build_app(settings: ServerSettings, down_file: Path | None = None) -> ServiceApp:
    app = ServiceApp("kit-app", settings, api_key_resolver=resolve_api_key)
    app.add_service(
        SERVICE,
        t_grpc.add_TestingServiceServicer_to_server,
        TestingServicer(
            settings.internal_token.get_secret_value() if settings.internal_token else None,
            app.shutting_down,
        ),
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
