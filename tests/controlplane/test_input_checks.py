"""The kit's input check on the real control plane: a NUL, malformed bytes or a request full of
bad values answer INVALID_ARGUMENT naming the field (a NUL used to reach Postgres: INTERNAL);
and its log lines carry the environment id."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.controlplane.v1 import controlplane_pb2_grpc as cp_grpc
from runops.kit.errors import MAX_LISTED_VIOLATIONS, MAX_MESSAGE_CHARS, details_of
from runops.localstack import LocalStack
from runops.localstack.settings import ADMIN_TOKEN, INTERNAL_TOKEN
from services.controlplane.app import ControlPlane
from tests.controlplane.harness import (
    Seeded,
    Stub,
    control_plane_process,
    stub,
)
from tests.harness import expect_error, until

METHOD = "/runops.controlplane.v1.ControlPlaneService/"
REPO = Path(__file__).resolve().parents[2]


def _fields(exc: grpc.aio.AioRpcError) -> dict[str, str]:
    return {v.field: v.description for v in details_of(exc).violations}


async def test_a_nul_in_any_field_is_invalid_argument_naming_it(
    admin: Stub, internal: Stub, seeded: Seeded
) -> None:
    nul = "must not contain a NUL character"
    cases: list[tuple[Any, str]] = [
        (admin.CreateOrganization(cp.CreateOrganizationRequest(slug="a", title="T\x00")), "title"),
        (
            admin.CreateProject(
                cp.CreateProjectRequest(organization_id=seeded.org_id, slug="p", name="N\x00")
            ),
            "name",
        ),
        (
            admin.SetOrganizationFlags(
                cp.SetOrganizationFlagsRequest(
                    organization_id=seeded.org_id, set_extra={"feature": "on\x00"}
                )
            ),
            'set_extra["feature"]',
        ),
        (
            admin.RegisterWorker(
                cp.RegisterWorkerRequest(environment_id=seeded.env_id, version="1\x00")
            ),
            "version",
        ),
        (
            internal.ResolveWorkerVersion(
                cp.ResolveWorkerVersionRequest(environment_id=seeded.env_id, worker="w\x00")
            ),
            "worker",
        ),
        (
            internal.GetEnvironment(cp.GetEnvironmentRequest(environment_id="env_\x00")),
            "environment_id",
        ),
    ]
    for call, field in cases:
        exc = await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT)
        assert _fields(exc) == {field: nul}
        assert field in (exc.details() or "")


async def test_an_invalid_duration_is_invalid_argument(admin: Stub, seeded: Seeded) -> None:
    task = cp.TaskDefinition(
        task_identifier="t", default_ttl=duration_pb2.Duration(seconds=5, nanos=-1_000_000_000)
    )
    exc = await expect_error(
        admin.RegisterWorker(
            cp.RegisterWorkerRequest(environment_id=seeded.env_id, version="1", tasks=[task])
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert list(_fields(exc)) == ["tasks[0].default_ttl"]


@pytest.mark.parametrize("raw", ["0a02fffe", "0a03eda080"])
async def test_malformed_bytes_are_invalid_argument(control_plane: ControlPlane, raw: str) -> None:
    async with grpc.aio.insecure_channel(control_plane.app.target) as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            f"{METHOD}GetEnvironment"
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(
                bytes.fromhex(raw), metadata=(("authorization", f"Bearer {INTERNAL_TOKEN}"),)
            )
    details = details_of(info.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "MALFORMED_REQUEST"
    assert "<class" not in details.message


async def test_the_worst_requests_still_answer_invalid_argument(
    control_plane: ControlPlane, seeded: Seeded
) -> None:
    """A default grpcio client (8 KiB metadata limit) must see INVALID_ARGUMENT, not
    RESOURCE_EXHAUSTED, however many violations the request has."""
    async with grpc.aio.insecure_channel(control_plane.app.target) as channel:
        plain: Any = cp_grpc.ControlPlaneServiceStub(channel)
        ids = [f"env_{i:04d}" + "x" * 4087 for i in range(1000)]
        tasks = [
            cp.TaskDefinition(task_identifier="!" * 100, queue="q" * 200, machine_preset="huge")
            for _ in range(1000)
        ]
        worker = ["t" * 200] * 1000
        calls = [
            plain.BatchGetEnvironments(
                cp.BatchGetEnvironmentsRequest(environment_ids=ids),
                metadata=(("authorization", f"Bearer {INTERNAL_TOKEN}"),),
            ),
            plain.RegisterWorker(
                cp.RegisterWorkerRequest(environment_id=seeded.env_id, version="1", tasks=tasks),
                metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),),
            ),
            plain.ResolveWorkerVersion(
                cp.ResolveWorkerVersionRequest(
                    environment_id=seeded.env_id, task_identifiers=worker
                ),
                metadata=(("authorization", f"Bearer {INTERNAL_TOKEN}"),),
            ),
        ]
        for call in calls:
            exc = await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT)
            details = details_of(exc)
            assert len(details.violations) <= MAX_LISTED_VIOLATIONS
            assert int(details.metadata["omitted_violations"]) > 900
            assert len(details.message) <= MAX_MESSAGE_CHARS


async def test_log_lines_carry_the_environment_id(
    stack: LocalStack, admin: Stub, seeded: Seeded, tmp_path: Path
) -> None:
    log_file = tmp_path / "controlplane.log"
    async with control_plane_process(
        stack,
        log_file,
        RUNOPS_LOG_FORMAT="json",
        RUNOPS_LOG_LEVEL="debug",
        # This checkout's code, not whichever the editable install points at.
        PYTHONPATH=f"{REPO / 'shared'}:{REPO}",
    ) as target:
        other = stub(target, INTERNAL_TOKEN)
        await other.GetEnvironment(
            cp.GetEnvironmentRequest(environment_id=seeded.env_id),
            metadata=(("x-request-id", "req-env-log"),),
        )

        async def logged() -> bool:
            return any(line.get("request_id") == "req-env-log" for line in _json_lines(log_file))

        await until(logged, limit=10)
    (line,) = [x for x in _json_lines(log_file) if x.get("request_id") == "req-env-log"]
    assert line["environment_id"] == seeded.env_id
    assert line["rpc"] == f"{METHOD}GetEnvironment"
    assert line["event"] == "rpc handled"


def _json_lines(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(errors="replace") if path.exists() else ""
    return [json.loads(x) for x in text.splitlines() if x.startswith("{")]
