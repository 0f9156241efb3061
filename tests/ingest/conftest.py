"""The suite the ingest service calls, once per session: a control plane, a run store (split
on) and a mollifier in-process on the session stack; an in-process ingest server over them.

The mollifier runs without a drainer (its own key prefix on the session Redis): a run it
buffers stays buffered until a test drains it, so "linked to a buffered run" is
deterministic."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from runops.localstack import LocalStack
from runops.localstack.settings import ADMIN_TOKEN
from services.ingest.app import Ingest
from services.mollifier.app import Mollifier
from tests.controlplane.harness import Seeded, seed, start_control_plane
from tests.controlplane.harness import stub as controlplane_stub
from tests.ingest.harness import Stub, Suite, ingest_in_process, stub
from tests.mollifier.service_harness import start_mollifier
from tests.runstore.harness import start_on_stack


@pytest.fixture(scope="session")
async def suite_mollifier(stack: LocalStack) -> AsyncIterator[tuple[Suite, Mollifier]]:
    plane = await start_control_plane(stack)
    store = await start_on_stack(stack, split=True, name="runstore-for-ingest")
    mollifier = await start_mollifier(
        redis={"url": stack.redis_url},
        key_prefix=f"ingest-tests-{uuid.uuid4().hex[:8]}",
        runstore_target=store.app.target,
        controlplane_target=plane.app.target,
        drainer_enabled=False,
        # A burst of a few hundred keyed triggers trips it on a slow, shared machine too.
        gate_threshold=20,
        gate_window_seconds=1.0,
    )
    yield Suite(stack, plane.app.target, store.app.target, mollifier.app.target), mollifier
    await mollifier.app.stop(grace=1)
    await store.app.stop(grace=1)
    await plane.app.stop(grace=1)


@pytest.fixture(scope="session")
def suite(suite_mollifier: tuple[Suite, Mollifier]) -> Suite:
    return suite_mollifier[0]


@pytest.fixture(scope="session")
def mollifier(suite_mollifier: tuple[Suite, Mollifier]) -> Mollifier:
    """The suite's mollifier (no drainer of its own)."""
    return suite_mollifier[1]


@pytest.fixture(scope="session")
async def ingest(suite: Suite) -> AsyncIterator[Ingest]:
    async with ingest_in_process(suite) as started:
        yield started


@pytest.fixture
async def seeded(suite: Suite) -> Seeded:
    return await seed(controlplane_stub(suite.controlplane_target, ADMIN_TOKEN))


@pytest.fixture
def api(ingest: Ingest, seeded: Seeded) -> Stub:
    return stub(ingest.app.target, seeded.api_key)
