"""A service's Redis: its settings block, its client (standalone or Cluster), its health check.

A service declares one field and opens it once:

    class MollifierSettings(ServerSettings):
        redis: RedisSettings = redis_field()   # RUNOPS_REDIS_URL or RUNOPS_REDIS_CLUSTER_NODES

    client = await open_redis(app, "redis", settings.redis)

Cluster nodes win when both are set (the local stack exports both once a cluster runs). The
client retries a dropped connection or a timeout with redis-py's own `Retry` and jittered
exponential `Backoff` (the policy `runops.kit.backoff` copies), so a failover or a restart costs
a few retries, not an error per command.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeAlias

import redis.asyncio as aioredis
import redis.exceptions
import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import NoDecode
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from runops.kit.redis_pool import IdleClosingPool
from runops.kit.server import ServiceApp

log = structlog.get_logger("runops.redis")

# What every caller types against: both clients have the same command and script API.
RedisClient: TypeAlias = aioredis.Redis | RedisCluster

_RETRY_ON = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class RedisSettings(BaseModel):
    """One Redis deployment: a standalone server (`url`) or a Redis Cluster (`cluster_nodes`)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    url: str | None = None
    """redis:// or rediss:// URL of a standalone server (or a proxy in front of one)."""
    cluster_nodes: Annotated[tuple[str, ...], NoDecode] = ()
    """host:port of some Cluster nodes, comma-separated; the client discovers the rest. Set, it
    wins over `url`."""
    socket_timeout_seconds: float = Field(default=5.0, gt=0, le=120)
    """A command (or a connection attempt) that takes longer fails with a timeout."""
    max_connections: int = Field(default=100, ge=1, le=10_000)
    """Connections at most (per node for a Cluster)."""
    retry_attempts: int = Field(default=3, ge=0, le=20)
    """Retries of a command after a dropped connection or a timeout (0: none)."""
    retry_backoff_base_seconds: float = Field(default=0.05, gt=0, le=10)
    """First retry delay, doubling (with jitter) up to `retry_backoff_cap_seconds`."""
    retry_backoff_cap_seconds: float = Field(default=1.0, gt=0, le=60)
    health_check_interval_seconds: float = Field(default=30.0, ge=0, le=600)
    """A pooled connection idle longer than this is PINGed before use (0: never)."""
    max_idle_seconds: float = Field(default=60.0, ge=0, le=3600)
    """A pooled connection idle longer than this is closed (0: never), so the connections a
    burst opened go away again (standalone; a Cluster client keeps its own per-node pools)."""

    @field_validator("cluster_nodes", mode="before")
    @classmethod
    def _split_nodes(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(node.strip() for node in value.split(",") if node.strip())
        return value

    @field_validator("cluster_nodes")
    @classmethod
    def _host_port(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for node in value:
            host, _, port = node.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"each node must be host:port, got {node!r}")
        return value

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @model_validator(mode="after")
    def _one_deployment(self) -> RedisSettings:
        if self.url is None and not self.cluster_nodes:
            raise ValueError("set RUNOPS_REDIS_URL (standalone) or RUNOPS_REDIS_CLUSTER_NODES")
        if self.retry_backoff_base_seconds > self.retry_backoff_cap_seconds:
            raise ValueError("retry_backoff_base_seconds must not exceed the cap")
        return self

    @property
    def is_cluster(self) -> bool:
        return bool(self.cluster_nodes)


def redis_field() -> Any:
    """The default of a RedisSettings field: a missing variable is reported by name."""
    return Field(default_factory=dict, validate_default=True)


def _retry(settings: RedisSettings) -> Retry:
    backoff = ExponentialWithJitterBackoff(
        base=settings.retry_backoff_base_seconds, cap=settings.retry_backoff_cap_seconds
    )
    return Retry(backoff, settings.retry_attempts, supported_errors=_RETRY_ON)


def create_redis(settings: RedisSettings) -> RedisClient:
    """A client for the configured deployment; connects lazily (the service starts while Redis
    is down, NOT_SERVING until it answers)."""
    common: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout_seconds,
        "socket_connect_timeout": settings.socket_timeout_seconds,
        "max_connections": settings.max_connections,
        "retry": _retry(settings),
        "health_check_interval": settings.health_check_interval_seconds,
    }
    if settings.is_cluster:
        nodes = [
            ClusterNode(host, int(port))
            for host, _, port in (node.rpartition(":") for node in settings.cluster_nodes)
        ]
        return RedisCluster(startup_nodes=nodes, **common)
    assert settings.url is not None  # the model validator guarantees one of them
    # Blocking: a burst beyond max_connections waits (up to the socket timeout) for a free
    # connection instead of failing with MaxConnectionsError.
    pool = IdleClosingPool.from_url(
        settings.url,
        timeout=settings.socket_timeout_seconds,
        max_idle_seconds=settings.max_idle_seconds,
        **common,
    )
    return aioredis.Redis.from_pool(pool)


async def ping(client: RedisClient) -> None:
    """Raises while the deployment does not answer (a Cluster: every primary)."""
    if isinstance(client, RedisCluster):
        await client.ping(target_nodes=RedisCluster.PRIMARIES)
    else:
        await client.ping()


async def warm_up(client: RedisClient) -> bool:
    """Load a Cluster client's slot map now. redis-py's async RedisCluster (seen with 8.1)
    breaks connections when many coroutines make its very first commands at once; after this
    it does not. False (logged) while the Cluster is unreachable: it loads on first use then."""
    if not isinstance(client, RedisCluster):
        return True
    try:
        await client.initialize()
    except redis.exceptions.RedisError as exc:
        log.warning("redis cluster unreachable at start-up", error=repr(exc))
        return False
    return True


async def connect_redis(settings: RedisSettings) -> RedisClient:
    """A client, warmed up (`warm_up`): for processes and tests without a ServiceApp."""
    client = create_redis(settings)
    await warm_up(client)
    return client


async def open_redis(app: ServiceApp, name: str, settings: RedisSettings) -> RedisClient:
    """The client (warmed up before the server opens its port), a health dependency `name`
    (PING; NOT_SERVING while it fails) and a close hook that runs after the server drained."""
    client = create_redis(settings)
    app.on_startup(lambda: warm_up(client))
    app.add_dependency(name, lambda: ping(client))
    app.on_shutdown(client.aclose)
    return client
