"""`runops bench`: every benchmark of spec §7 (`runops.bench`) on one local stack, one table."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

DESCRIPTION = """\
Runs every benchmark of spec §7 (control plane, run store, ingest, mollifier) one after the
other on one local stack it starts (Postgres writers with replicas, Redis, moto S3; the services
as OS processes), then prints one table: benchmark, figure, raw floor measured in the same run,
ratio, target, met or not; and the durability settings it ran with. Each measured phase runs
at least 10 s or is repeated 3 times (the median printed, its min-max in the spread column).
About 8-9 minutes on a quiet 2-core machine. --profile DIR records every process of each measured phase
with py-spy (DIR/<benchmark>-<phase>-<process>.txt) and writes DIR/summary.md. The
benchmarks are part of the installed package (runops.bench); each also runs alone with its full
report: python -m runops.bench.<name>.

Durability: by default the local stack's Postgres runs with fsync=off, synchronous_commit=off
and full_page_writes=off (fast, throw-away), which inflates every Postgres figure. --durable
starts it with fsync=on, synchronous_commit=on and full_page_writes=on (the replica stays
asynchronous). Redis runs with its append-only file fsynced every second (appendfsync everysec)
either way."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--durable",
        action="store_true",
        help="Postgres with production durability (fsync, synchronous_commit, full_page_writes on)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=("controlplane", "runstore", "ingest", "mollifier"),
        help="run only this benchmark (repeatable); default: all",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: checks every row comes out, in ~1 min"
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        type=Path,
        help="record every process of each measured phase with py-spy into DIR"
        " (<benchmark>-<phase>-<process>.txt) and write DIR/summary.md (top self-time frames)",
    )


def durability_lines(durability: dict[str, str], durable: bool) -> list[str]:
    from runops.bench.report import settings

    postgres = settings(durability)
    mode = "--durable (production settings)" if durable else "local-stack defaults (fast)"
    return [
        f"durability: {mode}",
        f"  Postgres (run-ops writer, as measured by SHOW): {postgres}",
        "  Redis: appendonly yes, appendfsync everysec",
    ]


async def _run_all(names: list[str], durable: bool, smoke: bool, profile_dir: Path | None) -> int:
    from runops.bench import profile
    from runops.bench.report import Row, table
    from runops.bench.suite import Outcome, run_one
    from runops.kit.logging import configure_logging
    from runops.localstack import LocalStack, printing_progress

    configure_logging("warning", "console")
    say = printing_progress("bench")
    began = time.monotonic()
    outcomes: list[Outcome] = []
    profiler = None if profile_dir is None else profile.start(profile_dir)
    stack = LocalStack(None, durable=durable, progress=say)
    await asyncio.to_thread(stack.start)
    try:
        for name in names:
            say(f"== {name}")
            outcome = await run_one(name, stack, "smoke" if smoke else "full", say)
            say(f"== {name}: {outcome.missing or f'done in {outcome.seconds:.0f}s'}")
            outcomes.append(outcome)
    finally:
        profile.stop()
        await asyncio.to_thread(stack.stop)
    rows: list[Row] = [row for outcome in outcomes for row in outcome.rows]
    durability = next((o.durability for o in outcomes if o.durability), {})
    lines = [
        "",
        f"runops bench: {len(names)} benchmarks in {time.monotonic() - began:.0f}s,"
        f" {_cpus()} CPUs{' (smoke sizes)' if smoke else ''}",
        *durability_lines(durability, durable),
        "spread: min-max over the repetitions of a figure measured several times (median shown);"
        " blank: one window of >= 10 s",
        "",
        table(rows),
    ]
    lines += [f"{o.name}: {o.missing}" for o in outcomes if o.missing]
    if profiler is not None:
        lines.append(
            f"\nprofiles: {len(profiler.recordings)} py-spy recordings, top frames in"
            f" {profiler.write_summary()}"
        )
    missed = [row for row in rows if row.met is False]
    lines.append(
        f"\n{len(missed)} of {sum(r.met is not None for r in rows)} targets missed"
        if missed
        else "\nevery target met"
    )
    print("\n".join(lines), flush=True)
    return 0


def _cpus() -> int:
    import os

    return os.cpu_count() or 1


def command(args: argparse.Namespace) -> int:
    names = args.only or ["controlplane", "runstore", "ingest", "mollifier"]
    if args.profile is not None:
        from runops.bench.profile import INSTALL_HINT, py_spy

        if py_spy() is None:
            print(f"runops bench: {INSTALL_HINT}", file=sys.stderr)
            return 2
    return asyncio.run(_run_all(names, args.durable, args.smoke, args.profile))
