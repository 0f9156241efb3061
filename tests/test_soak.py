"""`runops soak` on the session's stack, shortened (services as processes, key rotations and
flag changes every few seconds), and the flatness rule that judges its curves."""

from __future__ import annotations

from runops.bench.soak import ROTATION_BOUND_SECONDS, Series, run
from runops.cli.main import build_parser
from runops.localstack import LocalStack

PROCESSES = ("controlplane", "runstore", "mollifier", "ingest", "mollifier-drainer")


async def test_a_short_soak_is_correct_and_samples_every_process(stack: LocalStack) -> None:
    lines: list[str] = []
    result = await run(
        stack, lines.append, minutes=0.3, warmup=0.05, every=5.0, fraction=0.5, calibrate=0.5,
        sample_every=1,
    )  # fmt: skip
    tally = result.tally
    assert result.correct, result.report()
    assert tally.trigger_ids
    assert tally.reads > 0
    assert tally.batches >= 2
    # Rotations at 5 s, 10 s, 15 s (and the soak's own first key): each old key was refused
    # within the bound.
    assert tally.rotations >= 3
    assert tally.old_key_still_worked == 0
    assert 0 < tally.old_key_refused_after <= ROTATION_BOUND_SECONDS
    assert tally.flag_changes == tally.rotations
    assert result.runs_found == result.runs_expected > len(tally.trigger_ids)
    names = {s.name for s in result.series}
    for process in PROCESSES:
        assert {f"{process} RSS", f"{process} open fds"} <= names, names
    assert "redis connected clients" in names
    assert sum(name.startswith("postgres ") for name in names) == 4
    for series in result.series:
        assert len(series.samples) >= 10, series.name
        assert all(value >= 0 for _, value in series.samples), series.name
    assert any(s.unit == "MiB" and s.samples[0][1] > 10 for s in result.series)
    report = result.report()
    assert "answers correct" in report
    assert "m1" in report.splitlines()[6]


def test_a_leak_is_not_flat_and_noise_is() -> None:
    # Four minutes sampled every 10 s, one of warm-up: +8 MiB a minute from 75 MiB ends ~17%
    # above the first minute after warm-up, a leak; +-2% noise is not.
    leak, noise, fds = Series("leak", "MiB"), Series("noise", "MiB"), Series("fds", "")
    for i in range(24):
        at = i * 10.0
        leak.samples.append((at, 75 + at / 60 * 8))
        noise.samples.append((at, 75 * (1.02 if i % 2 else 0.98)))
        fds.samples.append((at, 20 + i % 3))  # a count may move by 2
    assert leak.verdict(60)[2] is False
    assert noise.verdict(60)[2] is True
    assert fds.verdict(60)[2] is True
    base, final, _ = leak.verdict(60)
    assert base is not None
    assert final is not None
    assert final > base * 1.1


def test_command_is_registered() -> None:
    args = build_parser().parse_args(["soak", "--minutes", "3", "--every", "30"])
    assert (args.minutes, args.every, args.warmup) == (3.0, 30.0, 2.0)
