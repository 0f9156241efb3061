"""RUNOPS_PROCESSES=auto follows a container's CPU quota (cgroup v1 and v2), not the host's cores."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from runops.kit.cores import cpu_quota, usable_cores

_V1_CPU = Path("/sys/fs/cgroup/cpu")
_AFFINITY = len(os.sched_getaffinity(0))


def _v2_tree(tmp_path: Path, limits: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup v2 mount under tmp_path with `cpu.max` files at the given relative paths."""
    root = tmp_path / "cgroup"
    for rel, text in limits.items():
        (root / rel).mkdir(parents=True, exist_ok=True)
        (root / rel / "cpu.max").write_text(text + "\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("0::/kubepods/pod1/ctr\n")
    (root / "kubepods/pod1/ctr").mkdir(parents=True, exist_ok=True)
    return proc, root


def test_v2_the_tightest_quota_on_the_path_wins_rounded_up(tmp_path: Path) -> None:
    proc, root = _v2_tree(
        tmp_path, {"kubepods": "800000 100000", "kubepods/pod1": "150000 100000", "": "max 100000"}
    )
    assert cpu_quota(proc, root) == 1.5
    assert usable_cores(proc, root) == min(_AFFINITY, 2)


def test_v2_unlimited_everywhere_is_the_affinity(tmp_path: Path) -> None:
    proc, root = _v2_tree(tmp_path, {"kubepods/pod1/ctr": "max 100000"})
    assert cpu_quota(proc, root) is None
    assert usable_cores(proc, root) == _AFFINITY


def test_v2_inside_a_namespace_reads_the_mount_root(tmp_path: Path) -> None:
    # In a container's cgroup namespace /proc/self/cgroup says "/" and the limit is on the root.
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cpu.max").write_text("50000 100000\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("0::/\n")
    assert cpu_quota(proc, root) == 0.5
    assert usable_cores(proc, root) == 1


def test_v1_quota_and_unlimited(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    cpu = root / "cpu,cpuacct" / "docker" / "abc"
    cpu.mkdir(parents=True)
    (cpu / "cpu.cfs_quota_us").write_text("300000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    (root / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cpu_quota(proc, root) == 3.0
    assert usable_cores(proc, root) == min(_AFFINITY, 3)


def test_no_cgroup_filesystem_is_the_affinity(tmp_path: Path) -> None:
    assert cpu_quota(tmp_path / "missing", tmp_path) is None
    assert usable_cores(tmp_path / "missing", tmp_path) == _AFFINITY


def test_auto_processes_in_a_real_cgroup_with_a_one_cpu_quota() -> None:
    """A real cgroup v1 child with a 1-CPU quota: the server settings resolve auto to 1."""
    if not os.access(_V1_CPU, os.W_OK):
        pytest.skip("no writable cgroup v1 cpu controller here (needs root outside a cgroup ns)")
    group = _V1_CPU / f"runops-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("100000")
        program = (
            "from runops.kit.settings import ServerSettings;"
            "print(ServerSettings(processes='auto').processes)"
        )
        # The shell joins the group first, then becomes Python: the quota applies from its start.
        shell = f'echo $$ > {group}/cgroup.procs && exec {sys.executable} -c "{program}"'
        out = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "1"
    finally:
        group.rmdir()
