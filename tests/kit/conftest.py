"""A kit test app per test, on the `runops.testing.v1` contract."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from runops.kit.server import ServiceApp
from tests.kit.app import build_app
from tests.kit.harness import settings


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[ServiceApp]:
    service = build_app(settings(), down_file=tmp_path / "down")
    await service.start()
    yield service
    await service.stop(grace=1)


@pytest.fixture
async def channel(app: ServiceApp) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(app.target) as ch:
        yield ch
