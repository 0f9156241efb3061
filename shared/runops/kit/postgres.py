"""A service's Postgres database: its settings block, its pools, its health check.

A service declares one field per database on its settings class; the field name is the
variables' prefix, so one process can hold several (the run store: LEGACY and NEW):

    class RunStoreSettings(ServerSettings):
        controlplane_db: DatabaseSettings = database_field()  # RUNOPS_CONTROLPLANE_DB_*
        runops_db: DatabaseSettings = database_field()        # RUNOPS_RUNOPS_DB_*

and opens each with `open_database(app, "runops-db", settings.runops_db)`, which hands back the
`ReplicaRouter` its store reads and writes through.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, UrlConstraints, field_validator, model_validator
from pydantic_core import MultiHostUrl
from pydantic_settings import NoDecode

from runops.kit.replica import ReplicaRouter
from runops.kit.server import ServiceApp

# What asyncpg connects to: postgres:// or postgresql://, one host or several (tried in order).
# Anything else (postgresql+psycopg://, mysql://) fails settings validation, naming the variable.
AsyncpgDsn = Annotated[
    MultiHostUrl,
    UrlConstraints(host_required=True, allowed_schemes=["postgres", "postgresql"]),
]
# A comma in a multi-host DSN separates hosts; one before a scheme (any: a wrong one must be
# seen to be refused) separates DSNs.
_DSN_SEPARATOR = re.compile(r",\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


class DatabaseSettings(BaseModel):
    """One database: its writer, its read replicas, pool sizes and timeouts."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    writer_url: AsyncpgDsn
    """The writer: writes, LISTEN, and reads a replica cannot serve (lagging, down, hung)."""
    replica_url: Annotated[tuple[AsyncpgDsn, ...], NoDecode] = ()
    """Streaming replicas for reads, comma-separated; empty: every read goes to the writer."""
    pool_min_size: int = Field(default=0, ge=0, le=100)
    """Connections kept open per pool; 0 lets the service start while the database is down
    (NOT_SERVING until it is up)."""
    pool_max_size: int = Field(default=10, ge=1, le=200)
    """Connections at most per pool (the writer's and each replica's)."""
    statement_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    """Per statement; a slower one fails DEADLINE_EXCEEDED instead of holding a connection."""
    replica_timeout_seconds: float = Field(default=1.0, gt=0, le=30)
    """A replica read (connecting included) that takes longer goes to the writer instead, and
    the replica is skipped for a second: a hung replica must not hold reads until the caller's
    deadline."""
    connect_timeout_seconds: float = Field(default=5.0, gt=0, le=120)
    """Opening a connection, and the writer's health check, give up after this."""

    @field_validator("replica_url", mode="before")
    @classmethod
    def _split_replicas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(dsn for dsn in _DSN_SEPARATOR.split(value.strip()) if dsn)
        return value

    @model_validator(mode="after")
    def _pool_bounds(self) -> DatabaseSettings:
        if self.pool_min_size > self.pool_max_size:
            raise ValueError("pool_min_size must not exceed pool_max_size")
        return self

    @property
    def writer_dsn(self) -> str:
        return str(self.writer_url)

    @property
    def replica_dsns(self) -> tuple[str, ...]:
        return tuple(str(url) for url in self.replica_url)


def database_field() -> Any:
    """The default of a DatabaseSettings field: a missing variable is then reported by its own
    name (RUNOPS_<FIELD>_WRITER_URL), not as a missing block."""
    return Field(default_factory=dict, validate_default=True)


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """A released connection's reset: nothing to send. Pooled connections hold no session
    state (no SET, LISTEN, session advisory lock or WITH HOLD cursor: LISTEN has a connection
    of its own, locks are transaction-scoped), so asyncpg's default reset query (`RESET ALL`,
    `UNLISTEN *`...) would only cost a round trip per release, one per read. asyncpg still rolls
    back a transaction left open before it calls this."""


async def create_pool(dsn: str, settings: DatabaseSettings, application_name: str) -> asyncpg.Pool:
    # min_size 0 by default: create_pool connects nothing, so the service starts while the
    # database is down. command_timeout backs the server's statement_timeout on the client.
    return await asyncpg.create_pool(
        dsn,
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        timeout=settings.connect_timeout_seconds,
        command_timeout=settings.statement_timeout_seconds + 1,
        reset=_keep_session,
        server_settings={
            "statement_timeout": str(int(settings.statement_timeout_seconds * 1000)),
            "application_name": application_name,
        },
    )


async def open_database(app: ServiceApp, name: str, settings: DatabaseSettings) -> ReplicaRouter:
    """Pools for one database, routed by a ReplicaRouter. The health dependency `name` follows
    the writer (down or hung: NOT_SERVING; a replica that fails only sends reads to the
    writer), and the pools close after the server drained."""
    application_name = f"runops-{app.name}"
    writer = await create_pool(settings.writer_dsn, settings, application_name)
    replicas: list[asyncpg.Pool] = []
    try:
        for dsn in settings.replica_dsns:
            replicas.append(await create_pool(dsn, settings, application_name))
    except BaseException:
        for pool in (writer, *replicas):
            pool.terminate()
        raise
    router = ReplicaRouter(
        writer,
        replicas,
        replica_timeout=settings.replica_timeout_seconds,
        ping_timeout=settings.connect_timeout_seconds,
    )
    app.add_dependency(name, router.ping_writer)
    app.on_shutdown(router.close)
    return router
