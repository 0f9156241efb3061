"""Outgoing channels spread calls with round_robin over every address of their target."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from runops.kit.channels import channel_options, create_channel
from runops.localstack.ports import free_port

WHO = "who"


def test_channels_default_to_round_robin() -> None:
    options = dict(channel_options())
    config = json.loads(options["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]


@pytest.fixture
async def two_servers() -> AsyncIterator[int]:
    """Health servers on 127.0.0.1:P and 127.0.0.2:P; each reports itself under "who"
    (SERVING from the first, NOT_SERVING from the second)."""
    port = free_port()
    servers = []
    for host, status in (
        ("127.0.0.1", health_pb2.HealthCheckResponse.SERVING),
        ("127.0.0.2", health_pb2.HealthCheckResponse.NOT_SERVING),
    ):
        servicer = health.aio.HealthServicer()
        await servicer.set(WHO, status)
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        assert server.add_insecure_port(f"{host}:{port}") == port
        await server.start()
        servers.append(server)
    yield port
    for server in servers:
        await server.stop(None)


async def test_calls_reach_every_address_of_the_target(two_servers: int) -> None:
    port = two_servers
    async with create_channel(f"ipv4:127.0.0.1:{port},127.0.0.2:{port}") as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        seen: Counter[int] = Counter()
        for _ in range(40):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=WHO), timeout=5)
            seen[reply.status] += 1
    # pick_first would have sent all 40 to 127.0.0.1.
    assert seen[health_pb2.HealthCheckResponse.SERVING] >= 10, seen
    assert seen[health_pb2.HealthCheckResponse.NOT_SERVING] >= 10, seen
