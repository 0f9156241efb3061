"""Task defaults on batch items (spec §4) end to end: the control plane's workers, the ingest
service, the run store."""

from __future__ import annotations

import pytest
import structlog

from runops.localstack.settings import ADMIN_TOKEN
from services.ingest.app import Ingest
from tests.controlplane.harness import (
    ENV_TYPES,
    EXPLICIT_OPTIONS,
    PLATFORM_DEFAULTS,
    RunDefaults,
    explicit_defaults,
    register_workers,
    seed,
)
from tests.controlplane.harness import stub as cp_stub
from tests.ingest.harness import Suite, item, requests, stub
from tests.ingest.test_service import all_runs, create


@pytest.mark.parametrize("env_type", list(ENV_TYPES))
async def test_batch_items_take_the_current_workers_task_defaults(
    ingest: Ingest, suite: Suite, env_type: str
) -> None:
    admin = cp_stub(suite.controlplane_target, ADMIN_TOKEN)
    env = await seed(admin, ENV_TYPES[env_type])
    workers = await register_workers(admin, env)
    api = stub(ingest.app.target, env.api_key)
    explicit = explicit_defaults(workers.current.worker.version)
    # Per index: the item and what its run must hold; unknown tasks in both chunks.
    cases = [
        (item(0), workers.expected("email/send")),
        (item(1, task="sms/send"), workers.expected("sms/send")),
        (item(2, options=EXPLICIT_OPTIONS), explicit),
        (item(3, task="not/registered"), PLATFORM_DEFAULTS),
        (item(4, task="not/registered"), PLATFORM_DEFAULTS),
        (item(5), workers.expected("email/send")),
        (item(6, task="also/unknown"), PLATFORM_DEFAULTS),
    ]
    batch = await create(api, len(cases))
    chunks = [[i for i, _ in cases[:4]], [i for i, _ in cases[4:]]]
    with structlog.testing.capture_logs() as logs:
        reply = await api.StreamBatchItems(requests(batch.friendly_id, *chunks))
    assert reply.sealed
    runs = await all_runs(suite, batch.friendly_id, env.env_id)
    assert [RunDefaults.of(r) for r in runs] == [expected for _, expected in cases]
    assert all(r.lock_to_version == "" for r in runs)
    # Each unknown task is logged once, not once per item or chunk.
    unknown = [e["tasks"] for e in logs if e["event"] == "unknown task: platform defaults"]
    assert sorted(task for tasks in unknown for task in tasks) == ["also/unknown", "not/registered"]


async def test_batch_items_without_a_worker_take_platform_defaults(
    ingest: Ingest, suite: Suite
) -> None:
    env = await seed(cp_stub(suite.controlplane_target, ADMIN_TOKEN))
    api = stub(ingest.app.target, env.api_key)
    batch = await create(api, 4)
    with structlog.testing.capture_logs() as logs:
        reply = await api.StreamBatchItems(
            requests(
                batch.friendly_id, [item(0), item(1)], [item(2), item(3, options=EXPLICIT_OPTIONS)]
            )
        )
    assert reply.sealed
    runs = await all_runs(suite, batch.friendly_id, env.env_id)
    assert [RunDefaults.of(r) for r in runs] == [PLATFORM_DEFAULTS] * 3 + [explicit_defaults("")]
    assert [e["event"] for e in logs if "platform defaults" in e["event"]] == [
        "no worker to take task defaults from: platform defaults"
    ]
