"""runops.localstack.services.ServiceProcess, the one way `runops up` and the tests start a
service: a real `python -m services.controlplane` against the session's stack."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runops.localstack import LocalStack, StackError
from runops.localstack.ports import free_port, is_listening
from runops.localstack.services import ServiceProcess, targets_env


def _controlplane(stack: LocalStack, log_file: Path, **env: str) -> ServiceProcess:
    environ = {**stack.service_env(), "RUNOPS_LOG_FORMAT": "console", **env}
    return ServiceProcess("controlplane", free_port(), -1, log_file, env=environ)


async def test_serves_then_drains_on_sigterm(stack: LocalStack, tmp_path: Path) -> None:
    service = _controlplane(stack, tmp_path / "controlplane.log")
    async with service:
        async with grpc.aio.insecure_channel(service.target) as channel:
            health: Any = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert service.poll() is None
    # SIGTERM, and it exited by itself (0), not by the SIGKILL after the bounded wait.
    assert service.poll() == 0
    assert not is_listening(service.grpc_port)
    assert targets_env([service]) == {"RUNOPS_CONTROLPLANE_TARGET": service.target}


async def test_exit_before_serving_raises_with_the_log_tail(
    stack: LocalStack, tmp_path: Path
) -> None:
    service = _controlplane(stack, tmp_path / "bad.log", RUNOPS_LOG_LEVEL="loud")
    with pytest.raises(StackError, match=r"(?s)exited with 2 before serving.*RUNOPS_LOG_LEVEL"):
        async with service:
            pass
    assert service.poll() == 2


def test_unknown_service_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown service 'billing'"):
        ServiceProcess("billing", free_port(), -1, tmp_path / "billing.log")
