"""What every service's client helper (`runops.<service>.client`) shares: its channel, how a
failed call comes back, and the consistency level of a read.

A caller's mistake (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ALREADY_EXISTS) comes back
as the domain error it was raised as (details intact), so a service can pass it on; transient
failures stay AioRpcError, which the kit maps to retryable statuses for the caller's caller.
"""

from __future__ import annotations

from types import TracebackType
from typing import NoReturn, Self

import grpc

from runops.common.v1 import common_pb2
from runops.kit.channels import create_channel
from runops.kit.errors import error_from_rpc

DOMAIN_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)


def raise_domain(exc: grpc.aio.AioRpcError) -> NoReturn:
    """Re-raise a failed call: a caller's mistake as its domain error, anything else as is."""
    if exc.code() in DOMAIN_CODES:
        raise error_from_rpc(exc) from exc
    raise exc


def consistency(read_your_writes: bool) -> common_pb2.ConsistencyLevel.ValueType:
    if read_your_writes:
        return common_pb2.CONSISTENCY_LEVEL_READ_YOUR_WRITES
    return common_pb2.CONSISTENCY_LEVEL_REPLICA


class ServiceClient:
    """A kit channel to `target` (internal token, request id, deadline propagation,
    round_robin), closed with the client; a channel given by the caller stays the caller's."""

    def __init__(
        self, target: str, *, token: str | None = None, channel: grpc.aio.Channel | None = None
    ) -> None:
        self.target = target
        self._owns_channel = channel is None
        self._channel = channel or create_channel(target, token=token)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()
