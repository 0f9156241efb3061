"""How many cores this process may use: its affinity mask, capped by its cgroup's CPU quota.

A container limited to 2 CPUs on a 64-core host sees 64 cores in its affinity mask; its limit
is a CFS quota (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`) set on its
cgroup or an ancestor. `RUNOPS_PROCESSES=auto` must follow the quota, or each of 64 processes
gets 1/32 of a core and every call waits on the scheduler.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

_PROC_CGROUP = Path("/proc/self/cgroup")
_CGROUP_ROOT = Path("/sys/fs/cgroup")
# Reads one cgroup directory's CPU limit (CPUs), None when it sets none.
_Reader = Callable[[Path], "float | None"]


def usable_cores(proc_cgroup: Path = _PROC_CGROUP, cgroup_root: Path = _CGROUP_ROOT) -> int:
    """Cores this process may run on: min(affinity, the tightest CPU quota on its cgroup path)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota(proc_cgroup, cgroup_root)
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def cpu_quota(proc_cgroup: Path = _PROC_CGROUP, cgroup_root: Path = _CGROUP_ROOT) -> float | None:
    """CPUs the cgroup quota allows (e.g. 1.5), the smallest along the path; None if unlimited
    or not readable (no cgroup filesystem, not Linux)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: "0::/path"
            limits += _along(cgroup_root, path, _v2_limit)
        elif "cpu" in controllers.split(","):  # cgroup v1: "N:cpu,cpuacct:/path"
            for mount in (controllers, "cpu", "cpu,cpuacct"):
                if (cgroup_root / mount).is_dir():
                    limits += _along(cgroup_root / mount, path, _v1_limit)
                    break
    return min(limits) if limits else None


def _along(mount: Path, path: str, read: _Reader) -> list[float]:
    """Limits on `path` and its ancestors under `mount`. Inside a container's cgroup namespace
    the path may not exist under the mount (it shows "/"): the mount root is then read."""
    found: list[float] = []
    here = mount / path.strip("/")
    while True:
        limit = read(here)
        if limit is not None:
            found.append(limit)
        if here == mount or mount not in here.parents:
            return found
        here = here.parent


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _v2_limit(cgroup: Path) -> float | None:
    text = _read(cgroup / "cpu.max")  # "max 100000" or "150000 100000"
    if text is None:
        return None
    quota, _, period = text.partition(" ")
    if quota == "max" or not period:
        return None
    return int(quota) / int(period)


def _v1_limit(cgroup: Path) -> float | None:
    quota, period = _read(cgroup / "cpu.cfs_quota_us"), _read(cgroup / "cpu.cfs_period_us")
    if quota is None or period is None or int(quota) <= 0:  # -1: unlimited
        return None
    return int(quota) / int(period)
