"""The whole local stack: two PostgreSQL clusters with replicas, Redis, S3, migrations."""

from __future__ import annotations

import asyncio
import atexit
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from runops.kit.ids import Residency
from runops.localstack.postgres import PostgresCluster, PostgresDatabase
from runops.localstack.process import StackError
from runops.localstack.redis import RedisCluster, RedisServer
from runops.localstack.s3 import (
    ACCESS_KEY_ID,
    DEFAULT_BUCKET,
    REGION,
    SECRET_ACCESS_KEY,
    S3Server,
    ensure_bucket,
)

Progress = Callable[[str], None]
T = TypeVar("T")

CONTROLPLANE_DATABASE = "runops_controlplane"
RUNOPS_DATABASE = "runops"
# Endpoint lines line up their values at this column.
LABEL_WIDTH = 25


class _Component(Protocol):
    def start(self) -> None: ...
    def stop(self, keep_files: bool = False) -> None: ...


def printing_progress(prefix: str = "runops") -> Progress:
    """Progress lines on stderr with the time since this was made: start-up takes seconds."""
    started = time.monotonic()

    def emit(line: str) -> None:
        print(f"[{prefix} +{time.monotonic() - started:4.1f}s] {line}", file=sys.stderr, flush=True)

    return emit


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even when the calling thread already runs
    an event loop (pytest-asyncio): it gets a loop of its own on a helper thread."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@dataclass(frozen=True)
class ExternalServers:
    """Servers that already run somewhere: the stack uses these instead of starting its own.

    Anything left None is started locally. A database given without a replica runs replica-less
    (its replica_dsn is the writer's).
    """

    controlplane_db_writer: str | None = None
    controlplane_db_replica: str | None = None
    runops_db_writer: str | None = None
    runops_db_replica: str | None = None
    redis_url: str | None = None
    redis_cluster_nodes: tuple[str, ...] | None = None
    s3_endpoint: str | None = None


class LocalStack:
    """Start with `start()` (or `with LocalStack() as stack:`), read endpoints, `stop()`.

    state_dir: where data and logs go; a temporary directory (removed on stop) when None.
    with_cluster: also start the 3-master Redis Cluster (else on demand: start_redis_cluster()).
    replicas: give each database a streaming replica.
    durable: Postgres with production durability (fsync, synchronous_commit and full_page_writes
    on; see postgres._DURABLE_SETTINGS) instead of the fast defaults, for `runops bench --durable`.
    """

    def __init__(
        self,
        state_dir: Path | None = None,
        *,
        with_cluster: bool = False,
        replicas: bool = True,
        durable: bool = False,
        external: ExternalServers | None = None,
        s3_bucket: str = DEFAULT_BUCKET,
        run_migrations: bool = True,
        progress: Progress | None = None,
    ) -> None:
        self._given_state_dir = state_dir
        self._with_cluster = with_cluster
        self._replicas = replicas
        self._durable = durable
        self._external = external or ExternalServers()
        self.s3_bucket = s3_bucket
        self.s3_region = REGION
        self._run_migrations = run_migrations
        self._progress = progress or (lambda _line: None)
        self._state_dir: Path | None = None
        self._own_state_dir = False
        self._components: list[_Component] = []
        self._cluster_lock = threading.Lock()
        self._cluster_nodes: list[str] | None = (
            list(self._external.redis_cluster_nodes) if self._external.redis_cluster_nodes else None
        )
        self._controlplane_db: PostgresDatabase | None = None
        self._runops_db: PostgresDatabase | None = None
        self._redis_url: str | None = None
        self._s3_endpoint_url: str | None = None
        self.migrations_applied: dict[str, list[str]] = {}
        self.startup_seconds = 0.0

    # -- endpoints -------------------------------------------------------------------------

    def _started(self, value: T | None, what: str) -> T:
        if value is None:
            raise RuntimeError(f"{what} is not known before LocalStack.start()")
        return value

    @property
    def controlplane_db(self) -> PostgresDatabase:
        """The control-plane database (also holds LEGACY run rows)."""
        return self._started(self._controlplane_db, "controlplane_db")

    @property
    def runops_db(self) -> PostgresDatabase:
        """The run-ops database (NEW run rows)."""
        return self._started(self._runops_db, "runops_db")

    def database_for(self, residency: Residency) -> PostgresDatabase:
        """The database holding the rows of ids of this residency (the run store's split)."""
        return self.runops_db if residency is Residency.NEW else self.controlplane_db

    @property
    def redis_url(self) -> str:
        return self._started(self._redis_url, "redis_url")

    @property
    def s3_endpoint_url(self) -> str:
        return self._started(self._s3_endpoint_url, "s3_endpoint_url")

    @property
    def redis_cluster_nodes(self) -> list[str] | None:
        """host:port of each cluster master, or None while no cluster runs."""
        return self._cluster_nodes

    @property
    def state_dir(self) -> Path:
        return self._started(self._state_dir, "state_dir")

    def service_env(self) -> dict[str, str]:
        """The environment every service reads to find the stack (its databases as the
        least-privilege service role)."""
        env = {
            "RUNOPS_CONTROLPLANE_DB_WRITER_URL": self.controlplane_db.writer_dsn,
            "RUNOPS_CONTROLPLANE_DB_REPLICA_URL": self.controlplane_db.replica_dsn,
            "RUNOPS_RUNOPS_DB_WRITER_URL": self.runops_db.writer_dsn,
            "RUNOPS_RUNOPS_DB_REPLICA_URL": self.runops_db.replica_dsn,
            "RUNOPS_REDIS_URL": self.redis_url,
            "RUNOPS_S3_ENDPOINT_URL": self.s3_endpoint_url,
            "RUNOPS_S3_BUCKET": self.s3_bucket,
            "RUNOPS_S3_REGION": self.s3_region,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        }
        # Services use the Cluster only when the stack was asked for one (runops up
        # --with-cluster, or given nodes): one started on demand by a test must not switch
        # every service started after it (the cluster's nodes win over RUNOPS_REDIS_URL).
        if self._cluster_nodes and (self._with_cluster or self._external.redis_cluster_nodes):
            env["RUNOPS_REDIS_CLUSTER_NODES"] = ",".join(self._cluster_nodes)
        return env

    def describe(self) -> list[str]:
        """Human-readable endpoint lines."""

        def line(label: str, value: str) -> str:
            return f"{label + ':':{LABEL_WIDTH}}{value}"

        lines: list[str] = []
        for name, db in (("controlplane db", self.controlplane_db), ("runops db", self.runops_db)):
            lines.append(line(f"{name} writer", db.writer_dsn))
            lines.append(line(f"{name} replica", db.replica_dsn if db.has_replica else "(none)"))
        lines.append(line("redis", self.redis_url))
        if self._cluster_nodes:
            lines.append(line("redis cluster", ",".join(self._cluster_nodes)))
        lines.append(line("s3", f"{self.s3_endpoint_url} (bucket {self.s3_bucket})"))
        return lines

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> LocalStack:
        """Start what is not external, concurrently; run migrations. On any failure everything
        already started is stopped before the error propagates."""
        began = time.monotonic()
        atexit.register(self.stop)
        try:
            self._start_servers()
            if self._run_migrations:
                self._migrate()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        self._progress(f"local stack ready in {self.startup_seconds:.1f}s")
        return self

    def _make_state_dir(self) -> Path:
        if self._given_state_dir is not None:
            self._given_state_dir.mkdir(parents=True, exist_ok=True)
            return self._given_state_dir.resolve()
        self._own_state_dir = True
        path = Path(tempfile.mkdtemp(prefix="runops-stack-"))
        # Other users (postgres, when we are root) may need to reach into it.
        path.chmod(0o755)
        return path

    def _database(
        self, name: str, database: str, writer: str | None, replica: str | None
    ) -> tuple[PostgresDatabase, _Component | None]:
        if writer is not None:
            return PostgresDatabase(writer, replica), None
        cluster = PostgresCluster(
            name,
            self.state_dir,
            database,
            replica=self._replicas,
            durable=self._durable,
            progress=self._progress,
        )
        return cluster, cluster

    def _start_servers(self) -> None:
        self._state_dir = self._make_state_dir()
        ext = self._external
        self._progress(f"starting the local stack in {self._state_dir}")
        pending: list[tuple[str, _Component]] = []
        self._controlplane_db, cp = self._database(
            "controlplane", CONTROLPLANE_DATABASE, ext.controlplane_db_writer,
            ext.controlplane_db_replica,
        )  # fmt: skip
        self._runops_db, ro = self._database(
            "runops", RUNOPS_DATABASE, ext.runops_db_writer, ext.runops_db_replica
        )
        pending += [("postgres controlplane", cp)] if cp else []
        pending += [("postgres runops", ro)] if ro else []
        if ext.redis_url is not None:
            self._redis_url = ext.redis_url
        else:
            redis = RedisServer(self.state_dir)
            self._redis_url = redis.url
            pending.append(("redis", redis))
        if ext.s3_endpoint is not None:
            self._s3_endpoint_url = ext.s3_endpoint
            ensure_bucket(ext.s3_endpoint, self.s3_bucket, self.s3_region)
        else:
            s3 = S3Server(self.state_dir, self.s3_bucket)
            self._s3_endpoint_url = s3.endpoint_url
            pending.append(("s3", s3))
        if self._with_cluster and self._cluster_nodes is None:
            cluster = RedisCluster(self.state_dir, self._progress)
            pending.append(("redis cluster", cluster))
        # Registered before starting so stop() reaches half-started ones too.
        self._components += [component for _, component in pending]
        with ThreadPoolExecutor(max(1, len(pending))) as pool:
            futures: list[tuple[str, Future[None]]] = [
                (name, pool.submit(self._start_one, name, component)) for name, component in pending
            ]
            errors = []
            for name, future in futures:
                try:
                    future.result()
                except Exception as exc:
                    errors.append(f"{name}: {exc}")
        if errors:
            raise StackError("the local stack did not start:\n" + "\n".join(errors))
        if self._with_cluster and self._cluster_nodes is None:
            self._cluster_nodes = next(
                c.nodes for c in self._components if isinstance(c, RedisCluster)
            )

    def _start_one(self, name: str, component: _Component) -> None:
        began = time.monotonic()
        component.start()
        self._progress(f"{name} up ({time.monotonic() - began:.1f}s)")

    def _migrate(self) -> None:
        async def both() -> list[list[str]]:
            from runops.migrations import migrate

            return list(
                await asyncio.gather(
                    migrate(self.controlplane_db.migrator_dsn, "controlplane"),
                    migrate(self.runops_db.migrator_dsn, "runops"),
                )
            )

        controlplane, runops = run_coroutine(both())
        self.migrations_applied = {"controlplane": controlplane, "runops": runops}
        self._progress(
            f"migrations applied: controlplane {len(controlplane)}, runops {len(runops)}"
        )

    def start_redis_cluster(self) -> list[str]:
        """Start the Redis Cluster unless one runs (or was given); returns its nodes."""
        with self._cluster_lock:
            if self._cluster_nodes is None:
                cluster = RedisCluster(self.state_dir, self._progress)
                self._components.append(cluster)
                self._start_one("redis cluster", cluster)
                self._cluster_nodes = cluster.nodes
            return list(self._cluster_nodes)

    def stop(self, keep_files: bool = False) -> None:
        """Stop every server this stack started (concurrently), then remove its files.
        Safe to call twice and after a failed start."""
        atexit.unregister(self.stop)
        components, self._components = self._components, []
        if components:
            self._progress("stopping the local stack")
            with ThreadPoolExecutor(len(components)) as pool:
                for future in [pool.submit(c.stop, keep_files) for c in components]:
                    try:
                        future.result()
                    except Exception as exc:  # keep stopping the others
                        self._progress(f"error while stopping: {exc}")
        if self._own_state_dir and self._state_dir is not None and not keep_files:
            shutil.rmtree(self._state_dir, ignore_errors=True)
        if self._external.redis_cluster_nodes is None:
            self._cluster_nodes = None
