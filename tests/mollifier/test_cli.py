"""`runops mollifier trigger|burst|stats` in-process against a mollifier on the session stack:
the buffer's stats as a table, and every failure as one `error:` line with a non-zero exit."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from google.protobuf import duration_pb2

from runops.cli.main import main
from runops.cli.mollifier import TARGET_ENV, TOKEN_ENV, stats_table
from runops.localstack import LocalStack
from runops.localstack.ports import free_port
from runops.localstack.settings import INTERNAL_TOKEN
from runops.mollifier.v1 import mollifier_pb2 as m
from services.mollifier.app import Mollifier
from tests.controlplane.harness import Seeded
from tests.harness import without_log_lines
from tests.mollifier.service_harness import TRIPPED


@pytest.fixture
def redis_settings(stack: LocalStack) -> dict[str, Any]:
    """The standalone Redis only: the CLI does not care which Redis the service runs on."""
    return {"url": stack.redis_url}


@pytest.fixture(autouse=True)
def _no_ambient_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (TARGET_ENV, TOKEN_ENV, "RUNOPS_DEMO_ENVIRONMENT_ID"):
        monkeypatch.delenv(name, raising=False)


async def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `runops mollifier ARGV` (in a thread: it runs its own
    event loop). What the in-process services log is left out."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["mollifier", *argv])
    captured = capsys.readouterr()
    return code, without_log_lines(captured.out), captured.err


def test_stats_table_lines_up_each_environment_and_a_total() -> None:
    stats = m.GetBufferStatsResponse(
        environments=[
            m.EnvironmentBufferStats(
                environment_id="env_a", depth=1200, draining=3,
                oldest_entry_age=duration_pb2.Duration(seconds=4, nanos=250_000_000),
            ),
            m.EnvironmentBufferStats(environment_id="env_long_name", depth=7),
            m.EnvironmentBufferStats(environment_id="env_idle"),
        ],
        total_depth=1207,
        total_draining=3,
    )  # fmt: skip
    assert stats_table(stats).splitlines() == [
        "environment    depth  draining  oldest age",
        "env_a          1,200         3        4.2s",
        "env_long_name      7         0           -",
        "total          1,207         3",
    ]
    assert stats_table(m.GetBufferStatsResponse()) == "empty"
    assert stats_table(m.GetBufferStatsResponse(environments=[stats.environments[2]])) == "empty"


@pytest.fixture
async def tripped(
    services: Callable[..., Awaitable[Mollifier]], monkeypatch: pytest.MonkeyPatch
) -> Mollifier:
    """A mollifier whose gate trips at once (no drainer), and the CLI pointed at it."""
    service = await services(drainer_enabled=False, **TRIPPED)
    monkeypatch.setenv(TARGET_ENV, service.app.target)
    monkeypatch.setenv(TOKEN_ENV, INTERNAL_TOKEN)
    return service


async def test_stats_shows_the_buffer_a_burst_filled(
    tripped: Mollifier, env: Seeded, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await _run(["stats", "--env", env.env_id], capsys) == (0, "empty\n", "")

    code, out, err = await _run(
        ["burst", "--env", env.env_id, "--count", "6", "--concurrency", "1"], capsys
    )
    assert code == 0, err
    buffered = int(out.split(": ")[1].split()[0])
    assert buffered > 0, out
    code, out, err = await _run(["stats", "--env", env.env_id], capsys)
    assert code == 0, err
    header, row = out.splitlines()
    assert header.split() == ["environment", "depth", "draining", "oldest", "age"]
    cells = row.split()
    assert cells[:3] == [env.env_id, str(buffered), "0"]
    assert cells[3].endswith("s")


async def test_trigger_prints_one_line_per_run(
    tripped: Mollifier, env: Seeded, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = []
    for _ in range(2):
        code, out, err = await _run(["trigger", "--env", env.env_id], capsys)
        assert code == 0, err
        lines.append(out)
    # The first trigger goes through the open gate; the second trips it and is buffered.
    first, second = (line.rstrip("\n") for line in lines)
    assert "{" not in first + second, lines
    assert first.split()[0].startswith("run_"), first
    assert first.split()[1:] == ["PENDING", "(written", "to", "the", "run", "store)"], first
    assert second.split()[0].startswith("run_"), second
    assert "QUEUED (buffered)" in second, second


async def test_each_failure_is_one_error_line(
    services: Callable[..., Awaitable[Mollifier]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    service = await services(drainer_enabled=False, **TRIPPED)
    closed = f"127.0.0.1:{free_port()}"
    cases = [
        # (target, token, argv, exit code, what stderr says)
        (service.app.target, INTERNAL_TOKEN, ["trigger", "--env", "env_unknown"], 1,
         "error: environment env_unknown does not exist"),
        (service.app.target, INTERNAL_TOKEN, ["stats", "--env", "env_unknown"], 1,
         "error: environment env_unknown does not exist"),
        (service.app.target, INTERNAL_TOKEN, ["trigger", "--env", ""], 2,
         "environment_id: is required"),
        (service.app.target, "wrong", ["stats"], 1, f"(check ${TOKEN_ENV})"),
        (closed, INTERNAL_TOKEN, ["stats"], 1, f"(is the mollifier running at {closed}?)"),
    ]  # fmt: skip
    for target, token, argv, wanted_code, wanted in cases:
        monkeypatch.setenv(TARGET_ENV, target)
        monkeypatch.setenv(TOKEN_ENV, token)
        code, out, err = await _run(argv, capsys)
        assert (code, out) == (wanted_code, ""), (argv, err)
        assert "Traceback" not in err
        assert [line for line in err.splitlines() if line.startswith("error: ")], err
        assert wanted in err, (argv, err)
    # A wrong type is argparse's: usage and one error line, exit 2.
    with pytest.raises(SystemExit) as exited:
        main(["mollifier", "burst", "--count", "many"])
    assert exited.value.code == 2
    assert "expected a whole number >= 1, got 'many'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["mollifier", "burst", "--concurrency", "0"])
    assert "expected a whole number >= 1, got '0'" in capsys.readouterr().err
