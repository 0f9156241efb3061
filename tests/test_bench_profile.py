"""`runops bench --profile DIR`: py-spy records the service and the load generator of each
measured phase, and the summary names their top frames (the run-store benchmark, tiny sizes, on
the session's stack); without py-spy, one clear line."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from runops.bench import profile
from runops.bench.runstore import run
from runops.bench.suite import SIZES
from runops.cli import bench
from runops.localstack import LocalStack


@pytest.mark.slow
async def test_profile_writes_a_file_per_process_per_phase_and_a_summary(
    stack: LocalStack, tmp_path: Path
) -> None:
    profiler = profile.start(tmp_path)
    try:
        with profile.benchmark("runstore"):
            await run(stack, **SIZES["runstore"]["smoke"])
    finally:
        profile.stop()
    summary = profiler.write_summary().read_text()

    phases = {r.phase for r in profiler.recordings}
    assert {"CreateRuns (gRPC)", "bare servicer GetRun (grpc.aio, no interceptor)"} <= phases
    create = [r for r in profiler.recordings if r.phase == "CreateRuns (gRPC)"]
    assert {r.process for r in create} == {"runstore", "loadgen"}
    for recording in create:
        assert recording.error == "", recording
        assert recording.path.name == f"runstore-createruns-grpc-{recording.process}.txt"
        assert recording.seconds > 0
        assert profile.read(recording.path).samples > 0, recording
    # The 2-process run store: its supervisor and each of its two server processes.
    create_2 = [r for r in profiler.recordings if r.phase == "CreateRuns (gRPC), 2 processes"]
    children = [r for r in create_2 if r.process.startswith("runstore-2-processes-child-")]
    assert len(children) == 2, [r.process for r in create_2]
    assert max(profile.read(r.path).busy_samples for r in children) > 0

    assert "## runstore: CreateRuns (gRPC)" in summary
    assert "**runstore** (pid" in summary
    assert "busy" in summary
    frames = [line for line in summary.splitlines() if line.startswith("| ") and "% | `" in line]
    assert frames, summary


def test_a_frame_is_its_function_and_short_path(tmp_path: Path) -> None:
    raw = tmp_path / "x.txt"
    raw.write_text(
        'process 7:"python -m services.runstore";<module> (/w/shared/runops/a.py:3);'
        "write (/usr/lib/python3.11/site-packages/asyncpg/pool.py:10) 3\n"
        'process 7:"python";run (/w/shared/runops/a.py:9);'
        "select (/usr/lib/python3.11/selectors.py:468) 1\n"
    )
    read = profile.read(raw)
    assert read.samples == 4
    assert read.self_time == {"write (asyncpg/pool.py)": 3, "select (python3.11/selectors.py)": 1}
    assert read.busy_samples == 3  # the event loop's select is a wait


def test_profile_without_py_spy_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(profile, "py_spy", lambda: None)
    args = argparse.Namespace(only=["runstore"], durable=False, smoke=True, profile=tmp_path)
    assert bench.command(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "pip install py-spy" in err[0]
