"""Batch-ingest settings (RUNOPS_* environment variables), validated at start-up: a bad value
exits 2 naming the variable (`runops.kit.settings.load_settings`)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from runops.kit.limits import MAX_RUN_COUNT
from runops.kit.redis import RedisSettings, redis_field
from runops.kit.settings import ServerSettings

MIB = 1024 * 1024
KIB = 1024
# S3 bucket naming rules (3-63 lowercase letters, digits, dots, hyphens; starts and ends with a
# letter or digit); moto and MinIO enforce the same.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# A gRPC target: host:port, dns:///host:port, ipv4:a:p,b:p, unix:path ... (no blanks).
_TARGET = re.compile(r"^\S+$")

GrpcTarget = Annotated[str, Field(min_length=1, max_length=1024, pattern=_TARGET.pattern)]


class IngestSettings(ServerSettings):
    """What the ingest service reads besides the common server settings."""

    model_config = SettingsConfigDict(**ServerSettings.model_config, use_attribute_docstrings=True)

    # -- Phase 1 -------------------------------------------------------------------------------
    max_run_count: int = Field(default=100_000, ge=1, le=MAX_RUN_COUNT)
    """RUNOPS_MAX_RUN_COUNT: the largest run_count CreateBatch accepts (memory does not grow
    with it: items are streamed, never held together), at most the run store's limit."""

    # -- Phase 2: bounded concurrency and chunks --------------------------------------------
    ingest_concurrency: int = Field(default=10, ge=1, le=1000)
    """RUNOPS_INGEST_CONCURRENCY: units of work (chunks) in flight per stream; 1 processes
    strictly one at a time. Peak memory per stream is about this x RUNOPS_MAX_CHUNK_BYTES."""
    max_chunk_items: int = Field(default=1000, ge=1, le=100_000)
    """RUNOPS_MAX_CHUNK_ITEMS: items per unit of work (one AcceptBatchItems call); a received
    chunk with more is split."""
    max_chunk_bytes: int = Field(default=8 * MIB, ge=64 * KIB, le=1024 * MIB)
    """RUNOPS_MAX_CHUNK_BYTES: the largest chunk message a client should send (the client
    library's chunker uses it); must fit in RUNOPS_MAX_MESSAGE_BYTES."""

    # -- Items and offload ------------------------------------------------------------------
    max_item_payload_bytes: int = Field(default=3 * MIB, ge=1, le=1024 * MIB)
    """RUNOPS_MAX_ITEM_PAYLOAD_BYTES: a larger payload becomes a pre-failed run with
    PAYLOAD_TOO_LARGE at its index (not a stream error); below RUNOPS_MAX_MESSAGE_BYTES, else
    such an item could never arrive to be pre-failed (gRPC refuses its message)."""
    offload_threshold_bytes: int = Field(default=512 * KIB, ge=1, le=1024 * MIB)
    """RUNOPS_OFFLOAD_THRESHOLD_BYTES: a payload at least this large is uploaded to the object
    store and replaced by its reference (payload_type application/store)."""

    # -- Object store (S3-compatible, aiobotocore; credentials from the AWS default chain:
    #    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, or the pod's role) ------------
    s3_endpoint_url: str | None = Field(default=None, pattern=r"^https?://\S+$")
    """RUNOPS_S3_ENDPOINT_URL: http(s) URL of the endpoint (MinIO, moto, a VPC endpoint);
    unset: AWS's regional endpoint."""
    s3_bucket: str = Field(pattern=f"^{_BUCKET.pattern}$")
    """RUNOPS_S3_BUCKET: where offloaded payloads go (`packets/<project>/<env>/...`)."""
    s3_region: str = Field(default="us-east-1", min_length=1, max_length=64)
    """RUNOPS_S3_REGION: the bucket's region (request signing)."""
    s3_addressing_style: Literal["path", "virtual", "auto"] = "path"
    """RUNOPS_S3_ADDRESSING_STYLE: `path` works with MinIO, moto and AWS; `virtual` for AWS
    buckets that require it."""
    s3_attempt_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    """RUNOPS_S3_ATTEMPT_TIMEOUT_SECONDS: one upload attempt (connect included) gives up after
    this; a hanging store must not hold a stream until the client's deadline."""
    s3_connect_timeout_seconds: float = Field(default=2.0, gt=0, le=60)
    """RUNOPS_S3_CONNECT_TIMEOUT_SECONDS: opening a connection to the store."""
    s3_attempts: int = Field(default=4, ge=1, le=20)
    """RUNOPS_S3_ATTEMPTS: tries per upload (connection failures, timeouts, 5xx, throttling)
    before the stream fails UNAVAILABLE with RetryInfo."""
    s3_retry_base_seconds: float = Field(default=0.1, gt=0, le=10)
    """RUNOPS_S3_RETRY_BASE_SECONDS: first backoff delay between upload attempts (doubling,
    jittered)."""
    s3_retry_cap_seconds: float = Field(default=2.0, gt=0, le=60)
    """RUNOPS_S3_RETRY_CAP_SECONDS: longest backoff delay between upload attempts."""
    s3_max_connections: int = Field(default=50, ge=1, le=10_000)
    """RUNOPS_S3_MAX_CONNECTIONS: the client's HTTP connection pool (shared by every stream of
    the process); uploads beyond it wait for a connection."""

    # -- Per-organization token bucket (Phase 1, charged run_count) -----------------------
    rate_limit_enabled: bool = True
    """RUNOPS_RATE_LIMIT_ENABLED: false skips the token bucket (local experiments only)."""
    rate_limit_refill_per_second: float = Field(default=10_000.0, gt=0, le=1e9)
    """RUNOPS_RATE_LIMIT_REFILL_PER_SECOND: tokens (runs) an organization earns per second."""
    rate_limit_capacity: int = Field(default=200_000, ge=1, le=1_000_000_000)
    """RUNOPS_RATE_LIMIT_CAPACITY: the most tokens an organization can hold (its burst); at
    least RUNOPS_MAX_RUN_COUNT, else a legal batch could never be created."""

    # -- Redis (the token bucket; shared by every ingest process) -------------------------
    redis: RedisSettings = redis_field()
    """RUNOPS_REDIS_URL or RUNOPS_REDIS_CLUSTER_NODES (the cluster wins when both are set),
    timeouts and retries: see runops.kit.redis.RedisSettings. Beyond its timeout CreateBatch
    fails UNAVAILABLE with RetryInfo."""

    # -- The other services --------------------------------------------------------------
    controlplane_target: GrpcTarget
    """RUNOPS_CONTROLPLANE_TARGET: the control plane (API keys, environments), host:port."""
    runstore_target: GrpcTarget
    """RUNOPS_RUNSTORE_TARGET: the run store (batches, items, runs), host:port."""
    mollifier_target: GrpcTarget
    """RUNOPS_MOLLIFIER_TARGET: the mollifier, host:port: items with an idempotency key are
    resolved through its batched claims (`services.ingest.keyed.MollifierKeyedItems`)."""

    # -- WatchBatch ------------------------------------------------------------------------
    watch_interval_seconds: float = Field(default=1.0, ge=0.05, le=60)
    """RUNOPS_WATCH_INTERVAL_SECONDS: how often WatchBatch reads the batch while it is not
    final (a message is sent only when it changed)."""

    # Cross-field rules are field validators (fields validate in declaration order, so the
    # earlier field is in info.data), so load_settings names the variable that is wrong.
    @field_validator("max_chunk_bytes")
    @classmethod
    def _chunk_fits_a_message(cls, value: int, info: ValidationInfo) -> int:
        limit = info.data.get("max_message_bytes")
        if limit is not None and value > limit:
            raise ValueError(f"must not exceed RUNOPS_MAX_MESSAGE_BYTES ({limit})")
        return value

    @field_validator("max_item_payload_bytes")
    @classmethod
    def _item_maximum_below_a_message(cls, value: int, info: ValidationInfo) -> int:
        limit = info.data.get("max_message_bytes")
        if limit is not None and value >= limit:
            raise ValueError(
                f"must be less than RUNOPS_MAX_MESSAGE_BYTES ({limit}): a payload above the item "
                "maximum must still fit in one message to be pre-failed"
            )
        return value

    @field_validator("offload_threshold_bytes")
    @classmethod
    def _threshold_within_item_maximum(cls, value: int, info: ValidationInfo) -> int:
        limit = info.data.get("max_item_payload_bytes")
        if limit is not None and value > limit:
            raise ValueError(f"must not exceed RUNOPS_MAX_ITEM_PAYLOAD_BYTES ({limit})")
        return value

    @field_validator("s3_retry_cap_seconds")
    @classmethod
    def _cap_above_base(cls, value: float, info: ValidationInfo) -> float:
        base = info.data.get("s3_retry_base_seconds")
        if base is not None and value < base:
            raise ValueError(f"must be at least RUNOPS_S3_RETRY_BASE_SECONDS ({base})")
        return value

    @field_validator("rate_limit_capacity")
    @classmethod
    def _capacity_holds_a_batch(cls, value: int, info: ValidationInfo) -> int:
        largest = info.data.get("max_run_count")
        if largest is not None and value < largest:
            raise ValueError(
                f"must be at least RUNOPS_MAX_RUN_COUNT ({largest}), else a legal batch could "
                "never be created"
            )
        return value
