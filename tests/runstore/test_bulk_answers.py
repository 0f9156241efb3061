"""The bulk writes' lean answers (result_shape IDS) and columnar chunks against the session's
split run store: the same runs, the same routing, replays and refusals as the whole answers."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf import timestamp_pb2

from runops.common.v1 import common_pb2
from runops.kit.ids import Residency, is_legacy_body, residency_of
from runops.localstack import LocalStack
from runops.runstore.v1 import runstore_pb2 as rs
from tests.harness import expect_error
from tests.runstore.harness import (
    RYW,
    Stub,
    batch_request,
    body,
    items,
    new_env,
    new_key,
    run_input,
    where,
)

CP = {"controlplane"}
RO = {"runops"}
IDS = rs.RESULT_SHAPE_IDS


def _us(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * 1_000_000 + ts.nanos // 1000


async def test_ids_answer_mixed_residency_replays_keys_and_errors(
    client: Stub, stack: LocalStack
) -> None:
    env, other_env = new_env(), new_env()
    shown = timestamp_pb2.Timestamp()
    shown.FromDatetime(datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC))
    key = new_key()
    holder = (
        await client.CreateRun(
            rs.CreateRunRequest(
                run=run_input(env, options=common_pb2.TriggerOptions(idempotency_key=key))
            )
        )
    ).run
    taken = f"run_{body(Residency.NEW)}"
    await client.CreateRun(rs.CreateRunRequest(run=run_input(other_env, run_id=taken)))
    inputs = [
        run_input(env, run_id=f"run_{body(Residency.LEGACY)}"),
        run_input(env),  # minted NEW
        run_input(env, run_id=f"run_{body(Residency.NEW)}", created_at=shown),
        run_input(
            env,
            run_id=f"run_{body(Residency.LEGACY)}",
            failed=common_pb2.RunError(code="PAYLOAD_TOO_LARGE", message="4 MiB"),
        ),
        run_input(env, cancelled=rs.RunCancellation(reason="cancelled while buffered")),
        # The key a live run holds: that run, cached.
        run_input(env, options=common_pb2.TriggerOptions(idempotency_key=key)),
        # The id is another environment's run: refused at its position only.
        run_input(env, run_id=taken),
    ]
    reply = await client.CreateRuns(rs.CreateRunsRequest(runs=inputs, result_shape=IDS))
    assert not reply.results
    created = reply.created
    ids = [friendly.removeprefix("run_") for friendly in created.friendly_id]
    assert len(ids) == len(created.created_at_us) == len(created.is_cached) == 7
    assert ids[0] == inputs[0].run_id.removeprefix("run_")
    assert ids[2] == inputs[2].run_id.removeprefix("run_")
    assert [residency_of(i) for i in ids[:5]] == [
        Residency.LEGACY, Residency.NEW, Residency.NEW, Residency.LEGACY, Residency.NEW,
    ]  # fmt: skip
    for run_id in ids[:5]:
        assert await where(stack, "runs", run_id) == (CP if is_legacy_body(run_id) else RO)
    assert created.created_at_us[2] == _us(shown)
    assert list(created.is_cached) == [False] * 5 + [True, False]
    assert created.friendly_id[5] == holder.friendly_id
    assert created.created_at_us[5] == _us(holder.created_at)
    assert (created.friendly_id[6], created.created_at_us[6]) == ("", 0)
    assert list(created.errors) == [6]
    error = created.errors[6]
    assert (error.code, error.reason) == (
        grpc.StatusCode.ALREADY_EXISTS.value[0],
        "UNIQUE_VIOLATION",
    )
    # Each answer is the run as written (the whole answer of a read agrees).
    for k in (0, 1, 2, 3, 4):
        run = (
            await client.GetRun(
                rs.GetRunRequest(run_id=created.friendly_id[k], environment_id=env, consistency=RYW)
            )
        ).run
        assert _us(run.created_at) == created.created_at_us[k]
    # A replay (the drainer retrying) returns the same runs, cached, with their times.
    again = (
        await client.CreateRuns(rs.CreateRunsRequest(runs=inputs[:5], result_shape=IDS))
    ).created
    # (runs 1 and 4 name no id: each create mints a new one)
    assert [again.friendly_id[k] for k in (0, 2, 3)] == [created.friendly_id[k] for k in (0, 2, 3)]
    assert list(again.is_cached) == [True, False, True, True, False]
    assert list(again.created_at_us)[2:4] == list(created.created_at_us)[2:4]


async def test_ids_and_whole_answers_agree(client: Stub) -> None:
    env = new_env()
    inputs = [run_input(env, run_id=f"run_{body(r)}") for r in (Residency.NEW, Residency.LEGACY)]
    whole = await client.CreateRuns(rs.CreateRunsRequest(runs=inputs))
    lean = (await client.CreateRuns(rs.CreateRunsRequest(runs=inputs, result_shape=IDS))).created
    assert list(lean.friendly_id) == [r.run.friendly_id for r in whole.results]
    assert list(lean.created_at_us) == [_us(r.run.created_at) for r in whole.results]
    assert list(lean.is_cached) == [True, True]


def _columns(env: str, count: int, **fields: object) -> rs.RunColumns:
    columns = rs.RunColumns(
        count=count,
        environment_id=[env],
        organization_id=["org_test"],
        project_id=["proj_test"],
        task_identifier=["email/send"],
        payload=[b'{"i":%d}' % i for i in range(count)],
        payload_type=["application/json"],
    )
    for name, value in fields.items():
        getattr(columns, name).extend(value)
    return columns


async def test_columns_create_the_runs_rows_would(client: Stub, stack: LocalStack) -> None:
    env = new_env()
    key = new_key()
    ids = [f"run_{body(Residency.NEW)}", f"run_{body(Residency.LEGACY)}", "", ""]
    columns = _columns(env, 4, run_id=ids, default_max_attempts=[3], created_at_us=[0, 0, 0, 7])
    columns.options[2].idempotency_key = key
    columns.options[2].tags.extend(["a", "b"])
    columns.failed[3].code = "PAYLOAD_TOO_LARGE"
    reply = await client.CreateRuns(rs.CreateRunsRequest(columns=columns, result_shape=IDS))
    created = reply.created
    assert list(created.is_cached) == [False] * 4
    assert created.friendly_id[:2] == ids[:2]
    assert created.created_at_us[3] == 7
    for k, friendly in enumerate(created.friendly_id):
        run = (
            await client.GetRun(
                rs.GetRunRequest(run_id=friendly, environment_id=env, consistency=RYW)
            )
        ).run
        assert run.payload == b'{"i":%d}' % k
        assert run.max_attempts == 3
        assert await where(stack, "runs", run.id) == (CP if is_legacy_body(run.id) else RO)
        if k == 2:
            assert (run.idempotency_key, list(run.tags)) == (key, ["a", "b"])
        if k == 3:
            assert run.status == common_pb2.RUN_STATUS_SYSTEM_FAILURE
            assert run.error.code == "PAYLOAD_TOO_LARGE"
    # The key is held: the same columns again answer the holder, cached; named ids replay.
    again = await client.CreateRuns(rs.CreateRunsRequest(columns=columns, result_shape=IDS))
    assert list(again.created.is_cached) == [True, True, True, False]
    assert again.created.friendly_id[2] == created.friendly_id[2]
    # A whole answer is given for columns too.
    whole = await client.CreateRuns(rs.CreateRunsRequest(columns=_columns(env, 2)))
    assert [r.run.payload for r in whole.results] == [b'{"i":0}', b'{"i":1}']


async def test_columns_violations_name_the_run(client: Stub) -> None:
    env = new_env()
    columns = _columns(env, 3, task_identifier=["ok", "-bad", "ok"])
    del columns.task_identifier[0]  # the broadcast one of _columns
    columns.options[1].queue = "q" * 257
    error = await expect_error(
        client.CreateRuns(rs.CreateRunsRequest(columns=columns, result_shape=IDS)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "columns[1].task_identifier" in (error.details() or "")
    assert "columns[1].options.queue" in (error.details() or "")
    both = rs.CreateRunsRequest(columns=_columns(env, 1), runs=[run_input(env)])
    await expect_error(client.CreateRuns(both), grpc.StatusCode.INVALID_ARGUMENT)


@pytest.mark.parametrize("residency", [Residency.NEW, Residency.LEGACY])
async def test_item_columns_accept_as_items_would(client: Stub, residency: Residency) -> None:
    env = new_env()
    batch_id = f"batch_{body(residency)}"
    await client.CreateBatch(batch_request(env, 6, batch_id=batch_id))
    linked = (await client.CreateRun(rs.CreateRunRequest(run=run_input(env)))).run
    runs = rs.RunColumns(count=4, task_identifier=["email/send", "", "email/send", "email/send"])
    runs.payload.extend([b"{}"])
    columns = rs.BatchItemColumns(index=[0, 1, 2, 0], runs=runs)
    columns.existing_run_id[1] = linked.friendly_id
    columns.pre_failed[2].code = "PAYLOAD_TOO_LARGE"
    reply = await client.AcceptBatchItems(
        rs.AcceptBatchItemsRequest(
            batch_id=batch_id, environment_id=env, item_columns=columns, result_shape=IDS
        )
    )
    assert not reply.items
    accepted = reply.accepted
    assert list(accepted.index) == [0, 1, 2, 0]
    assert list(accepted.duplicate) == [False, False, False, True]
    assert accepted.run_id[1] == linked.friendly_id
    assert accepted.run_id[3] == accepted.run_id[0]
    assert reply.accepted_count == 3
    failed = (
        await client.GetRun(
            rs.GetRunRequest(run_id=accepted.run_id[2], environment_id=env, consistency=RYW)
        )
    ).run
    assert failed.status == common_pb2.RUN_STATUS_SYSTEM_FAILURE
    assert residency_of(failed.id) is residency
    # The row form answers the same lean columns; the whole form its items.
    rows = await client.AcceptBatchItems(
        rs.AcceptBatchItemsRequest(
            batch_id=batch_id, environment_id=env, items=items([3, 0]), result_shape=IDS
        )
    )
    assert list(rows.accepted.duplicate) == [False, True]
    assert rows.accepted.run_id[1] == accepted.run_id[0]
    whole = await client.AcceptBatchItems(
        rs.AcceptBatchItemsRequest(batch_id=batch_id, environment_id=env, items=items([4, 3]))
    )
    assert [(i.index, i.duplicate) for i in whole.items] == [(4, False), (3, True)]
    # A violation names its item.
    bad = rs.BatchItemColumns(index=[5], runs=rs.RunColumns(count=1, task_identifier=["-x"]))
    error = await expect_error(
        client.AcceptBatchItems(
            rs.AcceptBatchItemsRequest(batch_id=batch_id, environment_id=env, item_columns=bad)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "item_columns.runs[0].task_identifier" in (error.details() or "")
