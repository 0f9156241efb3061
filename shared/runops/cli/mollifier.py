"""`runops mollifier trigger|burst|stats`: try the mollifier of a running stack (`runops up`
writes RUNOPS_MOLLIFIER_TARGET, RUNOPS_INTERNAL_TOKEN and RUNOPS_DEMO_ENVIRONMENT_ID to its env
file; source it first)."""

from __future__ import annotations

import argparse
import asyncio
import os
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("trigger", "burst", "stats"))
    parser.add_argument("--env", default=os.environ.get("RUNOPS_DEMO_ENVIRONMENT_ID", ""))
    parser.add_argument("--task", default="demo/hello")
    parser.add_argument("--count", type=int, default=1000, help="burst: triggers in all")
    parser.add_argument("--concurrency", type=int, default=20, help="burst: callers at once")


async def _run(args: argparse.Namespace) -> int:
    # Imported here: `runops --help` builds every subcommand's parser and must stay fast.
    from runops.mollifier.client import MollifierClient
    from runops.mollifier.v1 import mollifier_pb2 as m

    target = os.environ.get("RUNOPS_MOLLIFIER_TARGET", "127.0.0.1:50051")
    async with MollifierClient(target, token=os.environ.get("RUNOPS_INTERNAL_TOKEN")) as client:
        if args.action == "stats":
            print(await client.buffer_stats(args.env))
            return 0
        request = m.TriggerRequest(environment_id=args.env, task_identifier=args.task)
        if args.action == "trigger":
            print(await client.trigger(request))
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
    return asyncio.run(_run(args))
