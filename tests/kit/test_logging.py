"""JSON log lines carry the request's context (spec §0): rpc, request id, and the environment
and batch ids once known; nothing leaks into the next call."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import grpc

from runops.testing.v1 import testing_pb2 as t
from tests.kit.harness import PROCESS_ENV, auth, behave, serving_address, spawn, stub


async def test_log_lines_carry_the_environment_and_batch_ids() -> None:
    proc = spawn({**PROCESS_ENV, "RUNOPS_LOG_LEVEL": "debug", "RUNOPS_LOG_FORMAT": "json"})
    try:
        target = await asyncio.wait_for(asyncio.to_thread(serving_address, proc), timeout=60)
        async with grpc.aio.insecure_channel(target) as ch:
            await stub(ch).Behave(
                behave("log:env_bound:batch_bound"), metadata=(("x-request-id", "req-log"),)
            )
            await stub(ch).Open(t.OpenRequest(), metadata=(("x-request-id", "req-open"),))
            await stub(ch).WithApiKey(
                t.WithApiKeyRequest(),
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

    # The handler's own line and the kit's per-call line both carry what the handler bound.
    behaved = by_request["req-log"]
    assert {line["event"] for line in behaved} == {"behaved", "rpc handled"}
    for line in behaved:
        assert line["environment_id"] == "env_bound"
        assert line["batch_id"] == "batch_bound"
        assert line["rpc"] == "/runops.testing.v1.TestingService/Behave"

    # Reset at the end of the call: the next call on the same connection has none of it.
    (opened,) = by_request["req-open"]
    assert "environment_id" not in opened
    assert "batch_id" not in opened

    # An API-key caller's environment is bound by the kit itself.
    (keyed,) = by_request["req-key"]
    assert keyed["environment_id"] == "env_from_key"
    assert "batch_id" not in keyed
