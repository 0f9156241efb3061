"""What every service's client helper (`runops.<service>.client`) shares: its channel, the
one way a call is made (`ServiceClient._call`, after Temporal's ServiceCall: deadline, retry
policy, error translation), and the consistency level of a read.

A caller's mistake (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ALREADY_EXISTS) comes back
as the domain error it was raised as (details intact), so a service can pass it on; transient
failures stay AioRpcError, which the kit maps to retryable statuses for the caller's caller.
A client with other needs (the ingest client's IngestError) overrides `_error`.

Client methods take keyword arguments in one order: `environment_id`, then the object's ids
(`run_id`, `batch_id`, `task_identifier`, `idempotency_key`), then the payload, then options
(`read_your_writes`, paging). A method of one subject (a request message, a lone id) takes it
positionally.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Self, TypeVar, overload

import grpc

from runops.common.v1 import common_pb2
from runops.kit.backoff import Retry
from runops.kit.channels import create_channel
from runops.kit.errors import error_from_rpc

Request = TypeVar("Request")
Response = TypeVar("Response")
T = TypeVar("T")

DOMAIN_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)


def domain_error(exc: grpc.aio.AioRpcError) -> Exception | None:
    """A caller's mistake as its domain error; None: the failure stays as it is."""
    return error_from_rpc(exc) if exc.code() in DOMAIN_CODES else None


def consistency(read_your_writes: bool) -> common_pb2.ConsistencyLevel.ValueType:
    if read_your_writes:
        return common_pb2.CONSISTENCY_LEVEL_READ_YOUR_WRITES
    return common_pb2.CONSISTENCY_LEVEL_REPLICA


class ServiceClient:
    """A kit channel to `target` (internal token, request id, deadline propagation,
    round_robin), closed with the client; a channel given by the caller stays the caller's."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        channel: grpc.aio.Channel | None = None,
        timeout: float | None = None,
    ) -> None:
        """`timeout`: each call's deadline (a stream's included); None: the channel's (what is
        left of the calling RPC's deadline, else its default)."""
        self.target = target
        self.timeout = timeout
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

    # -- calls ----------------------------------------------------------------------------------
    @overload
    async def _call(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Request, Response],
        request: Request,
        *,
        retry: Retry | None = None,
        what: str = "",
    ) -> Response: ...

    @overload
    async def _call(
        self,
        method: grpc.aio.StreamUnaryMultiCallable[Request, Response],
        request: AsyncIterator[Request],
        *,
        retry: Retry | None = None,
        what: str = "",
    ) -> Response: ...

    async def _call(
        self,
        method: (
            grpc.aio.UnaryUnaryMultiCallable[Request, Response]
            | grpc.aio.StreamUnaryMultiCallable[Request, Response]
        ),
        request: Request | AsyncIterator[Request],
        *,
        retry: Retry | None = None,
        what: str = "",
    ) -> Response:
        """One call of `method` with the client's deadline, tried again as `retry` says (None:
        once), its failure translated by `_error`. `what` names it in logs and errors."""

        async def attempt() -> Response:
            return await method(request, timeout=self.timeout)  # type: ignore[arg-type]

        return await self._run(attempt, retry=retry, what=what)

    async def _run(
        self, operation: Callable[[], Awaitable[T]], *, retry: Retry | None = None, what: str = ""
    ) -> T:
        """`operation` (calls that `_call` cannot make: a stream read, a resumable upload) under
        `retry`, its failure translated by `_error`."""
        try:
            if retry is None:
                return await operation()
            return await retry.call(operation, what=what or "call")
        except grpc.aio.AioRpcError as exc:
            error = self._error(exc, what)
            if error is None:
                raise
            raise error from exc

    def _error(self, exc: grpc.aio.AioRpcError, what: str) -> Exception | None:
        """What a failed call raises (None: the AioRpcError itself)."""
        return domain_error(exc)
