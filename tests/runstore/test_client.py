"""RunStoreClient against the session's run store: typed helpers, domain errors passed through."""

from __future__ import annotations

import pytest

from runops.kit.errors import FailedPrecondition, InvalidArgument
from runops.localstack.settings import INTERNAL_TOKEN
from runops.runstore.client import RunStoreClient
from runops.runstore.v1 import runstore_pb2 as rs
from services.runstore.app import RunStoreApp
from tests.runstore.harness import batch_request, items, new_env, run_input


async def test_client_drives_a_batch_and_passes_domain_errors(run_store: RunStoreApp) -> None:
    env = new_env()
    async with RunStoreClient(run_store.app.target, token=INTERNAL_TOKEN) as client:
        [created] = await client.create_runs([run_input(env)])
        assert await client.get_run(
            environment_id=env, run_id=created.run.friendly_id, read_your_writes=True
        )
        assert (
            await client.get_run(
                environment_id=new_env(), run_id=created.run.id, read_your_writes=True
            )
            is None
        )
        batch = (await client.create_batch(batch_request(env, 3))).batch
        await client.accept_batch_items(environment_id=env, batch_id=batch.id, items=items([0, 2]))
        missing = await client.missing_ranges(environment_id=env, batch_id=batch.id)
        assert missing.ranges == [(1, 2)]
        assert missing.accepted_count == 2
        seal = await client.seal_batch(environment_id=env, batch_id=batch.id)
        assert seal.outcome == rs.SEAL_BATCH_OUTCOME_COUNT_MISMATCH
        await client.accept_batch_items(environment_id=env, batch_id=batch.id, items=items([1]))
        assert (await client.seal_batch(environment_id=env, batch_id=batch.id)).sealed_now
        runs, token = await client.list_batch_runs(
            environment_id=env, batch_id=batch.id, read_your_writes=True
        )
        assert [r.batch_index for r in runs] == [0, 1, 2]
        assert token == ""
        with pytest.raises(FailedPrecondition):
            await client.accept_batch_items(environment_id=env, batch_id=batch.id, items=items([1]))
        with pytest.raises(InvalidArgument):
            await client.get_batch(environment_id=env, batch_id="batch_NOPE")
