"""Control-plane settings (RUNOPS_* environment variables)."""

from __future__ import annotations

from pydantic import Field, PostgresDsn

from runops.kit.settings import ServerSettings


class ControlPlaneSettings(ServerSettings):
    # Writes, LISTEN/NOTIFY, and reads while the replica lags behind an invalidation.
    controlplane_db_writer_url: PostgresDsn
    # Cached resolves read here; empty reads the writer.
    controlplane_db_replica_url: PostgresDsn | None = None
    db_pool_min_size: int = Field(default=0, ge=0, le=100)
    db_pool_max_size: int = Field(default=10, ge=1, le=200)
    # Per statement; a slower query fails DEADLINE_EXCEEDED instead of holding a connection.
    db_statement_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    cache_ttl_seconds: float = Field(default=30.0, gt=0, le=3600)
    cache_max_entries: int = Field(default=10_000, ge=1, le=10_000_000)
    # Start-up waits this long for the invalidation feed (LISTEN) before serving uncached.
    feed_start_timeout_seconds: float = Field(default=10.0, ge=0, le=300)
    # Invalidations buffered per WatchInvalidations stream before it is told to reset.
    watch_queue_size: int = Field(default=1024, ge=1, le=1_000_000)

    @property
    def writer_dsn(self) -> str:
        return str(self.controlplane_db_writer_url)

    @property
    def replica_dsn(self) -> str:
        return str(self.controlplane_db_replica_url or self.controlplane_db_writer_url)
