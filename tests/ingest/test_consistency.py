"""Public reads and replica lag: a batch written through another run-store process (its router
knows nothing of that write) is still found while the replicas lag behind it."""

from __future__ import annotations

import grpc

from runops.ingest.v1 import ingest_pb2 as ing
from runops.localstack import LocalStack
from runops.localstack.settings import INTERNAL_TOKEN
from runops.runstore.client import RunStoreClient
from runops.runstore.v1 import runstore_pb2 as rs
from tests.controlplane.harness import Seeded
from tests.harness import expect_error
from tests.ingest.harness import Stub
from tests.runstore.harness import start_on_stack


async def test_a_batch_made_elsewhere_is_found_while_replicas_lag(
    stack: LocalStack, seeded: Seeded, api: Stub
) -> None:
    other = await start_on_stack(stack, split=True, name="another-runstore")
    try:
        async with (
            RunStoreClient(other.app.target, token=INTERNAL_TOKEN) as elsewhere,
            stack.runops_db.replay_paused(),
            stack.controlplane_db.replay_paused(),
        ):
            created = await elsewhere.create_batch(
                rs.CreateBatchRequest(
                    environment_id=seeded.env_id,
                    organization_id=seeded.org_id,
                    project_id=seeded.environment.project.id,
                    run_count=3,
                )
            )
            friendly = created.batch.friendly_id
            # The ingest's run store never saw this write: its replica read misses, and the
            # miss is confirmed on the writer, which has it.
            got = await api.GetBatch(ing.GetBatchRequest(batch_id=friendly))
            assert got.batch.friendly_id == friendly
            page = await api.ListBatchItems(ing.ListBatchItemsRequest(batch_id=friendly))
            assert list(page.items) == []
            # A batch that exists nowhere is still NOT_FOUND.
            missing = friendly[:-3] + ("aa1" if not friendly.endswith("aa1") else "ab1")
            await expect_error(
                api.GetBatch(ing.GetBatchRequest(batch_id=missing)), grpc.StatusCode.NOT_FOUND
            )
    finally:
        await other.app.stop(grace=1)
