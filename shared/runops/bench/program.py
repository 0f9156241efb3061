"""What every benchmark program (`python -m runops.bench.<name>`) does around its measurements:
its command line, with the hidden `--loadgen-worker` flag its load generators are started with,
and a local stack of its own to measure on."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from runops.localstack import ExternalServers, LocalStack

R = TypeVar("R")
Progress = Callable[[str], None]


def parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The program's parser: its docstring's first paragraph as the description."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}", description=doc.split("\n\n")[0] if doc else None
    )
    parser.add_argument("--loadgen-worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def on_local_stack(
    measure: Callable[[LocalStack, Progress], Coroutine[Any, Any, R]],
    *,
    external: ExternalServers | None = None,
) -> R:
    """Start a local stack (progress on stderr), `measure` on it, stop it; print the result
    after this returns, so the figures are the last thing printed."""
    from runops.kit.logging import configure_logging
    from runops.localstack import LocalStack, printing_progress

    configure_logging("warning", "console")
    say = printing_progress("bench")
    with LocalStack(None, external=external, progress=say) as stack:
        return asyncio.run(measure(stack, say))
