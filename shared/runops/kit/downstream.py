"""Another runops service a service calls, declared once: its channel and client, the hook that
closes them after the server drained, and whether it counts toward the caller's health.

    declared = Downstream.connect("runstore", target, RunStoreClient, token=..., health=True)
    run_store = declared.attach(app)  # the client, closed with the app; its health counts

A health dependency is polled with the downstream's own grpc.health.v1 `Check`: the caller is
NOT_SERVING while it answers anything but SERVING (or nothing). Declare one only when the caller
cannot serve without it; a downstream it degrades around (a cache, a fail-open path) is not one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from runops.kit.channels import create_channel
from runops.kit.clients import ServiceClient
from runops.kit.server import DependencyCheck, ServiceApp

ClientT = TypeVar("ClientT", bound=ServiceClient)
ClientT_co = TypeVar("ClientT_co", bound=ServiceClient, covariant=True)

# A downstream's health Check answers within this, or it counts as down.
CHECK_TIMEOUT_SECONDS = 2.0


class ClientFactory(Protocol[ClientT_co]):
    """A client helper's constructor (every `runops.<service>.client` class fits)."""

    def __call__(self, target: str, *, channel: grpc.aio.Channel) -> ClientT_co: ...


def serving_check(channel: grpc.aio.Channel, name: str) -> DependencyCheck:
    """Raises while the server behind `channel` is not SERVING."""
    health: Any = health_pb2_grpc.HealthStub(channel)  # the stubs type only sync channels

    async def check() -> None:
        request = health_pb2.HealthCheckRequest(service="")
        reply = await health.Check(request, timeout=CHECK_TIMEOUT_SECONDS)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise ConnectionError(f"{name} is not SERVING")

    return check


@dataclass(frozen=True)
class Downstream(Generic[ClientT]):
    name: str
    client: ClientT
    channel: grpc.aio.Channel
    # The caller is NOT_SERVING while this one is not SERVING.
    health: bool

    @classmethod
    def connect(
        cls,
        name: str,
        target: str,
        client: ClientFactory[ClientT],
        *,
        token: SecretStr | None,
        health: bool,
    ) -> Downstream[ClientT]:
        """A kit channel to `target` (the internal `token`, request id, deadline propagation)
        and the client on it; `attach` it to the app that uses it."""
        channel = create_channel(target, token=token.get_secret_value() if token else None)
        return cls(name, client(target, channel=channel), channel, health)

    def attach(self, app: ServiceApp) -> ClientT:
        """Close the client, then its channel, after `app` drained; with `health`, a dependency
        of `app` named `name`."""
        app.on_shutdown(self.channel.close)
        app.on_shutdown(self.client.close)  # hooks run in reverse: the client first
        if self.health:
            app.add_dependency(self.name, serving_check(self.channel, self.name))
        return self.client
