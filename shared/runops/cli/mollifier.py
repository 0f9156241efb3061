"""`runops mollifier trigger|burst|stats`: try the mollifier of a running stack (`runops up`
writes RUNOPS_MOLLIFIER_TARGET, RUNOPS_INTERNAL_TOKEN and RUNOPS_DEMO_ENVIRONMENT_ID to its env
file; source it first)."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import TYPE_CHECKING

from runops.cli.arguments import at_least_one
from runops.cli.errors import FAILURE_EXIT, call_failure, print_error, report_call_failure
from runops.cli.grid import aligned

if TYPE_CHECKING:
    from runops.mollifier.v1 import mollifier_pb2 as m

TARGET_ENV = "RUNOPS_MOLLIFIER_TARGET"
TOKEN_ENV = "RUNOPS_INTERNAL_TOKEN"
DEFAULT_TARGET = "127.0.0.1:50051"
STATS_HEADER = ("environment", "depth", "draining", "oldest age")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("trigger", "burst", "stats"))
    parser.add_argument("--env", default=os.environ.get("RUNOPS_DEMO_ENVIRONMENT_ID", ""))
    parser.add_argument("--task", default="demo/hello")
    parser.add_argument("--count", type=at_least_one, default=1000, help="burst: triggers in all")
    parser.add_argument(
        "--concurrency", type=at_least_one, default=20, help="burst: callers at once"
    )


def trigger_line(reply: m.TriggerResponse) -> str:
    """One line per trigger: the run's id and status, and where it went (buffered, with the
    mollifier's notice, or straight to the run store; `cached` when its key's run returned)."""
    from runops.common.v1 import common_pb2

    status = common_pb2.RunStatus.Name(reply.run.status).removeprefix("RUN_STATUS_")
    where = "buffered" if reply.buffered else "written to the run store"
    line = f"{reply.run.friendly_id} {status} ({where}{', cached' if reply.is_cached else ''})"
    return f"{line}: {reply.notice}" if reply.notice else line


def stats_table(stats: m.GetBufferStatsResponse) -> str:
    """Depth, draining and oldest entry's age per environment with anything buffered (and a
    total line when several have), or "empty"."""
    rows = [
        (
            env.environment_id,
            f"{env.depth:,}",
            f"{env.draining:,}",
            f"{env.oldest_entry_age.ToTimedelta().total_seconds():.1f}s"
            if env.HasField("oldest_entry_age")
            else "-",
        )
        for env in stats.environments
        if env.depth or env.draining
    ]
    if not rows:
        return "empty"
    if len(rows) > 1:
        rows.append(("total", f"{stats.total_depth:,}", f"{stats.total_draining:,}", ""))
    return aligned((STATS_HEADER, *rows))


async def _run(args: argparse.Namespace, target: str) -> int:
    # Imported here: `runops --help` builds every subcommand's parser and must stay fast.
    from runops.mollifier.client import MollifierClient
    from runops.mollifier.v1 import mollifier_pb2 as m

    async with MollifierClient(target, token=os.environ.get(TOKEN_ENV)) as client:
        if args.action == "stats":
            print(stats_table(await client.buffer_stats(args.env)))
            return 0
        request = m.TriggerRequest(environment_id=args.env, task_identifier=args.task)
        if args.action == "trigger":
            print(trigger_line(await client.trigger(request)))
            return 0
        buffered = 0
        remaining = args.count
        began = time.monotonic()

        async def caller() -> None:
            nonlocal buffered, remaining
            while remaining > 0:
                remaining -= 1
                buffered += (await client.trigger(request)).buffered

        await asyncio.gather(*(caller() for _ in range(args.concurrency)))
        seconds = time.monotonic() - began
        print(
            f"{args.count} triggers in {seconds:.2f}s: {buffered} buffered, "
            f"{args.count - buffered} straight to the run store"
        )
        return 0


def command(args: argparse.Namespace) -> int:
    target = os.environ.get(TARGET_ENV, DEFAULT_TARGET)
    try:
        return asyncio.run(_run(args, target))
    except Exception as exc:
        details = call_failure(exc)
        if details is None:
            raise
        return report_call_failure(
            details, service="mollifier", target=target, credential=f"${TOKEN_ENV}"
        )
    except KeyboardInterrupt:
        print_error("interrupted")
        return FAILURE_EXIT
