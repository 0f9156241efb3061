"""The suite the ingest service calls, once per session: a control plane and a run store
(split on) in-process on the session stack; an in-process ingest server over them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from runops.localstack import LocalStack
from services.ingest.app import Ingest
from tests.controlplane.harness import ADMIN, Seeded, seed, start_control_plane
from tests.controlplane.harness import stub as controlplane_stub
from tests.ingest.harness import Stub, Suite, ingest_in_process, stub
from tests.runstore.harness import start_on_stack


@pytest.fixture(scope="session")
async def suite(stack: LocalStack) -> AsyncIterator[Suite]:
    plane = await start_control_plane(stack)
    store = await start_on_stack(stack, split=True, name="runstore-for-ingest")
    yield Suite(stack, plane.app.target, store.app.target)
    await store.app.stop(grace=1)
    await plane.app.stop(grace=1)


@pytest.fixture(scope="session")
async def ingest(suite: Suite) -> AsyncIterator[Ingest]:
    async with ingest_in_process(suite) as started:
        yield started


@pytest.fixture
async def seeded(suite: Suite) -> Seeded:
    return await seed(controlplane_stub(suite.controlplane_target, ADMIN))


@pytest.fixture
def api(ingest: Ingest, seeded: Seeded) -> Stub:
    return stub(ingest.app.target, seeded.api_key)
