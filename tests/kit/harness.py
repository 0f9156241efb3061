"""Settings, stubs and a process runner for the kit's tests (tests/kit/app.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from runops.kit.settings import ServerSettings
from runops.testing.v1 import testing_pb2 as t
from runops.testing.v1 import testing_pb2_grpc as t_grpc

if TYPE_CHECKING:
    from runops.testing.v1.testing_pb2_grpc import TestingServiceAsyncStub

    Stub: TypeAlias = TestingServiceAsyncStub
else:
    Stub = t_grpc.TestingServiceStub

REPO = Path(__file__).resolve().parents[2]
ADMIN = "admin-secret"
INTERNAL = "internal-secret"
METHOD = "/runops.testing.v1.TestingService/"


def settings(**overrides: object) -> ServerSettings:
    base: dict[str, object] = {
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_host": "127.0.0.1",
        "metrics_port": 0,
        "grace_period_seconds": 5,
        "health_check_interval_seconds": 0.1,
        "admin_token": SecretStr(ADMIN),
        "internal_token": SecretStr(INTERNAL),
    }
    base.update(overrides)
    return ServerSettings.model_validate(base)


def auth(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def stub(channel: grpc.aio.Channel) -> Stub:
    return t_grpc.TestingServiceStub(channel)


def behave(behaviour: str = "", **probe: Any) -> t.BehaveRequest:
    return t.BehaveRequest(probe=t.Probe(behaviour=behaviour, **probe))


async def health(channel: grpc.aio.Channel, service: str = "") -> int:
    health_stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs type the sync channel
    response = await health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(response.status)


def spawn(env: dict[str, str]) -> subprocess.Popen[str]:
    """The test app as its own process (`python -m tests.kit.app`), stderr piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.kit.app"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": f"{REPO / 'shared'}:{REPO}", **env},
        stderr=subprocess.PIPE,
        text=True,
    )


def serving_address(proc: subprocess.Popen[str]) -> str:
    """Reads the process's JSON log lines up to "serving"; returns its address."""
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "serving":
                return str(event["address"])
    raise AssertionError(f"the process exited ({proc.wait()}) before serving")


PROCESS_ENV = {
    "RUNOPS_GRPC_HOST": "127.0.0.1",
    "RUNOPS_GRPC_PORT": "0",
    "RUNOPS_METRICS_PORT": "-1",
}
