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
        assert await client.get_run(created.run.friendly_id, env, read_your_writes=True)
        assert await client.get_run(created.run.id, new_env(), read_your_writes=True) is None
        batch = (await client.create_batch(batch_request(env, 3))).batch
        await client.accept_batch_items(batch.id, env, items([0, 2]))
        missing = await client.missing_ranges(batch.id, env)
        assert missing.ranges == [(1, 2)]
        assert missing.accepted_count == 2
        seal = await client.seal_batch(batch.id, env)
        assert seal.outcome == rs.SEAL_BATCH_OUTCOME_COUNT_MISMATCH
        await client.accept_batch_items(batch.id, env, items([1]))
        assert (await client.seal_batch(batch.id, env)).sealed_now
        runs, token = await client.list_batch_runs(batch.id, env, read_your_writes=True)
        assert [r.batch_index for r in runs] == [0, 1, 2]
        assert token == ""
        with pytest.raises(FailedPrecondition):
            await client.accept_batch_items(batch.id, env, items([1]))
        with pytest.raises(InvalidArgument):
            await client.get_batch("batch_NOPE", env)
