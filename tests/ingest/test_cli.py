"""`runops batch stream` / `runops batch watch` against the in-process ingest server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from runops.cli.main import main
from runops.runstore.v1 import runstore_pb2 as rs
from services.ingest.app import Ingest
from tests.controlplane.harness import Seeded
from tests.ingest.harness import Suite
from tests.ingest.test_service import all_runs
from tests.runstore.harness import stub as runstore_stub


async def test_stream_an_ndjson_file_then_watch(
    ingest: Ingest, seeded: Seeded, suite: Suite, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "items.ndjson"
    lines = [json.dumps({"task": "email/send", "payload": {"n": i}}) for i in range(250)]
    lines.insert(3, "")  # blank lines are skipped
    path.write_text("\n".join(lines) + "\n")
    args = ["--target", ingest.app.target, "--api-key", seeded.api_key]
    code = await asyncio.to_thread(main, ["batch", "stream", str(path), *args])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "sealed=True" in out.out
    assert "accepted=250/250" in out.out
    assert "250/250 items" in out.err  # the progress line
    batch_id = out.out.split()[1].rstrip(":")
    runs = await all_runs(suite, batch_id, seeded.env_id)
    assert [json.loads(r.payload) for r in runs] == [{"n": i} for i in range(250)]

    # The watch ends once every run completed (completed here through the run store).
    watch = asyncio.create_task(asyncio.to_thread(main, ["batch", "watch", batch_id, *args]))
    store = runstore_stub(suite.runstore_target)
    for run in runs:
        await store.CompleteRun(
            rs.CompleteRunRequest(
                run_id=run.friendly_id, environment_id=seeded.env_id, success=rs.RunSuccess()
            )
        )
    assert await asyncio.wait_for(watch, 30) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith(f"{batch_id} COMPLETED sealed=True accepted=250/250")


async def test_bad_file_and_missing_key_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In a thread: asyncio.run would leave this thread without the session's event loop.
    for name in ("RUNOPS_API_KEY", "RUNOPS_DEMO_API_KEY", "RUNOPS_INGEST_TARGET"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "bad.ndjson"
    path.write_text('{"task": "a/b"}\nnot json\n')
    # No API key anywhere: exit 2 before any call.
    assert await asyncio.to_thread(main, ["batch", "stream", str(path), "--target", "h:1"]) == 2
    missing = ["batch", "stream", str(tmp_path / "none"), "--target", "h:1", "--api-key", "k"]
    assert await asyncio.to_thread(main, missing) == 2


async def test_stream_of_an_aborted_batch_exits_1_saying_why(
    ingest: Ingest, seeded: Seeded, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every payload above the service's item maximum (16 KiB here): the seal aborts the batch.
    path = tmp_path / "too-big.ndjson"
    line = json.dumps({"task": "email/send", "payload": "z" * 20_000})
    path.write_text(f"{line}\n{line}\n")
    args = ["batch", "stream", str(path), "--target", ingest.app.target]
    args += ["--api-key", seeded.api_key, "--idempotency-key", "cli-aborted"]
    for _ in ("fresh", "cached"):
        code = await asyncio.to_thread(main, args)
        out = capsys.readouterr()
        assert code == 1
        assert out.out == ""
        errors = [line for line in out.err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, out.err
        assert errors[0].endswith("was aborted (every item failed); create a new batch")
