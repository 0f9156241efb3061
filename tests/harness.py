"""What the service harnesses (tests/<service>/harness.py) share: stubs on channels kept open,
and the waits and error checks the tests assert with. A service's in-process settings and its
process environment come from runops.localstack.settings (the benchmarks start services the
same way)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import pytest

from runops.kit.channels import create_channel

T = TypeVar("T")

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
