"""Settings from environment variables, validated at start-up (pydantic-settings)."""

from __future__ import annotations

import importlib.util
import re
from typing import Any, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from runops.kit.cores import usable_cores

ENV_PREFIX = "RUNOPS_"


class SettingsError(Exception):
    """A setting is missing or invalid; the message names each variable and what it needs."""


class ServerSettings(BaseSettings):
    """What every service reads: where to listen, how to shut down, logs, tokens."""

    # A nested block (runops.kit.postgres.DatabaseSettings) reads RUNOPS_<FIELD>_<SUBFIELD>.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        frozen=True,
        env_nested_delimiter="_",
        env_nested_max_split=1,
    )

    grpc_host: str = "0.0.0.0"
    # 0 binds an ephemeral port (tests).
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    # 0 binds an ephemeral port; -1 disables the metrics endpoint.
    metrics_port: int = Field(default=9464, ge=-1, le=65535)
    # In-flight RPCs get this long to finish after SIGTERM before they are cancelled.
    grace_period_seconds: float = Field(default=20.0, gt=0, le=600)
    # Time between reporting NOT_SERVING and refusing new RPCs, so load balancers drain first.
    shutdown_delay_seconds: float = Field(default=0.0, ge=0, le=120)
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    keepalive_time_seconds: float = Field(default=30.0, gt=0)
    keepalive_timeout_seconds: float = Field(default=10.0, gt=0)
    # How often dependency checks run to drive the health status.
    health_check_interval_seconds: float = Field(default=1.0, gt=0, le=60)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"
    # Required for admin RPCs; without it they are refused.
    admin_token: SecretStr | None = None
    # Service-to-service calls present this token; without it internal RPCs are open (local dev).
    internal_token: SecretStr | None = None
    # Server processes sharing the port (SO_REUSEPORT), each with its own event loop, pools,
    # caches and feeds; "auto" is one per usable core (affinity capped by the cgroup CPU quota). 1 serves in this very process.
    processes: int = Field(default=1, ge=1, le=512)
    # The event loop each server process runs on: asyncio's own, or uvloop (measured with
    # `runops bench`, docs/benchmarks.md "uvloop"; kept off by default).
    event_loop: Literal["asyncio", "uvloop"] = "asyncio"

    @field_validator("event_loop")
    @classmethod
    def _uvloop_installed(cls, value: str) -> str:
        # Not a dependency (asyncio is the default): say so at start-up, not as an ImportError.
        if value == "uvloop" and importlib.util.find_spec("uvloop") is None:
            raise ValueError("uvloop is not installed (pip install uvloop)")
        return value

    @field_validator("processes", mode="before")
    @classmethod
    def _auto_processes(cls, value: object) -> object:
        if isinstance(value, str):
            if value.strip().lower() == "auto":
                return usable_cores()
            if not value.strip().isdigit():
                raise ValueError("must be a number of processes (1 or more) or 'auto'")
        return value


S = TypeVar("S", bound=BaseSettings)
# The password of a URL (scheme://user:password@host) is not repeated in an error message.
_PASSWORD = re.compile(r"(//[^/@:,]*:)[^@/]*@")


def _redact(value: object) -> str:
    return _PASSWORD.sub(r"\1***@", repr(value))


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Build settings from the environment (overrides win), or raise SettingsError explaining each
    bad variable by its environment name."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", ""))
        lines = []
        for err in exc.errors():
            # ("controlplane_db", "replica_url", 0) -> CONTROLPLANE_DB_REPLICA_URL
            name = "_".join(str(p) for p in err["loc"] if isinstance(p, str)) or "?"
            env_name = (prefix + name).upper()
            given = err.get("input")
            shown = "" if isinstance(given, dict) or given is None else f" (got {_redact(given)})"
            lines.append(f"  {env_name}: {err['msg']}{shown}")
        raise SettingsError(
            f"invalid settings for {cls.__name__}:\n"
            + "\n".join(lines)
            + "\nfix the environment variables above and start again"
        ) from None
