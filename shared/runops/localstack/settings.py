"""A service on the local stack as the tests and the benchmarks start it: in this process (its
settings) or as an OS process (its environment). Loopback on a free port, no metrics endpoint,
a short grace period and health interval, fixed tokens; the caller adds the service's own
values (databases, Redis, other services' targets).

    settings = in_process_settings(ControlPlaneSettings, admin_token=ADMIN_TOKEN,
                                   controlplane_db=database(stack.controlplane_db))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from runops.kit.settings import ServerSettings, load_settings
from runops.localstack.ports import HOST

if TYPE_CHECKING:
    from runops.localstack.postgres import PostgresDatabase
    from runops.localstack.stack import LocalStack

S = TypeVar("S", bound=ServerSettings)

ADMIN_TOKEN = "admin-token-for-tests"
INTERNAL_TOKEN = "internal-token-for-tests"

# What every in-process service starts with (its values win over these).
IN_PROCESS: dict[str, Any] = {
    "grpc_host": HOST,
    "grpc_port": 0,
    "metrics_port": -1,
    "grace_period_seconds": 2,
    "health_check_interval_seconds": 0.2,
    "internal_token": INTERNAL_TOKEN,
}


def in_process_settings(cls: type[S], **values: Any) -> S:
    """`cls` with IN_PROCESS under `values` (the environment fills in the rest)."""
    return load_settings(cls, **{**IN_PROCESS, **values})


def database(db: PostgresDatabase, **overrides: Any) -> dict[str, Any]:
    """A `PostgresSettings` value for `db` (writer and replica, as the service role)."""
    return {"writer_url": db.writer_dsn, "replica_url": db.replica_dsn, **overrides}


def process_env(stack: LocalStack, **env: str) -> dict[str, str]:
    """What a service started as a process (`ServiceProcess(env=...)`) gets: the stack's
    endpoints, the internal token, console logs; `env` on top (RUNOPS_ADMIN_TOKEN for a control
    plane)."""
    return {
        **stack.service_env(),
        "RUNOPS_INTERNAL_TOKEN": INTERNAL_TOKEN,
        "RUNOPS_LOG_FORMAT": "console",
        **env,
    }
