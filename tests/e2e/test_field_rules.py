"""One set of rules for a run's fields, whichever door a trigger comes through: the same option
sets, good and bad, sent to the mollifier's `Trigger`, an ingest batch item and the run store's
`CreateRun`, `CreateRuns` and `AcceptBatchItems` are accepted or refused alike, naming the same
field paths (each door prefixes its own: `items[3].`, `run.`, `runs[0].`, `items[0].run.`).

The copies of these rules once drifted: only the mollifier checked `debounce.key` and
`one_time_use_token`, and the run store let a negative duration shorter than a millisecond pass.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import duration_pb2

from runops.common.v1 import common_pb2
from runops.ingest.v1 import ingest_pb2 as ing
from runops.kit.errors import details_of
from runops.mollifier.v1 import mollifier_pb2 as m
from runops.runstore.v1 import runstore_pb2 as rs
from tests.e2e.suite import Clients, Tenant, new_tenant

TASK = "e2e/field-rules"
# The task identifier's field name at each door ("task" in an ingest item).
TASK_FIELD = "task_identifier"


def _seconds(value: int, nanos: int = 0) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=value, nanos=nanos)


@dataclass(frozen=True)
class Case:
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    task: str = TASK
    payload_type: str = "application/json"
    # The refused fields, below the door's prefix; empty: accepted.
    refused: tuple[str, ...] = ()

    def trigger_options(self) -> common_pb2.TriggerOptions:
        return common_pb2.TriggerOptions(**self.options)


CASES = [
    Case("plain"),
    Case(
        "every limit reached, none passed",
        {
            "queue": "q" * 256,
            "concurrency_key": "c" * 256,
            "idempotency_key": f"k-{secrets.token_hex(4)}".ljust(512, "k"),
            "machine_preset": "m" * 256,
            "lock_to_version": "v" * 256,
            "one_time_use_token": "t" * 256,
            "debounce": common_pb2.Debounce(key="d" * 256, delay=_seconds(1)),
            "tags": [f"{i}".ljust(128, "t") for i in range(10)],
            "max_attempts": 100,
            "ttl": _seconds(60),
            "idempotency_key_ttl": _seconds(3600),
            "priority": _seconds(5),
        },
    ),
    Case("task identifier with every allowed character", task="a-Z_0.9:x/y"),
    Case("long queue", {"queue": "q" * 257}, refused=("options.queue",)),
    Case(
        "long concurrency key",
        {"concurrency_key": "c" * 257},
        refused=("options.concurrency_key",),
    ),
    Case(
        "long idempotency key", {"idempotency_key": "k" * 513}, refused=("options.idempotency_key",)
    ),
    Case("long machine preset", {"machine_preset": "m" * 257}, refused=("options.machine_preset",)),
    Case("long version lock", {"lock_to_version": "v" * 257}, refused=("options.lock_to_version",)),
    Case(
        "long one-time-use token",
        {"one_time_use_token": "t" * 257},
        refused=("options.one_time_use_token",),
    ),
    Case(
        "long debounce key",
        {"debounce": common_pb2.Debounce(key="d" * 257)},
        refused=("options.debounce.key",),
    ),
    Case("too many tags", {"tags": ["t"] * 11}, refused=("options.tags",)),
    Case("long tag", {"tags": ["a", "t" * 129]}, refused=("options.tags[1]",)),
    Case("empty tag", {"tags": [""]}, refused=("options.tags[0]",)),
    Case("negative ttl", {"ttl": _seconds(-1)}, refused=("options.ttl",)),
    Case("ttl a nanosecond below zero", {"ttl": _seconds(0, -1)}, refused=("options.ttl",)),
    Case(
        "negative idempotency key ttl",
        {"idempotency_key_ttl": _seconds(-60)},
        refused=("options.idempotency_key_ttl",),
    ),
    Case("negative priority", {"priority": _seconds(0, -1_000_000)}, refused=("options.priority",)),
    Case("too many attempts", {"max_attempts": 101}, refused=("options.max_attempts",)),
    Case("task identifier starting with a dash", task="-bad", refused=(TASK_FIELD,)),
    Case("long task identifier", task="a" * 129, refused=(TASK_FIELD,)),
    Case("empty task identifier", task="", refused=(TASK_FIELD,)),
    Case("long payload type", payload_type="p" * 257, refused=("payload_type",)),
    Case(
        "several at once",
        {"queue": "q" * 257, "debounce": common_pb2.Debounce(key="d" * 257), "max_attempts": 101},
        refused=("options.queue", "options.debounce.key", "options.max_attempts"),
    ),
]


async def _answer(call: Awaitable[Any], prefix: str, task_field: str = TASK_FIELD) -> list[str]:
    """The refused fields below `prefix` (the task identifier's field renamed to TASK_FIELD);
    empty when the call succeeded. A refusal other than INVALID_ARGUMENT fails the test."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        details = details_of(exc)
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT, details
        fields = []
        for name in details.fields:
            assert name.startswith(prefix), f"{name} is not below {prefix}"
            below = name.removeprefix(prefix)
            fields.append(TASK_FIELD if below == task_field else below)
        return fields
    return []


Door = Callable[[int, Case], Awaitable[list[str]]]


@dataclass
class Doors:
    """Each door a trigger's options come through, for one tenant."""

    clients: Clients
    tenant: Tenant
    ingest_batch: str
    runstore_batch: str

    def run_input(self, case: Case, *, in_batch: bool = False) -> rs.RunInput:
        tenant = self.tenant
        return rs.RunInput(
            environment_id="" if in_batch else tenant.environment_id,
            organization_id="" if in_batch else tenant.organization_id,
            project_id="" if in_batch else tenant.project_id,
            task_identifier=case.task,
            payload=b"{}",
            payload_type=case.payload_type,
            options=case.trigger_options(),
        )

    async def mollifier(self, _: int, case: Case) -> list[str]:
        request = m.TriggerRequest(
            environment_id=self.tenant.environment_id,
            task_identifier=case.task,
            payload=b"{}",
            payload_type=case.payload_type,
            options=case.trigger_options(),
        )
        return await _answer(self.clients.mollifier.Trigger(request), "")

    async def ingest(self, index: int, case: Case) -> list[str]:
        item = ing.BatchItem(
            index=index,
            task=case.task,
            payload=b"{}",
            payload_type=case.payload_type,
            options=case.trigger_options(),
        )

        async def stream() -> AsyncIterator[ing.StreamBatchItemsRequest]:
            yield ing.StreamBatchItemsRequest(header=ing.StreamHeader(batch_id=self.ingest_batch))
            yield ing.StreamBatchItemsRequest(chunk=ing.ItemChunk(items=[item]))

        api = self.clients.ingest(self.tenant.api_key)
        return await _answer(api.StreamBatchItems(stream()), f"items[{index}].", "task")

    async def create_run(self, _: int, case: Case) -> list[str]:
        request = rs.CreateRunRequest(run=self.run_input(case))
        return await _answer(self.clients.runstore.CreateRun(request), "run.")

    async def create_runs(self, _: int, case: Case) -> list[str]:
        request = rs.CreateRunsRequest(runs=[self.run_input(case)])
        return await _answer(self.clients.runstore.CreateRuns(request), "runs[0].")

    async def accept_batch_items(self, index: int, case: Case) -> list[str]:
        request = rs.AcceptBatchItemsRequest(
            batch_id=self.runstore_batch,
            environment_id=self.tenant.environment_id,
            items=[rs.BatchItemInput(index=index, run=self.run_input(case, in_batch=True))],
        )
        return await _answer(self.clients.runstore.AcceptBatchItems(request), "items[0].run.")


async def test_every_door_accepts_and_refuses_the_same_options(clients: Clients) -> None:
    tenant = await new_tenant(clients.admin)
    api = clients.ingest(tenant.api_key)
    ingest_batch = await api.CreateBatch(ing.CreateBatchRequest(run_count=len(CASES)))
    runstore_batch = await clients.runstore.CreateBatch(
        rs.CreateBatchRequest(
            environment_id=tenant.environment_id,
            organization_id=tenant.organization_id,
            project_id=tenant.project_id,
            run_count=len(CASES),
        )
    )
    doors = Doors(clients, tenant, ingest_batch.batch.friendly_id, runstore_batch.batch.friendly_id)
    by_door: dict[str, Door] = {
        "mollifier Trigger": doors.mollifier,
        "ingest StreamBatchItems": doors.ingest,
        "run store CreateRun": doors.create_run,
        "run store CreateRuns": doors.create_runs,
        "run store AcceptBatchItems": doors.accept_batch_items,
    }
    differing: list[str] = []
    for index, case in enumerate(CASES):
        for door, send in by_door.items():
            got = tuple(await send(index, case))
            if got != case.refused:
                differing.append(f"{case.name} at {door}: refused {got}, expected {case.refused}")
    assert not differing, "\n".join(differing)


async def test_the_mollifier_and_the_run_store_take_the_same_cancel_reason(
    clients: Clients,
) -> None:
    """The copies disagreed (the mollifier refused a reason over 1,024 characters, the run store
    took 4,096, as long as the kit lets any string be): the run store's limit is the rule."""
    tenant = await new_tenant(clients.admin)
    doors = Doors(clients, tenant, "", "")
    reason = "r" * 4096

    async def new_run() -> str:
        created = await clients.runstore.CreateRun(
            rs.CreateRunRequest(run=doors.run_input(CASES[0]))
        )
        return created.run.friendly_id

    env = tenant.environment_id
    await clients.mollifier.CancelRun(
        m.CancelRunRequest(environment_id=env, run_id=await new_run(), reason=reason)
    )
    await clients.runstore.CancelRun(
        rs.CancelRunRequest(environment_id=env, run_id=await new_run(), reason=reason)
    )
