"""`runops soak`: mixed load for minutes at about half of capacity; every process's memory,
descriptors and connections must stay flat and every answer correct (`runops.bench.soak`)."""

from __future__ import annotations

import argparse
import asyncio

from runops.cli.arguments import at_least_one


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


DESCRIPTION = """\
Starts a local stack and every service as its own process, measures each kind of call alone
(Trigger, the mollifier's GetRun, a batch through ingest), then runs the three at once for
--minutes, each at a third of --fraction of its capacity, rotating the API key and changing the
organization's flags every --every seconds. Samples each process's RSS and open descriptors and
the Postgres and Redis connection counts; prints per-minute medians. Exit status 0 only when
every series stays flat (last minute within 10% of the first after warm-up) and every answer
was correct (no failed call, nothing lost or duplicated in Postgres). See docs/operations.md."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--minutes", type=_positive, default=10.0, help="soak length (10)")
    parser.add_argument(
        "--warmup", type=_positive, default=2.0, help="minutes not judged for flatness (2)"
    )
    parser.add_argument(
        "--every", type=_positive, default=60.0, help="seconds between key rotations (60)"
    )
    parser.add_argument(
        "--fraction", type=_positive, default=0.5, help="share of measured capacity (0.5)"
    )
    parser.add_argument(
        "--calibrate", type=_positive, default=5.0, help="seconds per kind of call alone (5)"
    )
    parser.add_argument(
        "--sample-every", type=at_least_one, default=5, help="seconds between samples (5)"
    )
    parser.add_argument("--durable", action="store_true", help="Postgres with fsync etc. on")


async def _run(args: argparse.Namespace) -> int:
    from runops.bench import soak
    from runops.kit.logging import configure_logging
    from runops.localstack import LocalStack, printing_progress

    configure_logging("warning", "console")
    say = printing_progress("soak")
    stack = LocalStack(None, durable=args.durable, progress=say)
    await asyncio.to_thread(stack.start)
    try:
        result = await soak.run(
            stack, say, minutes=args.minutes, warmup=args.warmup, every=args.every,
            fraction=args.fraction, calibrate=args.calibrate, sample_every=args.sample_every,
        )  # fmt: skip
    finally:
        await asyncio.to_thread(stack.stop)
    print(result.report(), flush=True)
    return 0 if result.correct and result.flat else 1


def command(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))
