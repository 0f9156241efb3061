"""Large payloads go to the S3-compatible object store (aiobotocore) and are replaced by their
reference (spec §5).

Layout: `packets/<project>/<env>/batch_<id>/item_<index>/payload`. The key is a function of the
item's position only, so uploading the same item again (a retried attempt, a resent index, two
streams of one batch) writes the same object: harmless, nothing to clean up. The object's
Content-Type is the item's original payload_type; the run keeps the key as its payload with
payload_type `application/store`.

Failures: every attempt is bounded by a timeout (a store that accepts and never answers must not
hold the stream until the client's deadline); connection failures, timeouts, 5xx and throttling
are retried with `runops.kit.backoff`; when the attempts are spent the upload fails UNAVAILABLE
with RetryInfo (`OBJECT_STORE_UNAVAILABLE`): the batch stays unsealed and the client's retry
resends the missing indexes. A refusal that retrying cannot fix (no such bucket, access denied)
fails at once, UNAVAILABLE `OBJECT_STORE_REJECTED` (an operator must act; the client may retry
later).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)

from runops.kit.backoff import ExponentialBackoff, Retry
from runops.kit.errors import Unavailable
from services.ingest.settings import IngestSettings

log = structlog.get_logger("runops.ingest.offload")
T = TypeVar("T")

# payload_type of a run whose payload is a reference to an object in the store.
STORE_PAYLOAD_TYPE = "application/store"
# Suggested client back-off when the store is down.
RETRY_AFTER_SECONDS = 1.0
# HTTP statuses worth another attempt besides 5xx: request timeout, throttling.
_RETRYABLE_STATUSES = frozenset({408, 429})
# Errors of ours (configuration), not of the store: retrying cannot help.
_NOT_TRANSIENT = (NoCredentialsError, PartialCredentialsError, ParamValidationError)
_DEFAULT_BACKOFF = ExponentialBackoff(base=0.1, cap=2.0, jitter=0.5)


def packet_key(project_id: str, environment_id: str, batch_id: str, index: int) -> str:
    """`packets/<project>/<env>/batch_<id>/item_<index>/payload`. `batch_id` is the batch's
    internal id or its friendly id (`batch_<body>`); either gives the same key."""
    body = batch_id.removeprefix("batch_")
    return f"packets/{project_id}/{environment_id}/batch_{body}/item_{index}/payload"


@dataclass(frozen=True)
class OffloadedPayload:
    """What replaces an item's payload once it is in the store."""

    key: str
    # The reference the run keeps as its payload: the key, UTF-8.
    payload: bytes
    payload_type: str = STORE_PAYLOAD_TYPE


class _Transient(Exception):
    """An attempt failed in a way another attempt may not."""


class _Rejected(Exception):
    """The store refused in a way no retry fixes."""


@dataclass(frozen=True)
class StoreConfig:
    bucket: str
    endpoint_url: str | None = None
    region: str = "us-east-1"
    addressing_style: str = "path"
    attempt_timeout: float = 10.0
    connect_timeout: float = 2.0
    attempts: int = 4
    backoff: ExponentialBackoff = _DEFAULT_BACKOFF
    max_connections: int = 50
    # Explicit credentials (tests); None: the AWS default chain (environment, profile, role).
    access_key_id: str | None = None
    secret_access_key: str | None = None

    @classmethod
    def from_settings(cls, settings: IngestSettings) -> StoreConfig:
        return cls(
            bucket=settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            addressing_style=settings.s3_addressing_style,
            attempt_timeout=settings.s3_attempt_timeout_seconds,
            connect_timeout=settings.s3_connect_timeout_seconds,
            attempts=settings.s3_attempts,
            backoff=ExponentialBackoff(
                base=settings.s3_retry_base_seconds, cap=settings.s3_retry_cap_seconds, jitter=0.5
            ),
            max_connections=settings.s3_max_connections,
        )


class ObjectStore:
    """One aiobotocore S3 client for the process: `open()` once at start-up, `close()` at
    shutdown (or `async with`). Its connection pool is shared by every stream."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self._exit: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._retry = Retry(config.backoff, attempts=config.attempts, retry_on=(_Transient,))

    async def open(self) -> ObjectStore:
        if self._client is not None:
            return self
        c = self.config
        boto_config = AioConfig(
            connect_timeout=c.connect_timeout,
            read_timeout=c.attempt_timeout,
            max_pool_connections=c.max_connections,
            # Our Retry owns retries (bounded attempts, the kit's backoff): botocore's would
            # multiply them.
            retries={"total_max_attempts": 1, "mode": "standard"},
            s3={"addressing_style": c.addressing_style},
        )
        exit_stack = contextlib.AsyncExitStack()
        self._client = await exit_stack.enter_async_context(
            get_session().create_client(
                "s3",
                endpoint_url=c.endpoint_url,
                region_name=c.region,
                aws_access_key_id=c.access_key_id,
                aws_secret_access_key=c.secret_access_key,
                config=boto_config,
            )
        )
        self._exit = exit_stack
        return self

    async def close(self) -> None:
        exit_stack, self._exit, self._client = self._exit, None, None
        if exit_stack is not None:
            await exit_stack.aclose()

    async def __aenter__(self) -> ObjectStore:
        return await self.open()

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    @property
    def _s3(self) -> Any:
        if self._client is None:
            raise RuntimeError("the object store is not open (ObjectStore.open at start-up)")
        return self._client

    async def put(self, key: str, body: bytes, content_type: str) -> None:
        """Upload `body` at `key` (overwriting: the same key always holds the same item),
        retrying transient failures; UNAVAILABLE with RetryInfo when it cannot."""

        async def upload() -> None:
            await self._s3.put_object(
                Bucket=self.config.bucket,
                Key=key,
                Body=body,
                ContentType=content_type or "application/octet-stream",
            )

        await self._call(upload, f"upload {key}")

    async def get(self, key: str) -> bytes:
        """The object at `key` (retried like `put`)."""

        async def download() -> bytes:
            response = await self._s3.get_object(Bucket=self.config.bucket, Key=key)
            async with response["Body"] as stream:
                data: bytes = await stream.read()
            return data

        return await self._call(download, f"download {key}")

    async def check(self) -> None:
        """Health: the bucket answers within one attempt's timeout (raises otherwise)."""
        await self._attempt(lambda: self._s3.head_bucket(Bucket=self.config.bucket))

    async def _attempt(self, operation: Callable[[], Awaitable[T]]) -> T:
        """One try, bounded by the attempt timeout, its failure classified."""
        try:
            async with asyncio.timeout(self.config.attempt_timeout):
                return await operation()
        except ClientError as exc:
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            code = exc.response.get("Error", {}).get("Code", "?")
            if status >= 500 or status in _RETRYABLE_STATUSES or code == "SlowDown":
                raise _Transient(f"{code} (HTTP {status})") from exc
            raise _Rejected(f"{code} (HTTP {status})") from exc
        except _NOT_TRANSIENT as exc:
            raise _Rejected(repr(exc)) from exc
        except TimeoutError as exc:
            raise _Transient(f"no answer within {self.config.attempt_timeout}s") from exc
        except (BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise _Transient(repr(exc)) from exc

    async def _call(self, operation: Callable[[], Awaitable[T]], what: str) -> T:
        try:
            return await self._retry.call(lambda: self._attempt(operation), what=what)
        except _Transient as exc:
            log.warning("object store unavailable", what=what, error=str(exc))
            raise Unavailable(
                f"the object store is unavailable ({exc}); retry shortly",
                reason="OBJECT_STORE_UNAVAILABLE",
                retry_after=RETRY_AFTER_SECONDS,
            ) from exc
        except _Rejected as exc:
            log.error("object store refused", what=what, error=str(exc))
            raise Unavailable(
                f"the object store refused the request ({exc})",
                reason="OBJECT_STORE_REJECTED",
                retry_after=RETRY_AFTER_SECONDS,
            ) from exc


class Offloader:
    """Decides which payloads go to the store and uploads them (spec §5)."""

    def __init__(self, store: ObjectStore, threshold_bytes: int) -> None:
        self.store = store
        self.threshold_bytes = threshold_bytes

    def should_offload(self, payload: bytes) -> bool:
        """At or above the threshold (an item above the maximum is pre-failed before this)."""
        return len(payload) >= self.threshold_bytes

    async def offload(
        self,
        *,
        project_id: str,
        environment_id: str,
        batch_id: str,
        index: int,
        payload: bytes,
        payload_type: str,
    ) -> OffloadedPayload:
        key = packet_key(project_id, environment_id, batch_id, index)
        await self.store.put(key, payload, payload_type)
        return OffloadedPayload(key=key, payload=key.encode())
