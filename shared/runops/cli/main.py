"""`runops` command: argparse subcommands whose implementations are imported only when run, so
`runops --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path

from runops.cli.arguments import at_least_one

# name -> (help, add its arguments, "module:function" taking the parsed args, returning an exit code)
Command = tuple[str, Callable[[argparse.ArgumentParser], None], str]


def _state_dir(value: str) -> Path:
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} exists and is not a directory")
    return path


def _up_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=_state_dir,
        default=None,
        help="where server data and logs go (default: a temporary directory removed on exit)",
    )
    parser.add_argument(
        "--with-cluster", action="store_true", help="also start a 3-master Redis Cluster"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="start everything, print the endpoints, then stop and exit (CI smoke test)",
    )
    parser.add_argument(
        "--replicas",
        type=at_least_one,
        default=1,
        help="server processes per service, each on its own port; the targets list them all "
        "(ipv4:a,b) and clients spread calls with round_robin (default 1)",
    )


def _protos_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--check", action="store_true", help="only report whether generated code is stale"
    )


COMMANDS: dict[str, Command] = {
    "up": (
        "start the local stack (Postgres with replicas, Redis, S3) and every service",
        _up_args,
        "runops.cli.up:command",
    ),
    "protos": (
        "regenerate the Python code and stubs from protos/ (--check: report staleness)",
        _protos_args,
        "runops.cli.main:_protos",
    ),
    "admin": (
        "control-plane admin: organizations, projects, environments, API keys, flags",
        lambda parser: importlib.import_module("runops.cli.admin").add_arguments(parser),
        "runops.cli.admin:command",
    ),
    "batch": (
        "batch ingest: stream an NDJSON file into a new batch, watch a batch",
        lambda parser: importlib.import_module("runops.cli.batch").add_arguments(parser),
        "runops.cli.batch:command",
    ),
    "bench": (
        "run every benchmark of spec §7 and print one table (from a checkout; --durable)",
        lambda parser: importlib.import_module("runops.cli.bench").add_arguments(parser),
        "runops.cli.bench:command",
    ),
    "soak": (
        "minutes of mixed load at half capacity: memory, descriptors, connections stay flat",
        lambda parser: importlib.import_module("runops.cli.soak").add_arguments(parser),
        "runops.cli.soak:command",
    ),
    "demo": (
        "demos against a running `runops up` (batch: a 10,000-item batch)",
        lambda parser: importlib.import_module("runops.cli.batch").add_demo_arguments(parser),
        "runops.cli.batch:demo_command",
    ),
    "mollifier": (
        "try the mollifier of a running stack: one trigger, a burst, the buffer's stats",
        lambda parser: importlib.import_module("runops.cli.mollifier").add_arguments(parser),
        "runops.cli.mollifier:command",
    ),
}


def _protos(args: argparse.Namespace) -> int:
    from runops.codegen import main as codegen_main

    return codegen_main(["--check"] if args.check else [])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runops", description="runops operator commands")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (text, add_args, target) in COMMANDS.items():
        sub = subcommands.add_parser(name, help=text, description=text)
        add_args(sub)
        sub.set_defaults(target=target)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, _, function = str(args.target).partition(":")
    handler: Callable[[argparse.Namespace], int] = getattr(
        importlib.import_module(module), function
    )
    return handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
