"""The object store through aiobotocore against the real moto server, a closed port, a store
that accepts and never answers, a store that answers 503/403, and the delay proxy."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Self

import grpc
import pytest

from runops.kit.backoff import ExponentialBackoff
from runops.kit.errors import Unavailable
from runops.localstack import LocalStack
from runops.localstack.delay_proxy import DelayProxy
from runops.localstack.ports import HOST, free_port
from services.ingest.offload import (
    STORE_PAYLOAD_TYPE,
    ObjectStore,
    OffloadedPayload,
    Offloader,
    StoreConfig,
    packet_key,
)

FAST_RETRIES = ExponentialBackoff(base=0.01, cap=0.05)


@pytest.fixture(scope="session")
def store_config(stack: LocalStack) -> StoreConfig:
    env = stack.service_env()
    return StoreConfig(
        bucket=stack.s3_bucket,
        endpoint_url=stack.s3_endpoint_url,
        region=stack.s3_region,
        access_key_id=env["AWS_ACCESS_KEY_ID"],
        secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        backoff=FAST_RETRIES,
    )


@pytest.fixture
async def store(store_config: StoreConfig) -> AsyncIterator[ObjectStore]:
    async with ObjectStore(store_config) as opened:
        yield opened


def unique_batch() -> str:
    return "batch_" + secrets.token_hex(8)


def test_packet_key_layout() -> None:
    assert (
        packet_key("proj_1", "env_2", "abc", 7) == "packets/proj_1/env_2/batch_abc/item_7/payload"
    )
    # The friendly id and the internal id name the same object.
    assert packet_key("p", "e", "batch_abc", 0) == packet_key("p", "e", "abc", 0)


async def test_offload_uploads_and_returns_the_reference(
    store: ObjectStore, s3_client: Any
) -> None:
    offloader = Offloader(store, threshold_bytes=1024)
    payload = secrets.token_bytes(256 * 1024)
    batch = unique_batch()
    result = await offloader.offload(
        project_id="proj_1",
        environment_id="env_1",
        batch_id=batch,
        index=42,
        payload=payload,
        payload_type="application/json",
    )
    assert result.key == f"packets/proj_1/env_1/{batch}/item_42/payload"
    assert result.payload == result.key.encode()
    assert result.payload_type == STORE_PAYLOAD_TYPE == "application/store"
    # Read back by an independent client: same bytes, original type kept on the object.
    obj = await s3_client.get_object(Bucket=store.config.bucket, Key=result.key)
    async with obj["Body"] as body:
        assert await body.read() == payload
    assert obj["ContentType"] == "application/json"
    assert await store.get(result.key) == payload


async def test_reupload_of_the_same_item_is_harmless(store: ObjectStore, s3_client: Any) -> None:
    offloader = Offloader(store, threshold_bytes=1)
    batch = unique_batch()
    payload = b"x" * 2048

    def offload() -> Awaitable[OffloadedPayload]:
        return offloader.offload(
            project_id="p",
            environment_id="e",
            batch_id=batch,
            index=3,
            payload=payload,
            payload_type="text/plain",
        )

    first = await offload()
    # A retried attempt, a resent index, a second stream: concurrently, too.
    again = await asyncio.gather(*(offload() for _ in range(5)))
    assert {r.key for r in again} == {first.key}
    listed = await s3_client.list_objects_v2(
        Bucket=store.config.bucket, Prefix=f"packets/p/e/{batch}/"
    )
    assert [o["Key"] for o in listed["Contents"]] == [first.key]
    assert await store.get(first.key) == payload


def test_threshold_is_inclusive() -> None:
    offloader = Offloader(ObjectStore(StoreConfig(bucket="unused")), threshold_bytes=512 * 1024)
    assert not offloader.should_offload(b"x" * (512 * 1024 - 1))
    assert offloader.should_offload(b"x" * (512 * 1024))


async def test_not_opened_is_a_clear_error_and_close_is_idempotent(
    store_config: StoreConfig,
) -> None:
    store = ObjectStore(store_config)
    with pytest.raises(RuntimeError, match="not open"):
        await store.put("k", b"v", "text/plain")
    await store.open()
    await store.check()
    await store.close()
    await store.close()
    with pytest.raises(RuntimeError, match="not open"):
        await store.check()


async def expect_unavailable(call: Callable[[], Awaitable[object]], reason: str) -> Unavailable:
    with pytest.raises(Unavailable) as info:
        await call()
    err = info.value
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert err.reason == reason
    assert err.retry_after is not None
    assert err.retry_after > 0
    return err


async def test_store_down_is_retryable_unavailable(store_config: StoreConfig) -> None:
    closed = dataclasses.replace(
        store_config, endpoint_url=f"http://{HOST}:{free_port()}", attempts=3
    )
    async with ObjectStore(closed) as store:
        err = await expect_unavailable(
            lambda: Offloader(store, 1).offload(
                project_id="p",
                environment_id="e",
                batch_id=unique_batch(),
                index=0,
                payload=b"x",
                payload_type="text/plain",
            ),
            "OBJECT_STORE_UNAVAILABLE",
        )
        assert "unavailable" in err.message
        with pytest.raises(Exception):  # noqa: B017, PT011 - health check raises whatever failed
            await store.check()


class LocalServer:
    """A TCP server on a free local port for one test; `answer` serves each connection."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None

    async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self.answer, HOST, 0)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def __aexit__(self, *_exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


class SilentServer(LocalServer):
    """Accepts TCP connections and never answers (a hung store); counts connections."""

    def __init__(self) -> None:
        super().__init__()
        self.accepted = 0
        self._held: list[asyncio.StreamWriter] = []

    async def answer(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._held.append(writer)

    async def __aexit__(self, *exc: object) -> None:
        for writer in self._held:
            writer.close()
        await super().__aexit__(*exc)


async def test_hanging_store_times_out_promptly(store_config: StoreConfig) -> None:
    async with SilentServer() as silent:
        hung = dataclasses.replace(
            store_config,
            endpoint_url=f"http://{HOST}:{silent.port}",
            attempt_timeout=0.3,
            attempts=2,
        )
        async with ObjectStore(hung) as store:
            began = time.monotonic()
            err = await expect_unavailable(
                lambda: store.put("packets/p/e/batch_x/item_0/payload", b"x", "text/plain"),
                "OBJECT_STORE_UNAVAILABLE",
            )
            elapsed = time.monotonic() - began
        assert "no answer within 0.3s" in err.message
        assert silent.accepted >= 1
        # Two attempts of 0.3 s plus a short backoff; a generous liveness bound.
        assert elapsed < 10


class StatusServer(LocalServer):
    """Answers every HTTP request with one status (a failing store); counts requests."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__()
        self.status, self.code = status, code
        self.requests = 0

    async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        self.requests += 1
        body = f"<Error><Code>{self.code}</Code><Message>test</Message></Error>".encode()
        writer.write(
            f"HTTP/1.1 {self.status} X\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()


async def test_5xx_is_retried_then_unavailable(store_config: StoreConfig) -> None:
    async with StatusServer(503, "SlowDown") as failing:
        config = dataclasses.replace(
            store_config, endpoint_url=f"http://{HOST}:{failing.port}", attempts=3
        )
        async with ObjectStore(config) as store:
            err = await expect_unavailable(
                lambda: store.put("packets/p/e/batch_x/item_0/payload", b"x", "text/plain"),
                "OBJECT_STORE_UNAVAILABLE",
            )
    assert "SlowDown" in err.message
    assert failing.requests == 3  # our attempts, botocore's own retries off


async def test_access_denied_is_not_retried(store_config: StoreConfig) -> None:
    async with StatusServer(403, "AccessDenied") as refusing:
        config = dataclasses.replace(
            store_config, endpoint_url=f"http://{HOST}:{refusing.port}", attempts=3
        )
        async with ObjectStore(config) as store:
            err = await expect_unavailable(
                lambda: store.put("packets/p/e/batch_x/item_0/payload", b"x", "text/plain"),
                "OBJECT_STORE_REJECTED",
            )
    assert "AccessDenied" in err.message
    assert refusing.requests == 1


async def test_missing_bucket_is_rejected(store_config: StoreConfig) -> None:
    config = dataclasses.replace(store_config, bucket="no-such-bucket-" + secrets.token_hex(4))
    async with ObjectStore(config) as store:
        err = await expect_unavailable(
            lambda: store.put("packets/p/e/batch_x/item_0/payload", b"x", "text/plain"),
            "OBJECT_STORE_REJECTED",
        )
    assert "NoSuchBucket" in err.message


async def test_uploads_through_the_delay_proxy(
    stack: LocalStack, store_config: StoreConfig
) -> None:
    upstream = stack.s3_endpoint_url.rsplit(":", 1)
    async with DelayProxy(
        upstream[0].removeprefix("http://"), int(upstream[1]), delay=0.1
    ) as proxy:
        config = dataclasses.replace(store_config, endpoint_url=f"http://{HOST}:{proxy.port}")
        async with ObjectStore(config) as store:
            key = packet_key("p", "e", unique_batch(), 0)
            payload = secrets.token_bytes(300 * 1024)
            began = time.monotonic()
            await store.put(key, payload, "application/octet-stream")
            # A request and its answer each cross the proxy once: at least two delays.
            assert time.monotonic() - began >= 0.2
            assert await store.get(key) == payload
        assert proxy.connections_accepted >= 1
