"""Control-plane settings (RUNOPS_* environment variables)."""

from __future__ import annotations

from pydantic import Field

from runops.kit.postgres import DatabaseSettings, database_field
from runops.kit.settings import ServerSettings


class ControlPlaneSettings(ServerSettings):
    # RUNOPS_CONTROLPLANE_DB_WRITER_URL (writes, LISTEN/NOTIFY, reads while the replica lags
    # behind an invalidation), RUNOPS_CONTROLPLANE_DB_REPLICA_URL (cached resolves read there),
    # pools and timeouts: see runops.kit.postgres.DatabaseSettings.
    controlplane_db: DatabaseSettings = database_field()
    cache_ttl_seconds: float = Field(default=30.0, gt=0, le=3600)
    cache_max_entries: int = Field(default=10_000, ge=1, le=10_000_000)
    # Start-up waits this long for the invalidation feed (LISTEN) before serving uncached.
    feed_start_timeout_seconds: float = Field(default=10.0, ge=0, le=300)
    # Invalidations buffered per WatchInvalidations stream before it is told to reset.
    watch_queue_size: int = Field(default=1024, ge=1, le=1_000_000)
