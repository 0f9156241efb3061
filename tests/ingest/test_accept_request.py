"""A unit's AcceptBatchItemsRequest as columns stands for exactly the rows a BatchItemInput and
RunInput message per item (each run's task defaults filled) held, as the run store reads columns
back (`column_run`); columns every item holds alike travel once; the
columnar validation refuses exactly what the per-item rules refuse, with the same error."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from google.protobuf.duration_pb2 import Duration

from runops.common.v1 import common_pb2
from runops.controlplane.client import ControlPlaneClient
from runops.controlplane.defaults import TaskDefaults
from runops.controlplane.model import WorkerResolution
from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.ingest.v1 import ingest_pb2 as ing
from runops.kit.errors import InvalidArgument, NotFound
from runops.runstore.v1 import runstore_pb2 as rs
from services.ingest import accept_request, validation
from services.runstore.validation import column_run

WORKER = cp.BackgroundWorker(id="w1", environment_id="env", version="20261204.1")
TASKS = (
    cp.TaskDefinition(
        task_identifier="email/send",
        queue="mail",
        default_ttl=Duration(seconds=60),
        max_attempts=5,
        machine_preset="small-1x",
    ),
)


class FakeControlPlane(ControlPlaneClient):
    """The current worker ("") knows TASKS; a locked version "v-old" has no tasks; any other
    version is NOT_FOUND."""

    def __init__(self) -> None:  # no channel: only resolve_worker_version is called
        self.calls: list[str] = []

    async def resolve_worker_version(
        self, environment_id: str, *, worker: str = "", task_identifiers: Sequence[str] = ()
    ) -> WorkerResolution:
        self.calls.append(worker)
        if worker == "":
            return WORKER, TASKS
        if worker == "v-old":
            return cp.BackgroundWorker(id="w0", version="v-old"), ()
        raise NotFound("no such worker", reason="WORKER_NOT_FOUND")


def _items() -> list[ing.BatchItem]:
    options = common_pb2.TriggerOptions(
        queue="q", tags=["a", "b"], max_attempts=3, idempotency_key="k", ttl=Duration(seconds=5)
    )
    return [
        ing.BatchItem(
            index=0, task="email/send", payload=b'{"a":1}', payload_type="application/json"
        ),
        ing.BatchItem(index=1, task="email/send"),  # no payload, no payload type
        ing.BatchItem(index=200, task="sms/send", payload=b"x" * 300, payload_type="text/plain"),
        ing.BatchItem(index=20_000, task="email/send", payload=b"y", options=options),
        ing.BatchItem(
            index=5,
            task="email/send",
            payload=b"z",
            options=common_pb2.TriggerOptions(lock_to_version="v-old"),
        ),
        ing.BatchItem(index=7, task="email/send", payload=b"big" * 100, payload_type="t/x"),
        ing.BatchItem(index=8, task="email/send", payload=b"linked"),
        ing.BatchItem(index=9, task="sms/send", payload=b"too large", payload_type="t/y"),
        ing.BatchItem(index=2**31 - 2, task="email/send", payload=b"last"),
        ing.BatchItem(index=1, task="email/send", payload=b"a repeat: dropped"),
    ]


async def _expected(items: Sequence[ing.BatchItem]) -> rs.AcceptBatchItemsRequest:
    """The request as it was built before: a message per item, defaults filled per run."""
    inputs: dict[int, rs.BatchItemInput] = {}
    for item in items:
        if item.index in inputs:
            continue
        inputs[item.index] = rs.BatchItemInput(
            index=item.index,
            run=rs.RunInput(
                task_identifier=item.task,
                payload=item.payload,
                payload_type=item.payload_type,
                options=item.options if item.HasField("options") else None,
            ),
        )
    await TaskDefaults(FakeControlPlane()).fill("env", [i.run for i in inputs.values()])
    inputs[7].run.payload = b"packets/p/env/batch_b/item_7/payload"
    inputs[7].run.payload_type = "application/store"
    inputs[8] = rs.BatchItemInput(index=8, existing_run_id="run_existing")
    inputs[9].run.ClearField("payload")
    inputs[9].pre_failed.code = "PAYLOAD_TOO_LARGE"
    return rs.AcceptBatchItemsRequest(
        environment_id="env",
        batch_id="b",
        items=list(inputs.values()),
        result_shape=rs.RESULT_SHAPE_IDS,
    )


async def test_the_columns_stand_for_the_rows_built_message_by_message() -> None:
    items = ing.ItemChunk(items=_items()).items
    unit = validation.unit(items, 2**31 - 1)
    assert unit.repeated == 1
    assert len(unit.indexes) == len(items) - 1
    workers = {k: unit.items[k].options.lock_to_version for k in unit.with_options}
    keys: dict[accept_request.DefaultsKey, int] = {}
    for k, task in enumerate(unit.tasks):
        key = (workers.get(k, ""), task)
        keys[key] = keys.get(key, 0) + 1
    plane = FakeControlPlane()
    defaults = await accept_request.defaults_by_key(TaskDefaults(plane), "env", keys)
    assert sorted(plane.calls) == ["", "v-old"]  # once per worker, not per item
    position = {index: k for k, index in enumerate(unit.indexes)}
    wire = accept_request.encode(
        unit,
        environment_id="env",
        batch_id="b",
        workers=workers,
        defaults=defaults,
        payloads={position[7]: (b"packets/p/env/batch_b/item_7/payload", "application/store")},
        pre_failed={position[9]: common_pb2.RunError(code="PAYLOAD_TOO_LARGE")},
        linked={position[8]: "run_existing"},
    )
    request = rs.AcceptBatchItemsRequest.FromString(wire)
    expected = await _expected(items)
    assert (request.batch_id, request.environment_id) == ("b", "env")
    assert request.result_shape == rs.RESULT_SHAPE_IDS
    assert not request.items
    columns = request.item_columns
    assert list(columns.index) == [item.index for item in expected.items]
    assert columns.runs.count == len(expected.items)
    # Each item as the run store reads it back from the columns.
    for k, item in enumerate(expected.items):
        if item.existing_run_id:
            assert columns.existing_run_id[k] == item.existing_run_id
            continue
        assert k not in columns.existing_run_id
        assert column_run(columns.runs, k) == item.run, k
        expected_error = item.pre_failed if item.HasField("pre_failed") else None
        assert columns.pre_failed.get(k) == expected_error
    # A column every item holds alike travels once.
    assert len(columns.runs.payload) == len(expected.items)
    assert len(columns.runs.default_ttl_ms) == len(expected.items)
    by_index = {i.index: i for i in expected.items}
    assert by_index[0].run.default_queue == "mail"
    assert by_index[0].run.worker_version == WORKER.version
    assert by_index[200].run.default_queue == ""
    assert by_index[5].run.worker_version == ""


def test_a_unit_of_one_task_sends_its_shared_columns_once() -> None:
    items = ing.ItemChunk(items=[ing.BatchItem(index=i, task="t", payload=b"p") for i in range(50)])
    unit = validation.unit(items.items, 50)
    defaults = {("", "t"): rs.RunInput(worker_version="w1", default_queue="q")}
    columns = rs.AcceptBatchItemsRequest.FromString(
        accept_request.encode(
            unit,
            environment_id="env",
            batch_id="b",
            workers={},
            defaults=defaults,
            payloads={},
            pre_failed={},
            linked={},
        )
    ).item_columns
    runs = columns.runs
    assert list(runs.task_identifier) == ["t"]
    assert list(runs.payload_type) == [""]
    assert list(runs.worker_version) == ["w1"]
    assert list(runs.default_queue) == ["q"]
    assert list(runs.default_ttl_ms) == [0]
    assert len(runs.payload) == 50
    assert all(column_run(runs, k).worker_version == "w1" for k in range(50))


@pytest.mark.parametrize(
    "bad",
    [
        ing.BatchItem(index=3, task=""),
        ing.BatchItem(index=3, task="-starts-badly"),
        ing.BatchItem(index=3, task="t", payload_type="x" * 257),
        ing.BatchItem(index=3, task="t", options=common_pb2.TriggerOptions(queue="q" * 257)),
        ing.BatchItem(index=3, task="t", options=common_pb2.TriggerOptions(max_attempts=101)),
        ing.BatchItem(index=3, task="t", options=common_pb2.TriggerOptions(tags=[""])),
        ing.BatchItem(index=10, task="t"),
    ],
)
def test_a_bad_item_is_refused_as_the_item_by_item_rules_refuse_it(bad: ing.BatchItem) -> None:
    items = ing.ItemChunk(
        items=[*(ing.BatchItem(index=i, task="t") for i in range(3)), bad, ing.BatchItem(index=4)]
    ).items
    with pytest.raises(InvalidArgument) as columnar:
        validation.unit(items, 10)
    with pytest.raises(InvalidArgument) as item_by_item:
        validation._refuse(items, 10)
    assert str(columnar.value) == str(item_by_item.value)
    assert columnar.value.reason == item_by_item.value.reason
    assert columnar.value.violations == item_by_item.value.violations
    fields = [v.field for v in columnar.value.violations]
    if bad.index >= 10:
        assert columnar.value.reason == "INDEX_OUT_OF_RANGE"
        assert fields == ["items[10].index"]
    else:
        assert fields[0].startswith("items[3].")
        assert fields[-1] == "items[4].task"
