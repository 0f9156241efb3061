"""What the service harnesses (tests/<service>/harness.py) share: stubs on channels kept open,
the waits and error checks the tests assert with, and a Postgres of one test module alone. A
service's in-process settings and its process environment come from runops.localstack.settings
(the benchmarks start services the same way)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runops.kit.channels import create_channel
from runops.localstack import PostgresCluster, printing_progress
from runops.migrations import migrate

T = TypeVar("T")

# What a caller may see while a dependency is down or hung: it retries these (never INTERNAL).
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)

# A grpc.aio channel closes when collected; stubs do not keep theirs alive.
_channels: list[grpc.aio.Channel] = []


def stub_on(make: Callable[[grpc.aio.Channel], T], target: str, token: str | None) -> T:
    """`make(channel)` on a new channel to `target` presenting `token`, open for the session."""
    channel = create_channel(target, token=token)
    _channels.append(channel)
    return make(channel)


async def expect_error(call: Any, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """Await `call`; it must fail with `code`. Returns the error for its details."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    exc = caught.value
    assert exc.code() == code, f"expected {code.name}, got {exc.code().name}: {exc.details()}"
    return exc


async def until(
    check: Callable[[], Awaitable[bool]], limit: float = 5.0, interval: float = 0.01
) -> float:
    """Poll `check` until it is true; returns the seconds it took (fails after `limit`)."""
    began = time.monotonic()
    while not await check():
        if time.monotonic() - began > limit:
            raise AssertionError(f"not true within {limit}s")
        await asyncio.sleep(interval)
    return time.monotonic() - began


async def health_status(target: str) -> int:
    """The server's overall grpc.health.v1 status (SERVING, NOT_SERVING)."""
    health: Any = stub_on(health_pb2_grpc.HealthStub, target, None)  # typed for sync channels
    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(reply.status)


async def until_health(target: str, status: int, limit: float = 10.0) -> None:
    """Waits until the server's overall health is `status` (health checks run every 0.2 s)."""

    async def reached() -> bool:
        return await health_status(target) == status

    await until(reached, limit)


@contextlib.asynccontextmanager
async def private_postgres(
    name: str, state_dir: Path, database: str, migrations: str
) -> AsyncIterator[PostgresCluster]:
    """A Postgres writer + streaming replica for one test module alone (its tests may hang or
    stop its servers), `database` migrated with `migrations` ("controlplane" or "runops")."""
    pg = PostgresCluster(name, state_dir, database, progress=printing_progress(name))
    try:
        await asyncio.to_thread(pg.start)
        await migrate(pg.migrator_dsn, migrations)
        await pg.wait_for_replica()
        yield pg
    finally:
        await asyncio.to_thread(pg.stop)


# A line structlog's default logger prints: in-process services log to the test process's
# stdout (it configures no logging), where a CLI test also reads the command's output.
_LOG_LINE = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} \[")


def without_log_lines(text: str) -> str:
    """Captured output without the lines in-process services logged into it."""
    return "".join(line for line in text.splitlines(True) if not _LOG_LINE.match(line))
