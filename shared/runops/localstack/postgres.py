"""A PostgreSQL writer with a streaming read replica, as local processes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Literal

import asyncpg

from runops.localstack.ports import HOST, free_port
from runops.localstack.process import (
    StackError,
    as_postgres_user,
    chown_to_postgres,
    log_tail,
    run,
)

DEFAULT_BIN_DIR = Path("/usr/lib/postgresql/15/bin")
BIN_DIR_ENV = "RUNOPS_PG_BIN_DIR"
SUPERUSER = "postgres"
# The least-privilege roles every database of the stack gets (see ROLES_SQL).
SERVICE_ROLE = "runops_service"
MIGRATOR_ROLE = "runops_migrator"
# Unix socket paths are limited to 107 bytes; ".s.PGSQL.NNNNN" takes 15 of them.
_MAX_SOCKET_DIR = 90

# Durability is worthless for a throw-away local cluster; speed is not. wal_writer_delay is
# short because synchronous_commit=off leaves WAL unflushed (so unsent to the replica) until
# the WAL writer runs.
_WRITER_SETTINGS = """
listen_addresses = '127.0.0.1'
fsync = off
synchronous_commit = off
full_page_writes = off
wal_level = replica
max_wal_senders = 10
wal_writer_delay = 10ms
max_connections = 300
hot_standby = on
hot_standby_feedback = on
log_min_messages = warning
"""
# `durable=True` (benchmarks' --durable): production durability. Appended after the settings
# above, so these win: every commit waits for its WAL to be flushed to disk (the replica stays
# asynchronous: no synchronous_standby_names), and pages survive a torn write.
_DURABLE_SETTINGS = """
fsync = on
synchronous_commit = on
full_page_writes = on
"""

# Run as the superuser in each application database. The migrator owns the schema objects it
# creates (and nothing else: no superuser, no CREATEDB/CREATEROLE/REPLICATION, not the database
# owner); the services' role may only read and write the rows of the migrator's tables and
# sequences, so a service can neither change the schema nor reach beyond its database. Default
# privileges make every table a later migration creates usable by the services with no GRANT
# in the migration itself. Roles are cluster-wide: each database here is its own cluster.
ROLES_SQL = f"""
CREATE ROLE {MIGRATOR_ROLE} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION;
CREATE ROLE {SERVICE_ROLE} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION;
GRANT USAGE, CREATE ON SCHEMA public TO {MIGRATOR_ROLE};
GRANT USAGE ON SCHEMA public TO {SERVICE_ROLE};
ALTER DEFAULT PRIVILEGES FOR ROLE {MIGRATOR_ROLE} IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {SERVICE_ROLE};
ALTER DEFAULT PRIVILEGES FOR ROLE {MIGRATOR_ROLE} IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO {SERVICE_ROLE};
"""

Progress = Callable[[str], None]
Role = Literal["writer", "replica"]


def find_bin_dir() -> Path:
    """Where initdb/pg_ctl/pg_basebackup live: $RUNOPS_PG_BIN_DIR, PostgreSQL 15's apt path, or
    the newest /usr/lib/postgresql/*/bin."""
    given = os.environ.get(BIN_DIR_ENV)
    candidates = [Path(given)] if given else [DEFAULT_BIN_DIR]
    if not given:
        candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "pg_basebackup").exists():
            return candidate
    where = given or str(DEFAULT_BIN_DIR)
    raise StackError(
        f"postgres binaries not found in {where}: apt-get install postgresql-15 "
        f"(or set {BIN_DIR_ENV} to the directory holding initdb and pg_ctl)"
    )


def _reachable_by_postgres(path: Path) -> bool:
    """Can the postgres user (not root) traverse every directory leading to path?"""
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.stat().st_mode & stat.S_IXOTH:
            return False
    return True


class PostgresDatabase:
    """One application database on a writer and, optionally, its streaming replica, by DSN.

    writer_dsn / replica_dsn are what the services use (the least-privilege service role on a
    cluster this process started); migrator_dsn runs migrations; admin_writer_dsn /
    admin_replica_dsn are the superuser's, for tests that need its powers (replay control,
    ending other roles' backends, creating databases). Servers given by URL use the one DSN
    given for all of them. Without a replica, replica_dsn is the writer's and replay control
    raises.
    """

    def __init__(
        self,
        writer_dsn: str,
        replica_dsn: str | None = None,
        *,
        migrator_dsn: str | None = None,
        admin_writer_dsn: str | None = None,
        admin_replica_dsn: str | None = None,
    ) -> None:
        self.writer_dsn = writer_dsn
        self.has_replica = replica_dsn is not None
        self.replica_dsn = replica_dsn if replica_dsn is not None else writer_dsn
        self.migrator_dsn = migrator_dsn or writer_dsn
        self.admin_writer_dsn = admin_writer_dsn or writer_dsn
        self.admin_replica_dsn = admin_replica_dsn or self.replica_dsn

    def _need_replica(self) -> None:
        if not self.has_replica:
            raise RuntimeError("this database runs without a replica (no replay to control)")

    async def _replica_value(self, sql: str) -> object:
        self._need_replica()
        conn = await asyncpg.connect(self.admin_replica_dsn)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    async def pause_replay(self) -> None:
        """Hold back WAL replay on the replica: writes stop showing there until resume_replay().

        Waits until replay is really paused, so a row written after this returns is not
        replayed."""
        await self._replica_value("SELECT pg_wal_replay_pause()")
        deadline = time.monotonic() + 10
        while await self._replica_value("SELECT pg_get_wal_replay_pause_state()") != "paused":
            if time.monotonic() > deadline:
                raise TimeoutError("replica replay did not pause within 10s")
            await asyncio.sleep(0.01)

    async def resume_replay(self) -> None:
        await self._replica_value("SELECT pg_wal_replay_resume()")

    @contextlib.asynccontextmanager
    async def replay_paused(self) -> AsyncIterator[None]:
        """`async with db.replay_paused():` the replica stays behind inside, resumes after."""
        await self.pause_replay()
        try:
            yield
        finally:
            await self.resume_replay()

    async def is_replay_paused(self) -> bool:
        state = await self._replica_value("SELECT pg_get_wal_replay_pause_state()")
        return state != "not paused"

    # A timeout parameter (not asyncio.timeout) because TimeoutError here is the answer tests
    # assert on while replay is paused.
    async def wait_for_replica(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Return once the replica has replayed everything the writer had committed when this
        was called; TimeoutError otherwise (e.g. while replay is paused). The target is the
        writer's WAL insert position, not its write position: with synchronous_commit off (the
        local stack's default) a commit returns while its record is still in WAL buffers, past
        the write position, so waiting for that one could return before the row replicated
        (a CI flake of test_replica_replicates_and_replay_pause_holds_rows_back)."""
        if not self.has_replica:
            return
        writer = await asyncpg.connect(self.admin_writer_dsn)
        try:
            target = await writer.fetchval("SELECT pg_current_wal_insert_lsn()::text")
        finally:
            await writer.close()
        replica = await asyncpg.connect(self.admin_replica_dsn)
        try:
            deadline = time.monotonic() + timeout
            query = "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)"
            while not await replica.fetchval(query, target):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"replica did not replay up to {target} within {timeout:.1f}s"
                    )
                await asyncio.sleep(0.01)
        finally:
            await replica.close()


class PostgresCluster(PostgresDatabase):
    """initdb + writer + pg_basebackup replica under state_dir, on free loopback ports.

    The database named `database` is created before the base backup, so it exists on both.
    durable: production durability (fsync, synchronous_commit, full_page_writes on) instead of
    the fast throw-away defaults; the replica inherits it with the base backup.
    """

    def __init__(
        self,
        name: str,
        state_dir: Path,
        database: str,
        *,
        replica: bool = True,
        durable: bool = False,
        progress: Progress | None = None,
    ) -> None:
        self.name = name
        self.durable = durable
        self.database = database
        self.writer_port = free_port()
        self.replica_port = free_port() if replica else None
        super().__init__(
            self._dsn(SERVICE_ROLE, self.writer_port),
            self._dsn(SERVICE_ROLE, self.replica_port) if self.replica_port else None,
            migrator_dsn=self._dsn(MIGRATOR_ROLE, self.writer_port),
            admin_writer_dsn=self._dsn(SUPERUSER, self.writer_port),
            admin_replica_dsn=self._dsn(SUPERUSER, self.replica_port or self.writer_port),
        )
        self._state_dir = state_dir
        self._progress = progress or (lambda _line: None)
        self._base: Path | None = None
        self._own_tmp_base = False

    def _dsn(self, role: str, port: int) -> str:
        return f"postgresql://{role}@{HOST}:{port}/{self.database}"

    @property
    def _writer_dir(self) -> Path:
        assert self._base is not None
        return self._base / "writer"

    @property
    def _replica_dir(self) -> Path:
        assert self._base is not None
        return self._base / "replica"

    def _make_base(self) -> Path:
        base = self._state_dir / f"pg-{self.name}"
        # As root the servers run as postgres, which must reach the directory; unix socket paths
        # have a length limit. Otherwise fall back to a short private directory in /tmp.
        too_long = len(str(base / "sock")) > _MAX_SOCKET_DIR
        if too_long or (os.geteuid() == 0 and not _reachable_by_postgres(self._state_dir)):
            base = Path(tempfile.mkdtemp(prefix=f"runops-pg-{self.name}-"))
            self._own_tmp_base = True
        else:
            base.mkdir(parents=True, exist_ok=True)
        chown_to_postgres(base)
        return base

    def start(self) -> None:
        bin_dir = find_bin_dir()
        self._base = self._make_base()
        sock = self._base / "sock"
        sock.mkdir(exist_ok=True)
        chown_to_postgres(sock)
        user = as_postgres_user()
        env = self._env()

        def pg(*args: str, what: str, timeout: float = 60) -> str:
            return run(args, what, timeout=timeout, cwd=self._base, env=env, extra={**user})

        # Command line: each option beside its value (fmt: skip).
        pg(
            str(bin_dir / "initdb"),
            "-D", str(self._writer_dir), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync", "--no-instructions",
            what=f"initdb for {self.name}",
        )  # fmt: skip
        with (self._writer_dir / "postgresql.conf").open("a") as conf:
            conf.write(_WRITER_SETTINGS)
            if self.durable:
                conf.write(_DURABLE_SETTINGS)
            conf.write(f"port = {self.writer_port}\nunix_socket_directories = '{sock}'\n")
        with (self._writer_dir / "pg_hba.conf").open("a") as hba:
            hba.write(f"host replication all {HOST}/32 trust\n")
        self._pg_ctl_start(bin_dir, self._writer_dir, "writer", env)
        # Command line: each option beside its value (fmt: skip).
        pg(
            str(bin_dir / "createdb"), "-h", HOST, "-p", str(self.writer_port), self.database,
            what=f"createdb {self.database}",
        )  # fmt: skip
        psql = [str(bin_dir / "psql"), "-h", HOST, "-p", str(self.writer_port), "-X", "-q"]
        pg(
            *psql,
            "-d",
            self.database,
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            ROLES_SQL,
            what=f"creating the {SERVICE_ROLE} and {MIGRATOR_ROLE} roles",
        )
        self._progress(f"postgres {self.name}: writer ready on {HOST}:{self.writer_port}")
        if self.replica_port is None:
            return
        # Command line: each option beside its value (fmt: skip).
        pg(
            str(bin_dir / "pg_basebackup"),
            "-D", str(self._replica_dir), "-h", HOST, "-p", str(self.writer_port),
            "-R", "-X", "stream", "-c", "fast", "--no-sync",
            what=f"pg_basebackup for the {self.name} replica",
        )  # fmt: skip
        # postgresql.auto.conf wins over the postgresql.conf copied from the writer.
        with (self._replica_dir / "postgresql.auto.conf").open("a") as conf:
            conf.write(f"port = {self.replica_port}\nhot_standby = on\n")
        self._pg_ctl_start(bin_dir, self._replica_dir, "replica", env)
        self._progress(f"postgres {self.name}: replica ready on {HOST}:{self.replica_port}")

    def _env(self) -> dict[str, str]:
        return {**os.environ, "LC_ALL": "C", "PGUSER": SUPERUSER, "PGHOST": HOST}

    def _data_dir(self, role: Role) -> Path:
        if role == "replica" and self.replica_port is None:
            raise RuntimeError("this cluster runs without a replica")
        return self._writer_dir if role == "writer" else self._replica_dir

    # -- for tests that take a server away and bring it back -------------------------------
    def stop_server(self, role: Role) -> None:
        """`pg_ctl stop -m fast` on the writer or the replica; `start_server` brings it back."""
        self._stop_instance(self._data_dir(role))

    def start_server(self, role: Role) -> None:
        self._pg_ctl_start(find_bin_dir(), self._data_dir(role), role, self._env())

    def server_pids(self, role: Role) -> list[int]:
        """The postmaster's pid (from postmaster.pid) and its children's."""
        pid = _postmaster_pid(self._data_dir(role) / "postmaster.pid")
        if pid is None:
            return []
        # pgrep exits 1 when there are no children: not an error here.
        children = subprocess.run(
            ["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=10, check=False
        )
        return [pid, *(int(line) for line in children.stdout.split())]

    @contextlib.contextmanager
    def suspended(self, role: Role) -> Iterator[None]:
        """The server hangs inside (SIGSTOP to the postmaster and its children): it accepts TCP
        connections but answers nothing. SIGCONT on the way out, whatever happened."""
        pids = self.server_pids(role)
        if not pids:
            raise RuntimeError(f"the {self.name} {role} is not running")
        stopped: list[int] = []
        try:
            # The postmaster first, so it starts no child we would miss; then the children it
            # has now (one that exited meanwhile is simply gone).
            os.kill(pids[0], signal.SIGSTOP)
            stopped.append(pids[0])
            for pid in self.server_pids(role)[1:]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
                    stopped.append(pid)
            yield
        finally:
            for pid in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def _pg_ctl_start(self, bin_dir: Path, data: Path, role: str, env: dict[str, str]) -> None:
        assert self._base is not None
        log = self._base / f"{role}.log"
        try:
            # Command line: each option beside its value (fmt: skip).
            run(
                [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                 "start"],
                f"starting the {self.name} {role}",
                timeout=90,
                cwd=self._base,
                env=env,
                # Own session: a Ctrl-C meant for us must not reach the postmaster.
                extra={**as_postgres_user(), "start_new_session": True},
            )  # fmt: skip
        except StackError as exc:
            raise StackError(f"{exc}\n--- {log} ---\n{log_tail(log)}") from None

    def stop(self, keep_files: bool = False) -> None:
        """Stop the replica and the writer (fast mode, then by signal), then remove their files."""
        if self._base is None:
            return
        for data in (self._replica_dir, self._writer_dir):
            self._stop_instance(data)
        if not keep_files:
            shutil.rmtree(self._base, ignore_errors=True)
        self._base = None

    def _stop_instance(self, data: Path) -> None:
        pid_file = data / "postmaster.pid"
        if not pid_file.exists():
            return
        try:
            # Command line: each option beside its value (fmt: skip).
            run(
                [str(find_bin_dir() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "30",
                 "stop"],
                f"stopping {data}",
                timeout=40,
                cwd=self._base,
                extra=as_postgres_user(),
            )  # fmt: skip
        except StackError:
            _kill_postmaster(pid_file)


def _postmaster_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


def _kill_postmaster(pid_file: Path) -> None:
    """Last resort when pg_ctl could not stop it: SIGQUIT (immediate shutdown), then SIGKILL."""
    pid = _postmaster_pid(pid_file)
    if pid is None:
        return
    for sig in (signal.SIGQUIT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
