"""JSON log lines carry the request's context (spec §0): rpc, request id, and the environment,
batch and run ids the kit found in the request (or the answer), with no call in the handler;
nothing leaks into the next call."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog
from google.protobuf.message import Message

from runops.common.v1 import common_pb2
from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.ingest.v1 import ingest_pb2 as ing
from runops.kit.log_ids import LOG_KEYS, bind_ids
from runops.kit.logging import request_log_context
from runops.mollifier.v1 import mollifier_pb2 as m
from runops.runstore.v1 import runstore_pb2 as rs
from runops.testing.v1 import testing_pb2 as t
from tests.kit.harness import PROCESS_ENV, auth, behave, serving_address, spawn, stub


async def _uploads() -> AsyncIterator[t.UploadRequest]:
    # The first message names the batch, like ingest's stream header; later ones do not.
    yield t.UploadRequest(probe=t.Probe(behaviour="log", batch_id="batch_streamed"))
    yield t.UploadRequest(probe=t.Probe(behaviour="log", text="no ids here"))


async def test_log_lines_carry_the_ids_of_the_request() -> None:
    proc = spawn({**PROCESS_ENV, "RUNOPS_LOG_LEVEL": "debug", "RUNOPS_LOG_FORMAT": "json"})
    try:
        target = await asyncio.wait_for(asyncio.to_thread(serving_address, proc), timeout=60)
        async with grpc.aio.insecure_channel(target) as ch:
            await stub(ch).Behave(
                behave("log", environment_id="env_bound", batch_id="batch_bound"),
                metadata=(("x-request-id", "req-log"),),
            )
            await stub(ch).Upload(_uploads(), metadata=(("x-request-id", "req-upload"),))
            await stub(ch).Behave(
                behave("mint:run_minted", environment_id="env_asked"),
                metadata=(("x-request-id", "req-mint"),),
            )
            await stub(ch).Behave(
                behave("mint:run_minted", run_id="run_asked"),
                metadata=(("x-request-id", "req-asked"),),
            )
            await stub(ch).Open(t.OpenRequest(), metadata=(("x-request-id", "req-open"),))
            await stub(ch).WithApiKey(
                t.WithApiKeyRequest(probe=t.Probe(environment_id="env_in_request")),
                metadata=(*auth("key-env_from_key"), ("x-request-id", "req-key")),
            )
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines: list[dict[str, Any]] = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    by_request: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_request.setdefault(str(line.get("request_id")), []).append(line)

    # Unary: the handler's own line and the kit's per-call line both carry the request's ids.
    behaved = by_request["req-log"]
    assert {line["event"] for line in behaved} == {"behaved", "rpc handled"}
    for line in behaved:
        assert line["environment_id"] == "env_bound"
        assert line["batch_id"] == "batch_bound"
        assert "run_id" not in line  # empty fields bind nothing
        assert line["rpc"] == "/runops.testing.v1.TestingService/Behave"

    # Client streaming: bound from the first message on, for the rest of the call.
    uploaded = by_request["req-upload"]
    assert [line["event"] for line in uploaded] == ["uploaded", "uploaded", "rpc handled"]
    for line in uploaded:
        assert line["batch_id"] == "batch_streamed"
        assert line["rpc"] == "/runops.testing.v1.TestingService/Upload"

    # An id the handler minted (a field with the log_key option in the answer) reaches the
    # closing line; one the request named is never replaced by the answer's.
    (minted,) = by_request["req-mint"]
    assert minted["run_id"] == "run_minted"
    assert minted["environment_id"] == "env_asked"
    (asked,) = by_request["req-asked"]
    assert asked["run_id"] == "run_asked"

    # Reset at the end of the call: the next call on the same connection has none of it.
    (opened,) = by_request["req-open"]
    assert "environment_id" not in opened
    assert "batch_id" not in opened
    assert "run_id" not in opened

    # An API-key caller's environment is bound by the kit itself, and wins over the request's.
    (keyed,) = by_request["req-key"]
    assert keyed["environment_id"] == "env_from_key"
    assert "batch_id" not in keyed


def _bound_from(*messages: Message) -> dict[str, Any]:
    with request_log_context(rpc="/x/Y"):
        for message in messages:
            bind_ids(message)
        bound = structlog.contextvars.get_contextvars()
    assert "rpc" not in structlog.contextvars.get_contextvars()  # reset when the call ended
    return {k: v for k, v in bound.items() if k in LOG_KEYS}


def test_the_services_contracts_name_their_ids() -> None:
    """The ids the services' handlers bound by hand before the kit did, from the same fields."""
    assert _bound_from(
        rs.CreateRunRequest(run=rs.RunInput(environment_id="env_a", task_identifier="t"))
    ) == {"environment_id": "env_a"}
    assert _bound_from(rs.AcceptBatchItemsRequest(batch_id="batch_b", environment_id="env_a")) == {
        "environment_id": "env_a",
        "batch_id": "batch_b",
    }
    assert _bound_from(m.TriggerRequest(environment_id="env_a", run_id="run_r")) == {
        "environment_id": "env_a",
        "run_id": "run_r",
    }
    # A minted batch id: the request names none, the answer's friendly id is bound.
    assert _bound_from(
        rs.CreateBatchRequest(environment_id="env_a"),
        rs.CreateBatchResponse(batch=common_pb2.Batch(id="b", friendly_id="batch_b")),
    ) == {"environment_id": "env_a", "batch_id": "batch_b"}
    assert _bound_from(
        ing.CreateBatchRequest(run_count=1),
        ing.CreateBatchResponse(batch=common_pb2.Batch(id="b", friendly_id="batch_b")),
    ) == {"batch_id": "batch_b"}
    # A stream's header names the batch; the chunks after it change nothing.
    assert _bound_from(
        ing.StreamBatchItemsRequest(header=ing.StreamHeader(batch_id="batch_s")),
        ing.StreamBatchItemsRequest(chunk=ing.ItemChunk(items=[ing.BatchItem(index=0)])),
    ) == {"batch_id": "batch_s"}
    # The environment an API key resolved to, and one an admin created.
    assert _bound_from(
        cp.AuthenticateApiKeyRequest(api_key="secret"),
        cp.AuthenticateApiKeyResponse(environment=cp.Environment(id="env_k")),
    ) == {"environment_id": "env_k"}
    # A list holds many ids, none of them the call's.
    assert _bound_from(cp.BatchGetEnvironmentsRequest(environment_ids=["env_a", "env_b"])) == {}
