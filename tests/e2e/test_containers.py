"""What only the compose stack's real containers show (run by .ci/compose; skipped unless
RUNOPS_E2E_COMPOSE_PROJECT names the project): `docker stop` drains an in-flight call, restarted
PostgreSQL writers are survived without restarting any service, the services run as the
non-root user on a read-only root filesystem (as docker/k8s says), and the image can neither
compile nor install anything. They stop and restart containers, so they run after the rest of
the suite (conftest)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable

import grpc
import pytest

from runops.ingest.v1 import ingest_pb2 as ing
from runops.mollifier.v1 import mollifier_pb2 as m
from tests.e2e.containers import SERVICES, Compose, docker
from tests.e2e.suite import Clients, code_of, eventually, new_tenant

pytestmark = pytest.mark.compose

# The Dockerfile's RUNOPS_UID:RUNOPS_GID, and docker/k8s's runAsUser/runAsGroup.
RUNOPS_USER = "10001:10001"
ITEMS = 200
# How long the stack may take to serve again after a restart (liveness, not performance).
RECOVERY_LIMIT = 90.0


def chunk(start: int, end: int) -> ing.StreamBatchItemsRequest:
    return ing.StreamBatchItemsRequest(
        chunk=ing.ItemChunk(
            items=[
                ing.BatchItem(index=i, task="e2e/drain", payload=b"{}") for i in range(start, end)
            ]
        )
    )


async def test_docker_stop_drains_an_in_flight_stream(clients: Clients, compose: Compose) -> None:
    tenant = await new_tenant(clients.admin)
    api = clients.ingest(tenant.api_key)
    batch = (await api.CreateBatch(ing.CreateBatchRequest(run_count=ITEMS))).batch
    half_sent, resume = asyncio.Event(), asyncio.Event()

    async def requests() -> AsyncIterator[ing.StreamBatchItemsRequest]:
        yield ing.StreamBatchItemsRequest(header=ing.StreamHeader(batch_id=batch.id))
        yield chunk(0, ITEMS // 2)
        half_sent.set()
        await resume.wait()
        yield chunk(ITEMS // 2, ITEMS)

    call = asyncio.ensure_future(api.StreamBatchItems(requests(), timeout=60))
    await half_sent.wait()
    await asyncio.sleep(1)  # the first half reaches the server
    stopping = asyncio.create_task(compose.stop("ingest"))
    try:
        # SIGTERM arrived once a new call is refused; the stream begun before is still open.
        fresh = clients.ingest(tenant.api_key)

        async def refused() -> bool:
            code = await code_of(fresh.GetBatch(ing.GetBatchRequest(batch_id=batch.id)))
            return code == grpc.StatusCode.UNAVAILABLE

        await eventually(refused, limit=15, what="ingest refusing new calls", interval=0.2)
        assert not call.done()
        resume.set()
        reply = await call
        assert reply.sealed
        assert reply.accepted_count == reply.run_count == ITEMS
        await stopping
        state = compose.inspect("ingest")["State"]
        assert (state["Status"], state["ExitCode"]) == ("exited", 0), "drained, not killed"
    finally:
        resume.set()
        await stopping
        compose.start("ingest")
        await compose.healthy("ingest")


async def test_restarted_databases_are_survived_without_restarting_services(
    clients: Clients, compose: Compose
) -> None:
    started = {s: compose.inspect(s)["State"]["StartedAt"] for s in SERVICES}
    tenant = await new_tenant(clients.admin)

    def trigger() -> Awaitable[m.TriggerResponse]:
        return clients.mollifier.Trigger(
            m.TriggerRequest(
                environment_id=tenant.environment_id,
                task_identifier="e2e/restart",
                payload=b"{}",
                payload_type="application/json",
            )
        )

    assert await code_of(trigger()) == grpc.StatusCode.OK
    for writer in ("controlplane-db", "runops-db"):
        compose.restart(writer)
    for writer in ("controlplane-db", "runops-db"):
        await compose.healthy(writer)

    async def serving() -> bool:
        # Writes to both databases: a new tenant (control plane), a run (run-ops database).
        try:
            fresh = await new_tenant(clients.admin)
        except grpc.aio.AioRpcError:
            return False
        made = await code_of(trigger())
        batch = clients.ingest(fresh.api_key).CreateBatch(ing.CreateBatchRequest(run_count=1))
        return made == grpc.StatusCode.OK and await code_of(batch) == grpc.StatusCode.OK

    await eventually(serving, RECOVERY_LIMIT, "writes after the databases restarted", 1.0)
    assert {s: compose.inspect(s)["State"]["StartedAt"] for s in SERVICES} == started


@pytest.mark.parametrize("service", SERVICES)
def test_runs_as_the_non_root_user_on_a_read_only_root(compose: Compose, service: str) -> None:
    inspected = compose.inspect(service)
    assert inspected["Config"]["User"] == RUNOPS_USER
    assert inspected["HostConfig"]["ReadonlyRootfs"] is True
    ids = compose.exec(service, "python", "-c", "import os; print(os.getuid(), os.getgid())")
    assert ids.stdout.split() == RUNOPS_USER.split(":")
    write = compose.exec(service, "python", "-c", "open('/srv/runops/probe', 'w')")
    assert write.returncode != 0
    assert "Read-only file system" in write.stderr


def test_image_has_no_compiler_pip_or_build_tools(compose: Compose) -> None:
    image = compose.inspect("ingest")["Config"]["Image"]
    tools = "gcc cc c++ g++ clang make ld as pip pip3 pip3.11 easy_install"
    found = docker(
        "run", "--rm", "--entrypoint", "sh", image, "-c", f"for t in {tools}; do command -v $t; done; true"
    ).stdout  # fmt: skip
    assert found.split() == []
    for module in ("pip", "setuptools", "wheel", "ensurepip"):
        probe = docker(
            "run", "--rm", "--entrypoint", "python", image, "-c", f"import {module}", check=False
        )  # fmt: skip
        assert "ModuleNotFoundError" in probe.stderr, module
    # An extra CA bundle given to the build stays in the builder stage.
    assert "BEGIN CERTIFICATE" not in docker("history", "--no-trunc", image).stdout
