"""The ingest service on the real suite: a control plane, a run store and a mollifier
(in-process, on the session stack), ingest in-process or as OS processes, seeded environments,
item builders."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from runops.common.v1 import common_pb2
from runops.ingest.v1 import ingest_pb2 as ing
from runops.ingest.v1 import ingest_pb2_grpc as ing_grpc
from runops.kit.backoff import ExponentialBackoff
from runops.kit.ids import residency_of
from runops.localstack import LocalStack, PostgresDatabase
from runops.localstack.ports import free_port
from runops.localstack.services import ServiceProcess
from runops.localstack.settings import in_process_settings, process_env
from services.ingest.app import Ingest, build_ingest
from services.ingest.offload import StoreConfig
from services.ingest.settings import IngestSettings
from tests.harness import stub_on

if TYPE_CHECKING:
    from runops.ingest.v1.ingest_pb2_grpc import BatchIngestServiceAsyncStub

    Stub: TypeAlias = BatchIngestServiceAsyncStub
else:
    Stub = ing_grpc.BatchIngestServiceStub

FAST = ExponentialBackoff(base=0.02, cap=0.2, jitter=0.5)


@dataclasses.dataclass(frozen=True)
class Suite:
    stack: LocalStack
    controlplane_target: str
    runstore_target: str
    mollifier_target: str


def settings_for(suite: Suite, **overrides: Any) -> IngestSettings:
    values: dict[str, Any] = {
        "controlplane_target": suite.controlplane_target,
        "runstore_target": suite.runstore_target,
        "mollifier_target": suite.mollifier_target,
        "redis": {"url": suite.stack.redis_url},
        "s3_endpoint_url": suite.stack.s3_endpoint_url,
        "s3_bucket": suite.stack.s3_bucket,
        "s3_region": suite.stack.s3_region,
        "s3_attempts": 2,
        "s3_attempt_timeout_seconds": 2,
        "s3_retry_base_seconds": 0.02,
        "s3_retry_cap_seconds": 0.05,
        "watch_interval_seconds": 0.05,
        # Small thresholds keep the test payloads small.
        "offload_threshold_bytes": 4096,
        "max_item_payload_bytes": 16384,
    }
    values.update(overrides)
    return in_process_settings(IngestSettings, **values)


def store_config(stack: LocalStack, settings: IngestSettings, **overrides: Any) -> StoreConfig:
    env = stack.service_env()
    return dataclasses.replace(
        StoreConfig.from_settings(settings),
        access_key_id=env["AWS_ACCESS_KEY_ID"],
        secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        **overrides,
    )


@contextlib.asynccontextmanager
async def ingest_in_process(suite: Suite, **overrides: Any) -> AsyncIterator[Ingest]:
    settings = settings_for(suite, **overrides)
    started = await build_ingest(settings, store_config(suite.stack, settings))
    await started.app.start()
    try:
        yield started
    finally:
        await started.app.stop(grace=1)


def ingest_process(
    suite: Suite, log_file: Path, port: int | None = None, **env: str
) -> ServiceProcess:
    values = {
        "RUNOPS_CONTROLPLANE_TARGET": suite.controlplane_target,
        "RUNOPS_RUNSTORE_TARGET": suite.runstore_target,
        "RUNOPS_MOLLIFIER_TARGET": suite.mollifier_target,
        "RUNOPS_GRACE_PERIOD_SECONDS": "2",
        "RUNOPS_OFFLOAD_THRESHOLD_BYTES": "4096",
        "RUNOPS_MAX_ITEM_PAYLOAD_BYTES": "16384",
        **env,
    }
    environ = process_env(suite.stack, **values)
    return ServiceProcess("ingest", port or free_port(), -1, log_file, env=environ)


def stub(target: str, api_key: str | None) -> Stub:
    return stub_on(ing_grpc.BatchIngestServiceStub, target, api_key)


def database_of(suite: Suite, batch: common_pb2.Batch) -> PostgresDatabase:
    """The database the batch lives in (by its id's residency)."""
    return suite.stack.database_for(residency_of(batch.id))


async def replayed(suite: Suite, api: Stub, batch: common_pb2.Batch) -> common_pb2.Batch:
    """`GetBatch` once the batch's replica has replayed everything written so far. The public
    read goes to a replica, so reading at once after a write can show the state before it (a CI
    flake on a busy machine)."""
    await database_of(suite, batch).wait_for_replica()
    return (await api.GetBatch(ing.GetBatchRequest(batch_id=batch.friendly_id))).batch


def item(index: int, size: int = 16, **fields: Any) -> ing.BatchItem:
    payload = (f'{{"i":{index}}}'.encode() + b" " * size)[: max(size, 8)]
    values: dict[str, Any] = {
        "index": index,
        "task": "email/send",
        "payload": payload,
        "payload_type": "application/json",
    }
    values.update(fields)
    return ing.BatchItem(**values)


def items(indexes: Iterable[int], **fields: Any) -> list[ing.BatchItem]:
    return [item(i, **fields) for i in indexes]


async def requests(
    batch_id: str | None, *chunks: list[ing.BatchItem], header_again: bool = False
) -> AsyncIterator[ing.StreamBatchItemsRequest]:
    if batch_id is not None:
        yield ing.StreamBatchItemsRequest(header=ing.StreamHeader(batch_id=batch_id))
    for chunk in chunks:
        yield ing.StreamBatchItemsRequest(chunk=ing.ItemChunk(items=chunk))
    if header_again:
        yield ing.StreamBatchItemsRequest(header=ing.StreamHeader(batch_id=batch_id or ""))
