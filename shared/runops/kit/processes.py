"""RUNOPS_PROCESSES > 1: N server processes on one port (after grpc's examples/python/
multiprocessing), supervised by the process that was started.

A grpc.aio server runs on one event loop, so one process uses one core. The parent reserves
the port (a bound, non-listening SO_REUSEPORT socket: it learns the port when 0 was asked for,
fails early when another program holds it, and keeps it ours while children come and go), then
starts the children; each binds the same port with SO_REUSEPORT and the kernel spreads incoming
connections across them. The parent never serves RPCs.

Children are *spawned* (a fresh interpreter, multiprocessing's "spawn" context), not forked:
the parent has imported grpc, and a fork of a process whose gRPC core may have started threads
is unsafe (gRPC's fork support is off, and does not cover grpc.aio). A spawned child imports
everything anew and builds its own server, pools, caches and invalidation feed after it starts,
so nothing is shared by accident; the settings reach it pickled, already validated.

Metrics: prometheus-client's multiprocess mode. Children write their samples to files in
PROMETHEUS_MULTIPROC_DIR (set before they import prometheus_client); the parent serves their
sum on RUNOPS_METRICS_PORT. One scrape target per pod whatever the process count (so `auto`
needs no manifest change); the directory is the parent's own temporary one unless set.

Shutdown: SIGTERM (or SIGINT) to the parent is forwarded to every child, each runs its own
graceful shutdown, and the parent exits 0 once all of them exited 0. A child that exits
without being asked (a crash, an OOM kill) makes the parent stop the others and exit non-zero:
the orchestrator restarts the whole pod, which is visible, instead of the parent quietly
restarting children in a loop. A child whose parent died stops itself.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import structlog
from prometheus_client import CollectorRegistry, multiprocess

from runops.kit.metrics import MetricsServer
from runops.kit.settings import ServerSettings, SettingsError

log = structlog.get_logger("runops.processes")

SettingsT = TypeVar("SettingsT", bound=ServerSettings)
# target(settings, index, parent_pid): serves until SIGTERM; must be importable (pickled by name).
ChildMain = Callable[[Any, int, int], None]

METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
# How long past a child's own grace period the parent waits before SIGKILL.
KILL_MARGIN_SECONDS = 10.0


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound SO_REUSEPORT socket on host:port (port 0: a free one); never listens, so it
    takes no connections; close it to release the port."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise SettingsError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


class Supervisor:
    def __init__(self, name: str, settings: ServerSettings, child_main: ChildMain) -> None:
        self.name = name
        self.settings = settings
        self._child_main = child_main
        self._children: list[Any] = []  # multiprocessing's SpawnProcess
        self._stopping = False

    def run(self) -> int:
        """Serve with `settings.processes` children until told to stop; the exit status."""
        settings = self.settings
        reserved = reserve_port(settings.grpc_host, settings.grpc_port)
        metrics_dir, own_dir = self._metrics_dir()
        metrics = None
        try:
            port = reserved.getsockname()[1]
            child_settings = settings.model_copy(update={"grpc_port": port, "metrics_port": -1})
            if metrics_dir is not None:
                registry = CollectorRegistry()
                multiprocess.MultiProcessCollector(registry, path=str(metrics_dir))  # type: ignore[no-untyped-call]
                metrics = MetricsServer(settings.metrics_host, settings.metrics_port, registry)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
            context = multiprocessing.get_context("spawn")
            for index in range(settings.processes):
                child = context.Process(
                    target=self._child_main,
                    args=(child_settings, index, os.getpid()),
                    name=f"{self.name}-{index}",
                )
                child.start()
                self._children.append(child)
            log.info(
                "serving with processes",
                service=self.name,
                port=port,
                processes=settings.processes,
                pids=[child.pid for child in self._children],
                metrics_port=None if metrics is None else metrics.port,
            )
            return self._supervise(metrics_dir)
        finally:
            self._stop_children()
            for child in self._children:
                child.join(timeout=KILL_MARGIN_SECONDS)
                if child.is_alive():
                    child.kill()
            if metrics is not None:
                metrics.stop()
            if own_dir:
                shutil.rmtree(metrics_dir or "", ignore_errors=True)
            reserved.close()

    def _metrics_dir(self) -> tuple[Path | None, bool]:
        if self.settings.metrics_port < 0:
            return None, False
        given = os.environ.get(METRICS_DIR_VARIABLE)
        if given:
            # Samples of a previous run would be added to ours.
            path = Path(given)
            path.mkdir(parents=True, exist_ok=True)
            for old in path.glob("*.db"):
                old.unlink()
            return path, False
        path = Path(tempfile.mkdtemp(prefix=f"runops-{self.name}-metrics-"))
        os.environ[METRICS_DIR_VARIABLE] = str(path)  # inherited by the children
        return path, True

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("stopping every process", signal=signal.Signals(signum).name)
        self._stop_children()

    def _stop_children(self) -> None:
        self._stopping = True
        for child in self._children:
            if child.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)

    def _supervise(self, metrics_dir: Path | None) -> int:
        status = 0
        alive = list(self._children)
        kill_at: float | None = None
        while alive:
            if self._stopping and kill_at is None:
                kill_at = time.monotonic() + (
                    self.settings.shutdown_delay_seconds
                    + self.settings.grace_period_seconds
                    + KILL_MARGIN_SECONDS
                )
            if kill_at is not None and time.monotonic() > kill_at:
                log.error(
                    "processes did not stop in time; killing them", pids=[c.pid for c in alive]
                )
                for child in alive:
                    child.kill()
                status = status or 1
                kill_at = float("inf")
            # A bounded wait: a signal handler has run when it returns (PEP 475 retries it).
            ended = multiprocessing.connection.wait([child.sentinel for child in alive], 0.5)
            for child in [c for c in alive if c.sentinel in ended]:
                child.join()
                alive.remove(child)
                code = child.exitcode
                if metrics_dir is not None:
                    multiprocess.mark_process_dead(child.pid, str(metrics_dir))  # type: ignore[no-untyped-call]
                if not self._stopping:
                    log.error(
                        "a process exited unexpectedly; stopping the others",
                        pid=child.pid,
                        exitcode=code,
                    )
                    self._stop_children()
                    status = status or (code if code and code > 0 else 1)
                elif code != 0:
                    log.warning("a process did not stop cleanly", pid=child.pid, exitcode=code)
                    status = status or (code if code and code > 0 else 1)
        log.info("every process stopped", status=status)
        return status
