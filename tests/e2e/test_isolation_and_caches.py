"""Environment isolation at the public entry, and admin writes reaching every service's cache
(every process of it) through the control plane's invalidation stream, not the 30 s TTL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.ingest.v1 import ingest_pb2 as ing
from runops.mollifier.v1 import mollifier_pb2 as m
from tests.e2e.suite import Clients, Ingest, code_of, eventually, new_tenant

# Liveness bounds: invalidations arrive within about a second (docs/controlplane.md); the
# cache TTL they beat is 30 s.
PROPAGATION_LIMIT = 10.0
# Replica lag after a write (public reads go to the replicas).
LAG_LIMIT = 15.0
# Consecutive calls that must all agree, so every process behind a round_robin target answered.
ROUNDS = 6


async def visible(api: Ingest, request: ing.GetBatchRequest) -> bool:
    """ROUNDS consecutive reads (every process behind the target) find the batch."""
    codes = [await code_of(api.GetBatch(request)) for _ in range(ROUNDS)]
    return all(code == grpc.StatusCode.OK for code in codes)


async def header_only(batch_id: str) -> AsyncIterator[ing.StreamBatchItemsRequest]:
    """A stream that only names the batch (a resume: "what is missing?")."""
    yield ing.StreamBatchItemsRequest(header=ing.StreamHeader(batch_id=batch_id))


async def test_another_environments_key_cannot_see_a_batch(clients: Clients) -> None:
    owner = await new_tenant(clients.admin)
    # Same organization and a second one: neither sees the batch.
    sibling = await new_tenant(clients.admin, organization_id=owner.organization_id)
    stranger = await new_tenant(clients.admin)
    created = await clients.ingest(owner.api_key).CreateBatch(ing.CreateBatchRequest(run_count=2))
    batch = created.batch
    mine = clients.ingest(owner.api_key)
    # Public reads go to the replica: the owner sees its batch once it has replayed the write
    # (the run-store process that wrote it may not be the one that reads); then the others ask.
    await eventually(
        lambda: visible(mine, ing.GetBatchRequest(batch_id=batch.id)), LAG_LIMIT, "batch visible"
    )
    for other in (sibling, stranger):
        api = clients.ingest(other.api_key)
        for batch_id in (batch.friendly_id, batch.id):
            assert await code_of(api.GetBatch(ing.GetBatchRequest(batch_id=batch_id))) == (
                grpc.StatusCode.NOT_FOUND
            )
        listed = api.ListBatchItems(ing.ListBatchItemsRequest(batch_id=batch.friendly_id))
        assert await code_of(listed) == grpc.StatusCode.NOT_FOUND

        resume = api.StreamBatchItems(header_only(batch.friendly_id))
        assert await code_of(resume) == grpc.StatusCode.NOT_FOUND


async def test_a_rotated_key_is_refused_by_every_ingest_process(clients: Clients) -> None:
    tenant = await new_tenant(clients.admin)
    old = clients.ingest(tenant.api_key)
    batch = (await old.CreateBatch(ing.CreateBatchRequest(run_count=1))).batch
    get = ing.GetBatchRequest(batch_id=batch.friendly_id)
    await eventually(lambda: visible(old, get), LAG_LIMIT, "batch visible")  # keys cached too

    rotated = await clients.admin.RotateApiKey(
        cp.RotateApiKeyRequest(environment_id=tenant.environment_id)
    )

    async def refused() -> bool:
        codes = [await code_of(old.GetBatch(get)) for _ in range(ROUNDS)]
        return all(code == grpc.StatusCode.UNAUTHENTICATED for code in codes)

    took = await eventually(refused, PROPAGATION_LIMIT, "the old key refused everywhere")
    print(f"\nrotated key refused by ingest after {took:.2f}s")
    new = clients.ingest(rotated.api_key)
    assert (await new.GetBatch(get)).batch.id == batch.id


async def test_a_paused_environment_is_seen_by_every_control_plane_process(
    clients: Clients,
) -> None:
    tenant = await new_tenant(clients.admin)
    request = cp.GetEnvironmentRequest(environment_id=tenant.environment_id)
    for _ in range(ROUNDS):  # cached by every process
        assert not (await clients.controlplane.GetEnvironment(request)).environment.paused

    await clients.admin.PauseEnvironment(
        cp.PauseEnvironmentRequest(environment_id=tenant.environment_id)
    )

    async def paused(want: bool) -> bool:
        replies = [await clients.controlplane.GetEnvironment(request) for _ in range(ROUNDS)]
        return all(r.environment.paused == want for r in replies)

    took = await eventually(lambda: paused(True), PROPAGATION_LIMIT, "paused everywhere")
    await clients.admin.ResumeEnvironment(
        cp.ResumeEnvironmentRequest(environment_id=tenant.environment_id)
    )
    await eventually(lambda: paused(False), PROPAGATION_LIMIT, "resumed everywhere")
    print(f"\npause seen by every control-plane process after {took:.2f}s")


async def test_a_flag_turned_off_reaches_every_mollifier_process(clients: Clients) -> None:
    tenant = await new_tenant(clients.admin, mollifier=True)

    async def burst(n: int) -> int:
        """How many of n concurrent triggers were buffered."""
        replies = await asyncio.gather(
            *(
                clients.mollifier.Trigger(
                    m.TriggerRequest(
                        environment_id=tenant.environment_id,
                        task_identifier="e2e/flag",
                        payload=b"{}",
                        payload_type="application/json",
                    )
                )
                for _ in range(n)
            )
        )
        return sum(r.buffered for r in replies)

    async def buffers() -> bool:
        return await burst(300) > 0

    await eventually(buffers, PROPAGATION_LIMIT, "a burst buffered while the flag is on")
    await clients.admin.SetOrganizationFlags(
        cp.SetOrganizationFlagsRequest(
            organization_id=tenant.organization_id, mollifier_enabled=False
        )
    )

    async def bypasses() -> bool:
        return await burst(200) == 0

    took = await eventually(bypasses, PROPAGATION_LIMIT, "every trigger bypasses the buffer")
    print(f"\nflag off seen by every mollifier process after {took:.2f}s")
