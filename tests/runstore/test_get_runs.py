"""GetRuns against the session's run stores: runs of both databases in one call, in the order
asked, missing and other environments' ids listed apart, the 1,000-id cap and bad ids refused
naming the field, the replica by default and the writer with READ_YOUR_WRITES, the split off."""

from __future__ import annotations

import grpc
import pytest

from runops.kit.errors import details_of
from runops.kit.ids import Residency
from runops.kit.limits import MAX_RUN_IDS_PER_CALL
from runops.localstack import LocalStack
from runops.localstack.settings import INTERNAL_TOKEN
from runops.runstore.client import RunStoreClient
from runops.runstore.v1 import runstore_pb2 as rs
from services.runstore.app import RunStoreApp
from tests.harness import expect_error
from tests.runstore.harness import RYW, Stub, body, new_env, run_input
from tests.runstore.test_consistency import insert_behind_the_service


async def create(client: Stub, env: str, residency: Residency) -> str:
    run_id = f"run_{body(residency)}"
    created = await client.CreateRun(rs.CreateRunRequest(run=run_input(env, run_id=run_id)))
    return created.run.friendly_id


async def test_runs_of_both_databases_come_back_in_the_order_asked(client: Stub) -> None:
    env, other_env = new_env(), new_env()
    new = [await create(client, env, Residency.NEW) for _ in range(3)]
    legacy = [await create(client, env, Residency.LEGACY) for _ in range(3)]
    elsewhere = await create(client, other_env, Residency.NEW)
    never = f"run_{body(Residency.NEW)}"
    # Friendly ids and bodies alike, interleaved, one asked twice; a caller-chosen id of
    # neither shape (written LEGACY) is found by probing both databases.
    odd = "run_callerchosen1"
    await client.CreateRun(rs.CreateRunRequest(run=run_input(env, run_id=odd)))
    asked = [
        new[0], legacy[0], new[1].removeprefix("run_"), elsewhere, legacy[1], never, odd,
        new[2], legacy[2], new[0],
    ]  # fmt: skip
    got = await client.GetRuns(
        rs.GetRunsRequest(run_ids=asked, environment_id=env, consistency=RYW)
    )
    found = [a for a in asked if a not in (elsewhere, never)]
    assert [run.friendly_id for run in got.runs] == [
        a if a.startswith("run_") else f"run_{a}" for a in found
    ]
    assert list(got.missing_run_ids) == [elsewhere, never]
    assert all(run.environment_id == env for run in got.runs)
    # The same runs GetRun answers, field for field.
    for run in got.runs:
        one = await client.GetRun(
            rs.GetRunRequest(run_id=run.id, environment_id=env, consistency=RYW)
        )
        assert one.run == run


async def test_the_split_off_reads_one_database(single: Stub) -> None:
    env = new_env()
    ids = [await create(single, env, Residency.LEGACY) for _ in range(2)]
    got = await single.GetRuns(
        rs.GetRunsRequest(run_ids=[*ids, f"run_{body(Residency.NEW)}"], environment_id=env)
    )
    assert [run.friendly_id for run in got.runs] == ids
    assert len(got.missing_run_ids) == 1


async def test_a_thousand_ids_are_read_and_one_more_is_refused(client: Stub) -> None:
    env = new_env()
    results = await client.CreateRuns(
        rs.CreateRunsRequest(runs=[run_input(env) for _ in range(MAX_RUN_IDS_PER_CALL)])
    )
    ids = [result.run.friendly_id for result in results.results]
    got = await client.GetRuns(rs.GetRunsRequest(run_ids=ids, environment_id=env, consistency=RYW))
    assert [run.friendly_id for run in got.runs] == ids
    assert not got.missing_run_ids
    exc = await expect_error(
        client.GetRuns(rs.GetRunsRequest(run_ids=[*ids, ids[0]], environment_id=env)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details_of(exc).fields == ["run_ids"]


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (rs.GetRunsRequest(environment_id="env_1"), ["run_ids"]),
        (rs.GetRunsRequest(run_ids=["run_abc"]), ["environment_id"]),
        (
            rs.GetRunsRequest(
                run_ids=["run_abc", "", "batch_abc", "run_ABC"], environment_id="env_1"
            ),
            ["run_ids[1]", "run_ids[2]", "run_ids[3]"],
        ),
        (rs.GetRunsRequest(run_ids=["run_a\x00b"], environment_id="env_1"), ["run_ids[0]"]),
        (
            rs.GetRunsRequest(
                run_ids=["run_abc"],
                environment_id="env_1",
                consistency=9,  # type: ignore[arg-type]
            ),
            ["consistency"],
        ),
    ],
    ids=["no ids", "no environment", "bad ids", "NUL", "bad consistency"],
)
async def test_bad_requests_name_their_fields(
    client: Stub, request_: rs.GetRunsRequest, fields: list[str]
) -> None:
    exc = await expect_error(client.GetRuns(request_), grpc.StatusCode.INVALID_ARGUMENT)
    assert details_of(exc).fields == fields


@pytest.mark.parametrize("residency", [Residency.NEW, Residency.LEGACY], ids=lambda r: r.name)
async def test_default_reads_use_the_replica_and_read_your_writes_the_writer(
    client: Stub, stack: LocalStack, residency: Residency
) -> None:
    db = stack.database_for(residency)
    env = new_env()
    run_id = body(residency)
    await db.wait_for_replica()
    async with db.replay_paused():
        await insert_behind_the_service(db, run_id, env)
        lagging = await client.GetRuns(rs.GetRunsRequest(run_ids=[run_id], environment_id=env))
        assert list(lagging.missing_run_ids) == [run_id]
        fresh = await client.GetRuns(
            rs.GetRunsRequest(run_ids=[run_id], environment_id=env, consistency=RYW)
        )
        assert [run.id for run in fresh.runs] == [run_id]
    await db.wait_for_replica()
    caught_up = await client.GetRuns(rs.GetRunsRequest(run_ids=[run_id], environment_id=env))
    assert [run.id for run in caught_up.runs] == [run_id]


async def test_the_client_reads_many_runs(run_store: RunStoreApp, client: Stub) -> None:
    env = new_env()
    ids = [await create(client, env, r) for r in (Residency.NEW, Residency.LEGACY)]
    missing = f"run_{body(Residency.NEW)}"
    async with RunStoreClient(run_store.app.target, token=INTERNAL_TOKEN) as store:
        got = await store.get_runs(
            environment_id=env, run_ids=[missing, *ids], read_your_writes=True
        )
    assert [run.friendly_id for run in got.runs] == ids
    assert list(got.missing_run_ids) == [missing]
