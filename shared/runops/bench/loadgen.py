"""Driving a load generator that runs in its own process (`python -m <module> --loadgen-worker`),
so the client never competes with the server for one event loop.

The protocol: the spec goes in as one JSON line on stdin; the worker prints JSON lines on stdout:
`{"event": "<mark>"}` when it reaches a mark (the driver samples counters there, then answers
"go"), and finally `{"event": "result", "result": {...}}`. Anything else it prints is passed on
to stderr.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

S = TypeVar("S")


async def start_worker(module: str) -> asyncio.subprocess.Process:
    """`python -m <module> --loadgen-worker` on the same code as this process (an installed
    package or a checkout), stdin and stdout piped."""
    from runops.localstack.services import python_path

    env = {**os.environ, "PYTHONPATH": python_path()}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, "--loadgen-worker",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip


async def drive(
    module: str, spec_json: str, sample: Callable[[], S], label: str
) -> tuple[dict[str, Any], dict[str, S]]:
    """Run the worker with `spec_json`; returns its result and `sample()` taken at each mark
    (before the worker goes on: its connections may close right after "end")."""
    proc = await start_worker(module)
    assert proc.stdin is not None
    assert proc.stdout is not None
    marks: dict[str, S] = {}
    result: dict[str, Any] | None = None
    try:
        proc.stdin.write(spec_json.encode() + b"\n")
        await proc.stdin.drain()
        async for line in proc.stdout:
            if not line.startswith(b"{"):
                sys.stderr.write(line.decode(errors="replace"))
                continue
            message = json.loads(line)
            if message["event"] == "result":
                result = message["result"]
            else:
                marks[message["event"]] = sample()
                proc.stdin.write(b"go\n")
                await proc.stdin.drain()
        proc.stdin.close()
        code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if code != 0 or result is None:
        raise RuntimeError(f"the load generator for {label!r} exited with status {code}")
    return result, marks
