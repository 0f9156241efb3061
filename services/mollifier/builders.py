"""What the mollifier server (`app.py`) and the drainer process (`drainer/app.py`) both build:
their downstream run store, the buffer, the drainer and the stale sweeper."""

from __future__ import annotations

from runops.kit.backoff import ExponentialBackoff
from runops.kit.downstream import Downstream
from runops.kit.redis import RedisClient
from runops.kit.server import ServiceApp
from runops.runstore.client import RunStoreClient
from services.mollifier.buffer import MollifierBuffer
from services.mollifier.drainer.drainer import Drainer
from services.mollifier.drainer.writer import RunStoreWriter
from services.mollifier.settings import MollifierSettings
from services.mollifier.sweeper import StaleSweeper


def run_store_client(app: ServiceApp, settings: MollifierSettings) -> RunStoreClient:
    """A health dependency of both processes: every trigger and every drained run ends there
    (nothing is buffered because the run store is down; docs/mollifier.md, Health)."""
    return Downstream.connect(
        "runstore",
        settings.runstore_target,
        RunStoreClient,
        token=settings.internal_token,
        health=True,
    ).attach(app)


def buffer_of(redis: RedisClient, settings: MollifierSettings) -> MollifierBuffer:
    return MollifierBuffer(
        redis, prefix=settings.key_prefix, ack_grace_seconds=settings.ack_grace_seconds
    )


def drainer_of(
    buffer: MollifierBuffer, run_store: RunStoreClient, settings: MollifierSettings
) -> Drainer:
    return Drainer(
        buffer,
        RunStoreWriter(run_store),
        batch_size=settings.drain_batch_size,
        env_batch_size=settings.drain_env_batch_size,
        max_attempts=settings.drain_max_attempts,
        backoff=ExponentialBackoff(
            base=settings.drain_backoff_base_seconds, cap=settings.drain_backoff_cap_seconds
        ),
        visibility_timeout_seconds=settings.drain_visibility_timeout_seconds,
        recovery_interval_seconds=settings.drain_recovery_interval_seconds,
        idle_seconds=settings.drain_idle_seconds,
        pipeline_depth=settings.drain_pipeline_depth,
    )


def sweeper_of(buffer: MollifierBuffer, settings: MollifierSettings) -> StaleSweeper:
    return StaleSweeper(
        buffer,
        threshold_seconds=settings.stale_threshold_seconds,
        interval_seconds=settings.sweep_interval_seconds,
        lease_seconds=settings.sweep_lease_seconds,
    )
