"""A control-plane server per session, with admin and internal stubs."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from runops.localstack import LocalStack
from runops.localstack.settings import ADMIN_TOKEN, INTERNAL_TOKEN
from services.controlplane.app import ControlPlane
from tests.controlplane.harness import (
    Seeded,
    Stub,
    seed,
    start_control_plane,
    stub,
)


@pytest.fixture(scope="session")
async def control_plane(stack: LocalStack) -> AsyncIterator[ControlPlane]:
    plane = await start_control_plane(stack)
    yield plane
    await plane.app.stop(grace=1)


@pytest.fixture(scope="session")
def admin(control_plane: ControlPlane) -> Stub:
    return stub(control_plane.app.target, ADMIN_TOKEN)


@pytest.fixture(scope="session")
def internal(control_plane: ControlPlane) -> Stub:
    return stub(control_plane.app.target, INTERNAL_TOKEN)


@pytest.fixture
async def seeded(admin: Stub) -> Seeded:
    return await seed(admin)
