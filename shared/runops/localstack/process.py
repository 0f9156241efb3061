"""Running the stack's server processes: as which user, with logs, and stopping them for sure."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

# PostgreSQL refuses to run as root; this system user exists wherever postgresql is installed.
POSTGRES_USER = "postgres"


class StackError(RuntimeError):
    """A local server could not be started; the message says what to do about it."""


def as_postgres_user() -> dict[str, Any]:
    """Popen/run keyword arguments that drop root to the postgres user (nothing when not root)."""
    if os.geteuid() != 0:
        return {}
    try:
        pwd.getpwnam(POSTGRES_USER)
    except KeyError:
        raise StackError(
            "running as root, but there is no 'postgres' user to run PostgreSQL as: "
            "apt-get install postgresql-15 (it creates the user) or run as a normal user"
        ) from None
    return {"user": POSTGRES_USER, "group": POSTGRES_USER, "extra_groups": []}


def chown_to_postgres(path: Path) -> None:
    """Give a directory to the user PostgreSQL runs as (a no-op when not root)."""
    if os.geteuid() == 0:
        entry = pwd.getpwnam(POSTGRES_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def run(
    cmd: Sequence[str],
    what: str,
    *,
    timeout: float = 60,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Run a command to completion; raise StackError with its output when it fails."""
    try:
        done = subprocess.run(
            list(cmd),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            check=False,
            **dict(extra or {}),
        )
    except subprocess.TimeoutExpired:
        raise StackError(f"{what} did not finish within {timeout:.0f}s: {' '.join(cmd)}") from None
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()
        raise StackError(f"{what} failed (exit {done.returncode}): {' '.join(cmd)}\n{output}")
    return str(done.stdout)


def spawn(
    cmd: Sequence[str],
    log_file: Path,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-running server with its output in log_file.

    It gets its own session so a Ctrl-C in the terminal reaches only us: we stop the servers in
    order instead of all of them dying at once.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        return subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )


def terminate(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM, wait, then SIGKILL: the process is gone when this returns."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def log_tail(log_file: Path, lines: int = 20) -> str:
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class LocalServer:
    """A server process the stack started, and the directory it keeps its files in."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._proc: subprocess.Popen[bytes] | None = None

    def _start(
        self,
        cmd: Sequence[str],
        log_file: Path,
        ready: Callable[[], bool],
        what: str,
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Spawn `cmd` and wait until `ready()`; StackError with the log's tail if the process
        exits first or `timeout` passes."""
        self._dir.mkdir(parents=True, exist_ok=True)
        self._proc = spawn(cmd, log_file, cwd=self._dir, env=env)
        deadline = time.monotonic() + timeout
        while not ready():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise StackError(f"{what} did not start:\n{log_tail(log_file)}")
            time.sleep(0.02)

    def stop(self, keep_files: bool = False) -> None:
        if self._proc is not None:
            terminate(self._proc)
            self._proc = None
        if not keep_files:
            shutil.rmtree(self._dir, ignore_errors=True)
