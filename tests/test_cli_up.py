"""`runops up`'s own arguments: a bad one is argparse's usage line and one error line, exit 2,
before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from runops.cli.main import main


@pytest.mark.parametrize(
    ("argv", "wanted"),
    [
        (["--replicas", "0"], "argument --replicas: expected a whole number >= 1, got '0'"),
        (["--replicas", "two"], "argument --replicas: expected a whole number >= 1, got 'two'"),
        (["--state-dir", "{file}"], "exists and is not a directory"),
    ],
)
def test_a_bad_argument_exits_2_before_anything_starts(
    argv: list[str], wanted: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "state"
    a_file.write_text("")
    with pytest.raises(SystemExit) as exited:
        main(["up", "--check", *(arg.format(file=a_file) for arg in argv)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "error: " in line] == [
        next(line for line in err.splitlines() if wanted in line)
    ]


def test_a_state_dir_that_cannot_be_made_is_one_error_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # /proc refuses new directories, even to root (the suite may run as root).
    assert main(["up", "--check", "--state-dir", "/proc/runops-state"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: cannot write /proc/runops-state: No such file or directory (pass --state-dir a "
        "writable directory, or free some space)"
    ], err
