"""redis-server as local processes: one standalone server, and a 3-master Redis Cluster."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runops.localstack.ports import HOST, free_cluster_port, free_port
from runops.localstack.process import LocalServer, StackError, run

Progress = Callable[[str], None]
CLUSTER_SIZE = 3
# Failover is never exercised locally; a short node timeout only matters if a node dies.
_CLUSTER_ARGS = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", "5000"]  # fmt: skip


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise StackError(f"{name} not found on PATH: apt-get install redis-server redis-tools")
    return found


def _ping(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class _RedisProcess(LocalServer):
    """One redis-server in its own directory, persisted by its append-only file: every write is
    logged and fsynced once a second (`appendfsync everysec`), so a restart (SHUTDOWN, SIGTERM)
    keeps everything and a crash loses at most about the last second (docs/mollifier.md). No
    RDB snapshots."""

    def __init__(self, directory: Path, port: int, extra_args: list[str]) -> None:
        super().__init__(directory)
        self.port = port
        self._extra = extra_args

    @property
    def log_file(self) -> Path:
        return self._dir / "redis.log"

    def start(self, timeout: float = 20) -> None:
        cmd = [
            _binary("redis-server"),
            "--port", str(self.port), "--bind", HOST, "--dir", str(self._dir),
            "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
            "--daemonize", "no", *self._extra,
        ]  # fmt: skip
        self._start(
            cmd,
            self.log_file,
            lambda: _ping(self.port),
            f"redis-server on port {self.port}",
            timeout=timeout,
        )

    def kill(self) -> None:
        """SIGKILL (a crash): no shutdown fsync; the files stay for a restart."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise RuntimeError(f"the redis-server on port {self.port} is not running")
        proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)


class RedisServer:
    """A standalone Redis on a free loopback port."""

    def __init__(self, state_dir: Path, port: int | None = None) -> None:
        self.port = port if port is not None else free_port()
        self._server = _RedisProcess(state_dir / "redis", self.port, [])

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        self._server.start()

    def stop(self, keep_files: bool = False) -> None:
        """SIGTERM: Redis fsyncs its append-only file and exits. keep_files=True keeps the
        data for start() again."""
        self._server.stop(keep_files)

    def kill(self) -> None:
        """SIGKILL, keeping the files: start() again recovers what reached the disk."""
        self._server.kill()

    def suspended(self) -> contextlib.AbstractContextManager[None]:
        """`with server.suspended():` Redis hangs inside (SIGSTOP): it accepts TCP connections
        but answers nothing. SIGCONT on the way out, whatever happened."""
        return self._server.suspended()


class RedisCluster:
    """Three cluster-enabled masters (no replicas) owning all 16384 slots between them."""

    def __init__(self, state_dir: Path, progress: Progress | None = None) -> None:
        self.ports = [free_cluster_port() for _ in range(CLUSTER_SIZE)]
        self._progress = progress or (lambda _line: None)
        self._nodes = [
            _RedisProcess(state_dir / "redis-cluster" / str(port), port, _CLUSTER_ARGS)
            for port in self.ports
        ]
        self._root = state_dir / "redis-cluster"

    @property
    def nodes(self) -> list[str]:
        """host:port of every master (what RedisCluster clients take as startup nodes)."""
        return [f"{HOST}:{port}" for port in self.ports]

    def start(self, timeout: float = 30) -> None:
        with ThreadPoolExecutor(CLUSTER_SIZE) as pool:
            list(pool.map(lambda node: node.start(), self._nodes))
        cli = _binary("redis-cli")
        run(
            [cli, "--cluster", "create", *self.nodes, "--cluster-replicas", "0", "--cluster-yes"],
            "forming the Redis Cluster (redis-cli --cluster create)",
            timeout=timeout,
        )
        deadline = time.monotonic() + timeout
        for port in self.ports:
            while "cluster_state:ok" not in run(
                [cli, "-h", HOST, "-p", str(port), "cluster", "info"], "redis-cli cluster info"
            ):
                if time.monotonic() > deadline:
                    raise StackError(f"Redis Cluster not ok within {timeout:.0f}s (node {port})")
                time.sleep(0.05)
        self._progress(f"redis cluster ready on {','.join(self.nodes)}")

    def stop(self, keep_files: bool = False) -> None:
        for node in self._nodes:
            node.stop(keep_files)
        if not keep_files:
            shutil.rmtree(self._root, ignore_errors=True)
