"""Free loopback ports and waiting for a server to listen on one."""

from __future__ import annotations

import fcntl
import os
import random
import socket
import tempfile
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"
# A Redis Cluster node also listens on port + 10000 (its bus), so cluster ports stay below this.
CLUSTER_MAX_PORT = 55535

_lock = threading.Lock()
# Ports this process already handed out: the OS may offer the same free port twice before the
# first server binds it.
_handed_out: set[int] = set()
# Another process on the machine (a second test session, `runops up`) may be offered the same
# free port before either server binds it, and two servers with SO_REUSEPORT (same user) would
# then share it silently. A port handed out holds a byte-range lock at offset `port` of one file,
# released by the kernel when this process exits; other processes skip ports they cannot lock.
CLAIMS_FILE = Path(tempfile.gettempdir()) / "runops-ports.lock"
_claims_fd: int | None = None


def _claimed_machine_wide(port: int) -> bool:
    global _claims_fd
    if _claims_fd is None:
        try:
            _claims_fd = os.open(CLAIMS_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return True  # no shared file (another user's, read-only /tmp): this process's view
    try:
        fcntl.lockf(_claims_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, port, os.SEEK_SET)
    except OSError:
        return False
    return True


def _hand_out(*ports: int) -> bool:
    """Take `ports` if neither this process nor another on the machine has them."""
    if any(port in _handed_out for port in ports):
        return False
    if not all(_claimed_machine_wide(port) for port in ports):
        return False
    _handed_out.update(ports)
    return True


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 that no process on this machine was handed before
    (this one, or another still running)."""
    with _lock:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((HOST, 0))
                port = int(sock.getsockname()[1])
            if _hand_out(port):
                return port
    raise RuntimeError("no free TCP port on 127.0.0.1: too many servers running?")


def free_cluster_port() -> int:
    """A free port <= 55535 whose bus port (port + 10000) is free as well."""
    with _lock:
        for _ in range(500):
            port = random.randint(20000, CLUSTER_MAX_PORT)
            if _bindable(port) and _bindable(port + 10000) and _hand_out(port, port + 10000):
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
