"""Mollifier settings (RUNOPS_* environment variables); spec §4 gives the defaults."""

from __future__ import annotations

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from runops.kit.limits import MAX_RUNS_PER_CALL
from runops.kit.redis import RedisSettings, redis_field
from runops.kit.settings import ServerSettings


class MollifierSettings(ServerSettings):
    model_config = SettingsConfigDict(**ServerSettings.model_config, use_attribute_docstrings=True)

    redis: RedisSettings = redis_field()
    """RUNOPS_REDIS_URL (standalone) or RUNOPS_REDIS_CLUSTER_NODES (a Cluster, wins when both
    are set), timeouts and retries: see runops.kit.redis.RedisSettings."""
    key_prefix: str = Field(default="mollifier", min_length=1, max_length=64, pattern=r"^[\w.-]+$")
    """First part of every key's hash tag: `{<prefix>:<environment id>}:…`."""

    runstore_target: str = Field(min_length=1, max_length=1024, pattern=r"^\S+$")
    """RUNOPS_RUNSTORE_TARGET: the run store (host:port, dns:///…); every run is written there."""
    controlplane_target: str = Field(min_length=1, max_length=1024, pattern=r"^\S+$")
    """RUNOPS_CONTROLPLANE_TARGET: environments and organization flags (cached locally, kept
    fresh by its invalidation feed: no round trip per trigger)."""
    controlplane_cache_ttl_seconds: float = Field(default=30.0, gt=0, le=3600)
    """How long the local control-plane cache keeps an entry (invalidations evict sooner)."""
    runstore_split: bool = True
    """RUNOPS_RUNSTORE_SPLIT, the run store's own: run ids minted here (a buffered run's id is
    known before it is written) are NEW-shaped with the split on, LEGACY-shaped off."""

    mollifier_enabled: bool = True
    """The global switch: off, every trigger goes straight to the run store."""
    shadow_mode: bool = False
    """Decide as usual but only log and count what would have been buffered."""

    gate_threshold: int = Field(default=100, gt=0, le=1_000_000)
    """Triggers one environment may pass straight through in any window of `gate_window`."""
    gate_window_seconds: float = Field(default=0.2, gt=0, le=3600)
    """Length of the sliding window the threshold applies to."""
    gate_hold_seconds: float = Field(default=0.5, gt=0, le=3600)
    """Once tripped, the environment stays tripped (buffers) this long."""

    create_batch_max_runs: int = Field(default=100, ge=1, le=MAX_RUNS_PER_CALL)
    """Triggers passing the gate are written together (group commit): one `CreateRuns` once
    this many are gathered… (1: each alone, through `CreateRun`)."""
    create_batch_max_wait_seconds: float = Field(default=0.002, ge=0, le=1)
    """… or this long after the first of them arrived (0: on the event loop's next turn). The
    most a passed trigger waits for its batch to fill; each caller still gets its own run."""

    claim_ttl_min_seconds: float = Field(default=5.0, gt=0, le=3600)
    """An idempotency claim lives at least this long, whatever the key's own expiry."""
    claim_ttl_max_seconds: float = Field(default=30.0, gt=0, le=3600)
    """…and at most this long."""
    claim_wait_seconds: float = Field(default=5.0, gt=0, le=5)
    """A same-key waiter polls the winner's claim this long at most (spec: up to 5 s)."""
    claim_poll_interval_seconds: float = Field(default=0.05, gt=0, le=1)
    """First poll interval of a waiter (doubles up to 8 times this)."""
    claim_batch_size: int = Field(default=1000, ge=1, le=10_000)
    """Keys per script call of a batched claim (an environment's keys share one slot)."""

    drainer_enabled: bool = True
    """Run a drainer inside the service process (off: run `python -m services.mollifier.drainer`)."""
    drain_batch_size: int = Field(default=1000, ge=1, le=MAX_RUNS_PER_CALL)
    """Entries written per drainer tick (one CreateRuns call), across environments. 1000, the
    unnest floor's statement size: a busy environment drains ~1.4x faster than at 500 (per-tick
    round trips and per-call costs halve); the cost is a larger CreateRuns message."""
    drain_env_batch_size: int = Field(default=50, ge=1, le=10_000)
    """Entries one environment contributes per turn of the round robin within a tick."""
    drain_pipeline_depth: int = Field(default=3, ge=1, le=16)
    """Drainer ticks in flight at once: the next batch is popped while up to this many earlier
    ones are being written (1: strictly one tick after another). Each holds up to
    RUNOPS_DRAIN_BATCH_SIZE entries DRAINING, so a drainer holds at most depth x batch size."""
    drain_idle_seconds: float = Field(default=0.05, gt=0, le=10)
    """Sleep of a drainer that found nothing to drain."""
    drain_backoff_base_seconds: float = Field(default=0.1, gt=0, le=60)
    """Delay after a failed write, doubling per failure in a row …"""
    drain_backoff_cap_seconds: float = Field(default=5.0, gt=0, le=600)
    """… up to this."""
    drain_max_attempts: int = Field(default=3, ge=1, le=100)
    """Write attempts of an entry before it is written as a SYSTEM_FAILURE run."""
    drain_visibility_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    """An entry DRAINING longer than this (its drainer died) is requeued to the front."""
    drain_recovery_interval_seconds: float = Field(default=5.0, gt=0, le=3600)
    """How often a drainer looks for entries stuck in DRAINING."""
    ack_grace_seconds: float = Field(default=30.0, gt=0, le=3600)
    """A drained entry stays readable this long (run store replicas catch up meanwhile)."""

    stale_threshold_seconds: float = Field(default=60.0, gt=0, le=86_400)
    """The sweep reports entries buffered longer than this."""
    sweep_interval_seconds: float = Field(default=10.0, gt=0, le=3600)
    """How often the sweeper looks (one sweeper at a time, under a lease)."""
    sweep_lease_seconds: float = Field(default=30.0, gt=0, le=3600)
    """The sweeper's lease; another process takes over once it lapses."""

    # Field validators (not a model validator) so the error names the variable.
    @field_validator("claim_ttl_max_seconds")
    @classmethod
    def _claim_range(cls, value: float, info: ValidationInfo) -> float:
        if value < info.data.get("claim_ttl_min_seconds", 0):
            raise ValueError("must not be less than RUNOPS_CLAIM_TTL_MIN_SECONDS")
        return value

    @field_validator("drain_backoff_cap_seconds")
    @classmethod
    def _backoff_range(cls, value: float, info: ValidationInfo) -> float:
        if value < info.data.get("drain_backoff_base_seconds", 0):
            raise ValueError("must not be less than RUNOPS_DRAIN_BACKOFF_BASE_SECONDS")
        return value
