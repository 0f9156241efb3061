"""grpc.health.v1 for grpc.aio, with Watch streams that end at shutdown.

grpc's own aio HealthServicer keeps a Watch open until the client goes away, so one watcher (a
Kubernetes probe, a load balancer) holds the server for its whole grace period; it also writes
to watchers while holding the lock `set` needs. Here a Watch ends right after it has sent
NOT_SERVING once shutdown began, and a slow watcher delays nobody.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# The type stubs predate the List RPC.
_list_types: Any = health_pb2

Status = int  # HealthCheckResponse.ServingStatus
Context = grpc.aio.ServicerContext[Any, Any]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self._status: dict[str, Status] = {"": SERVING}
        # Replaced on every change: a watcher waits on the one it saw before reading.
        self._changed = asyncio.Event()
        self._shutting_down = False

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def set(self, service: str, status: Status) -> None:
        """Sets a service's status; ignored once graceful shutdown began."""
        if self._shutting_down:
            return
        self._status[service] = status
        self._notify()

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING for good; watchers get it, then their streams end."""
        if self._shutting_down:
            return
        self._shutting_down = True
        self._status = dict.fromkeys(self._status, NOT_SERVING)
        self._notify()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def List(self, request: Any, context: Context) -> Any:
        return _list_types.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._status.items()
            }
        )

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last: Status | None = None
        while True:
            changed = self._changed
            status = self._status.get(request.service, SERVICE_UNKNOWN)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if self._shutting_down and status != SERVING:
                return  # the watcher has been told; the stream must not hold shutdown
            await changed.wait()
