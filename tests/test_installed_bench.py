"""`runops bench --smoke` from a wheel installed outside the checkout: the wheel carries the
benchmarks, the services they start and their data (migrations, Lua), and nothing is imported
from the checkout. Dependencies come from this machine (a venv with --system-site-packages)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What the build reads: pyproject.toml's packages (shared/, services/) and its readme.
SOURCES = ("pyproject.toml", "README.md", "shared", "services")

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"{done.args} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


def test_bench_smoke_from_an_installed_wheel(tmp_path: Path) -> None:
    # A copy of the sources, so the build's own files (build/, *.egg-info) stay out of the
    # checkout and a stale build/ there cannot leak into the wheel.
    source = tmp_path / "source"
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(
                REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    dist, venv, outside = tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
    outside.mkdir()
    _ok(_run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
              "-q", "-w", str(dist), str(source)], outside, 120))  # fmt: skip
    (wheel,) = dist.glob("runops-*.whl")
    _ok(_run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], outside, 120))
    python = venv / "bin" / "python"
    _ok(_run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
             outside, 120))  # fmt: skip

    # The venv imports the installed copy, not the checkout (nor an editable install of it).
    where = _ok(
        _run([str(python), "-c", "import runops, services; print(runops.__file__);"
              " print(services.__file__)"], outside, 60)
    ).split()  # fmt: skip
    site = (venv / "lib").resolve()
    assert len(where) == 2
    for path in where:
        assert Path(path).resolve().is_relative_to(site), where

    out = _ok(_run([str(venv / "bin" / "runops"), "bench", "--smoke"], outside, 300))
    assert "runops bench: 4 benchmarks" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("| benchmark"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == [
        "benchmark", "figure", "value", "spread", "raw floor", "ratio", "target", "met",
    ]  # fmt: skip
    benchmarks = {line.split("|")[1].strip() for line in lines if line.startswith("| ")}
    assert benchmarks >= {"control plane", "run store", "ingest", "mollifier"}
    assert "not built yet" not in out
