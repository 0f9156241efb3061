"""`runops batch stream` / `runops batch watch` against the in-process ingest server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import pytest

from runops.cli.main import main
from runops.localstack.ports import free_port
from runops.runstore.v1 import runstore_pb2 as rs
from services.ingest.app import Ingest
from tests.controlplane.harness import Seeded
from tests.harness import without_log_lines
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
    stdout = without_log_lines(out.out)
    assert code == 0, out.err
    assert "sealed=True" in stdout
    assert "accepted=250/250" in stdout
    assert "250/250 items" in out.err  # the progress line
    batch_id = stdout.split()[1].rstrip(":")
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
    lines = without_log_lines(capsys.readouterr().out).splitlines()
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


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `runops ARGV`."""
    code = main(argv)
    captured = capsys.readouterr()
    return code, without_log_lines(captured.out), captured.err


def _one_error_line(err: str) -> str:
    """stderr holds exactly one `error: ...` line (a progress line aside), no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


BAD_LINES = [
    ('{"task": "a/b", "payl', "invalid JSON: Unterminated string"),
    ("[1, 2]", "expected a JSON object, got [1, 2]"),
    ('{"task": 5}', "task must be a string, got 5"),
    ('{"payload": {}}', "no task (give one, or --task)"),
    ('{"task": "a/b", "index": "7"}', 'index must be an integer from 0 to 2^32-1, got "7"'),
    ('{"task": "a/b", "index": 1.5}', "index must be an integer from 0 to 2^32-1, got 1.5"),
    ('{"task": "a/b", "payload_type": false}', "payload_type must be a string, got false"),
    ('{"task": "a/b", "payload": NaN}', "NaN is not JSON"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_LINES, ids=[r for _, r in BAD_LINES])
async def test_a_bad_line_is_named_with_its_reason_and_creates_no_batch(
    line: str,
    reason: str,
    ingest: Ingest,
    seeded: Seeded,
    runops_writer: asyncpg.Connection,
    controlplane_writer: asyncpg.Connection,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The bad line is the last one, with no newline after it (a truncated file): every line
    is parsed before CreateBatch, so the file is refused whole (it used to crash mid-stream
    with a CancelledError traceback, leaving an unsealed batch behind)."""
    path = tmp_path / "items.ndjson"
    path.write_text('{"task": "a/b"}\n\n{"task": "a/b"}\n' + line)
    args = ["--target", ingest.app.target, "--api-key", seeded.api_key]
    code, out, err = await asyncio.to_thread(
        _run_cli, ["batch", "stream", str(path), *args], capsys
    )
    assert code == 2
    assert out == ""
    assert _one_error_line(err).startswith(f"error: {path}:4: {reason}")
    for db in (runops_writer, controlplane_writer):
        found = await db.fetchval(
            "SELECT count(*) FROM batches WHERE environment_id = $1", seeded.env_id
        )
        assert found == 0


async def test_bad_files_state_dirs_and_targets_get_one_line_each(
    ingest: Ingest, seeded: Seeded, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.ndjson"
    good.write_text('{"task": "a/b"}\n')
    empty = tmp_path / "empty.ndjson"
    empty.write_text("\n\n")
    binary = tmp_path / "binary.ndjson"
    binary.write_bytes(b'{"task": "\xff\xfe"}\n')
    broken_env = tmp_path / "broken"
    broken_env.mkdir()
    (broken_env / "runops.env").write_text("export RUNOPS_INGEST_TARGET='unterminated\n")
    closed = f"127.0.0.1:{free_port()}"
    args = ["--target", ingest.app.target, "--api-key", seeded.api_key]
    cases = [
        # (argv, exit code, what the error line says)
        (["batch", "stream", str(tmp_path / "absent.ndjson"), *args], 2, "is not a file"),
        (["batch", "stream", str(tmp_path), *args], 2, "is not a file"),
        (["batch", "stream", str(empty), *args], 2, "holds no items"),
        (["batch", "stream", str(binary), *args], 2, f"{binary}:1: not UTF-8 text"),
        (["batch", "watch", "x", "--state-dir", str(broken_env)], 2, "No closing quotation"),
        (["batch", "watch", "batch_unknown", *args], 1, "NOT_FOUND"),
        (
            ["batch", "stream", str(good), "--target", ingest.app.target, "--api-key", "rk_bad"],
            1,
            "UNAUTHENTICATED",
        ),
        (["batch", "watch", "batch_x", "--target", closed, "--api-key", "k"], 1, "UNAVAILABLE"),
    ]
    for argv, wanted_code, wanted in cases:
        code, out, err = await asyncio.to_thread(_run_cli, argv, capsys)
        assert (code, out) == (wanted_code, ""), (argv, out, err)
        assert wanted in _one_error_line(err), (argv, err)


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
        assert without_log_lines(out.out) == ""
        errors = [line for line in out.err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, out.err
        assert errors[0].endswith("was aborted (every item failed); create a new batch")
