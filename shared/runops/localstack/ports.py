"""Free loopback ports and waiting for a server to listen on one."""

from __future__ import annotations

import random
import socket
import threading
import time

HOST = "127.0.0.1"
# A Redis Cluster node also listens on port + 10000 (its bus), so cluster ports stay below this.
CLUSTER_MAX_PORT = 55535

_lock = threading.Lock()
# Ports this process already handed out: the OS may offer the same free port twice before the
# first server binds it.
_handed_out: set[int] = set()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 that this process has not handed out before."""
    with _lock:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((HOST, 0))
                port = int(sock.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError("no free TCP port on 127.0.0.1: too many servers running?")


def free_cluster_port() -> int:
    """A free port <= 55535 whose bus port (port + 10000) is free as well."""
    with _lock:
        for _ in range(500):
            port = random.randint(20000, CLUSTER_MAX_PORT)
            if port in _handed_out or port + 10000 in _handed_out:
                continue
            if _bindable(port) and _bindable(port + 10000):
                _handed_out.update((port, port + 10000))
                return port
    raise RuntimeError("no free port pair (port, port + 10000) below 55535 on 127.0.0.1")


def is_listening(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_for_port(port: int, timeout: float, what: str, host: str = HOST) -> None:
    """Block until something accepts TCP connections on host:port, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while not is_listening(port, host):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not listen on {host}:{port} within {timeout:.0f}s")
        time.sleep(0.02)
