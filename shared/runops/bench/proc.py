"""What the benchmarks read about processes and the machine (Linux `/proc`): CPU seconds, RSS,
the machine's busy share, and the local postmaster behind a DSN. Every reader answers None (or
0.0) where `/proc` has nothing to say: a process gone, a server on another host."""

from __future__ import annotations

import os
import resource

import asyncpg


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from the state field on (field 3 is [0]), or None."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (0.0 once it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree_cpu(root: int) -> float | None:
    """CPU seconds of `root` (with its reaped children) and of its live children: a postmaster
    and its backends, walreceiver, startup process..."""
    fields = _stat_fields(root)
    if fields is None:
        return None
    ticks = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and entry.name != str(root):
            child = _stat_fields(int(entry.name))
            if child is not None and child[1] == str(root):
                ticks += int(child[11]) + int(child[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int | None, key: str) -> int | None:
    """A `VmRSS` / `VmHWM` line of /proc/<pid>/status, in KiB (None once the process is gone,
    or for no pid)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux: "5" to /proc/<pid>/clear_refs), so a
    later VmHWM is the peak of what came after. False when not permitted."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def machine_jiffies() -> tuple[int, int] | None:
    """Busy and total jiffies of all CPUs since boot."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal (guest time is already in user).
    values = [int(v) for v in fields[1:9]]
    idle = values[3] + values[4]
    total = sum(values)
    return total - idle, total


def machine_cores(start: tuple[int, int] | None, end: tuple[int, int] | None) -> float | None:
    """The cores the whole machine kept busy between two `machine_jiffies()` samples."""
    if start is None or end is None:
        return None
    busy, total = (e - s for s, e in zip(start, end, strict=True))
    return busy / total * (os.cpu_count() or 1) if total > 0 else None


async def local_postmaster(dsn: str) -> int | None:
    """The pid of the postmaster serving `dsn` when it runs on this machine, else None."""
    conn = await asyncpg.connect(dsn)
    try:
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        # While the connection is open: the backend exits with it.
        return _postgres_parent(backend) if isinstance(backend, int) else None
    finally:
        await conn.close()


def _postgres_parent(backend: int) -> int | None:
    """The parent of `backend` if it is a local postgres (not a server elsewhere that happens
    to share a pid with something here)."""
    fields = _stat_fields(backend)
    if fields is None:
        return None
    postmaster = int(fields[1])
    try:
        with open(f"/proc/{postmaster}/comm") as comm:
            name = comm.read().strip()
        with open(f"/proc/{backend}/comm") as comm:
            backend_name = comm.read().strip()
    except OSError:
        return None
    return postmaster if name.startswith("postgres") and backend_name == "postgres" else None
