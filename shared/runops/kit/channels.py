"""Outgoing channels between services: keepalive, message sizes, the internal token, the
caller's request id, and the caller's deadline propagated to every downstream call.

Calls are spread with `round_robin` over every address the target resolves to. A plain
`host:port` target is `dns:///host:port` to grpc: its DNS resolver returns every A/AAAA record,
so a Kubernetes headless service (one record per pod) gets one connection per pod and calls
rotate over them (grpc's default, pick_first, would send everything to the first address).
`ipv4:10.0.0.1:50051,10.0.0.2:50051` lists addresses explicitly. Pods that appear later are
found when grpc resolves again (a connection failed or went idle), not on a timer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from runops.kit.context import current_request_id, remaining_deadline

# Calls made outside any RPC (background jobs) still get a bound.
DEFAULT_TIMEOUT_SECONDS = 30.0


def _details(details: grpc.aio.ClientCallDetails, token: str | None) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    present = {key for key, _ in metadata}
    if token and "authorization" not in present:
        metadata.add("authorization", f"Bearer {token}")
    request_id = current_request_id.get()
    if request_id and "x-request-id" not in present:
        metadata.add("x-request-id", request_id)
    timeout = details.timeout
    remaining = remaining_deadline()
    if remaining is not None:
        timeout = remaining if timeout is None else min(timeout, remaining)
    elif timeout is None:
        timeout = DEFAULT_TIMEOUT_SECONDS
    return grpc.aio.ClientCallDetails(
        details.method, timeout, metadata, details.credentials, details.wait_for_ready
    )


class _Propagate:
    def __init__(self, token: str | None) -> None:
        self._token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return _details(details, self._token)


# grpc.aio files an interceptor under the first of the four kinds it is an instance of, so
# each kind needs its own class.
class _UnaryUnary(_Propagate, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStream(_Propagate, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnary(_Propagate, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, requests: Any
    ) -> Any:
        return await continuation(self._details(details), requests)


class _StreamStream(_Propagate, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, requests: Any
    ) -> Any:
        return await continuation(self._details(details), requests)


def propagating_interceptors(token: str | None) -> list[grpc.aio.ClientInterceptor]:
    """One interceptor per call kind: token, request id and deadline on every outgoing call."""
    return [cls(token) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


# The largest message a kit channel sends or receives unless told otherwise: the same as the
# servers' default RUNOPS_MAX_MESSAGE_BYTES.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# The channel's default service config (a resolver-supplied one would win; DNS gives none).
SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    return [
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.enable_retries", 1),
        # Subchannels of this channel only: grpc's global pool would hand a new channel a
        # subchannel still backing off from a server that went away on the same address (a
        # restarted pod, a reused port), and round_robin fails calls at once on it.
        ("grpc.use_local_subchannel_pool", 1),
    ]


def create_channel(
    target: str,
    *,
    token: str | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    extra_interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """An insecure (in-cluster) channel whose calls carry `token` as a bearer credential and
    never outlive the RPC that made them."""
    return grpc.aio.insecure_channel(
        target,
        options=channel_options(max_message_bytes),
        interceptors=[*propagating_interceptors(token), *extra_interceptors],
    )
