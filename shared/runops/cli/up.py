"""`runops up`: the local stack plus every service that exists, until Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shlex
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from runops import registry
from runops.localstack import LocalStack, StackError, printing_progress
from runops.localstack.ports import HOST, free_port
from runops.localstack.process import log_tail
from runops.localstack.services import (
    ServiceProcess,
    processes_of,
    start_services,
    stop_services,
    targets_env,
)
from runops.localstack.stack import LABEL_WIDTH, Progress

DEMO_SLUG = "demo"


@dataclass
class UpContext:
    """Everything `runops up` started, handed to seed_demo()."""

    stack: LocalStack
    services: list[ServiceProcess]
    env: dict[str, str] = field(default_factory=dict)  # what every service was started with
    admin_token: str = ""
    internal_token: str = ""


async def seed_demo_async(ctx: UpContext) -> list[str] | None:
    """With a control plane running: a demo organization/project and a DEVELOPMENT environment
    through the admin RPCs (the code behind `runops admin bootstrap`). Returns the lines to
    print and adds RUNOPS_DEMO_ENVIRONMENT_ID / RUNOPS_DEMO_API_KEY to ctx.env (for
    runops.env). A reused --state-dir already has "demo": a fresh `demo-<random>` organization
    is created then, since an existing environment's key cannot be read back."""
    plane = next((s for s in ctx.services if s.name == "controlplane"), None)
    if plane is None:
        return None
    import grpc

    from runops.cli.admin import bootstrap_at

    try:
        result = await bootstrap_at(plane.target, ctx.admin_token, DEMO_SLUG, suffix_if_taken=True)
    except grpc.aio.AioRpcError as exc:
        return [f"{'demo:':{LABEL_WIDTH}}not seeded: {exc.code().name}: {exc.details()}"]
    env, api_key = result.environments[0]
    ctx.env["RUNOPS_DEMO_ENVIRONMENT_ID"] = env.id
    ctx.env["RUNOPS_DEMO_API_KEY"] = api_key
    lines = [
        f"{'demo environment:':{LABEL_WIDTH}}{env.id} (DEVELOPMENT, organization "
        f"{result.organization.slug}, project {result.project.slug})",
        f"{'demo api key:':{LABEL_WIDTH}}{api_key}",
    ]
    if result.organization.slug != DEMO_SLUG:
        lines.append(
            f"{'':{LABEL_WIDTH}}({DEMO_SLUG!r} exists from an earlier run of this --state-dir; "
            f"created {result.organization.slug!r} with a new key)"
        )
    return lines


def seed_demo(ctx: UpContext) -> list[str] | None:
    """seed_demo_async on a loop of its own (`runops up` is synchronous). grpc.aio objects must
    not meet two event loops: callers that have a loop await seed_demo_async instead."""
    return asyncio.run(seed_demo_async(ctx))


def write_env_file(ctx: UpContext) -> Path:
    """The services' environment as `export` lines, for shells and clients."""
    path = ctx.stack.state_dir / "runops.env"
    lines = [f"export {name}={shlex.quote(value)}" for name, value in sorted(ctx.env.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def _endpoint_lines(ctx: UpContext, demo: list[str] | None) -> list[str]:
    lines = ["", "runops local stack is up", *ctx.stack.describe()]
    for s in ctx.services:
        lines.append(
            f"{s.label + ':':{LABEL_WIDTH}}grpc {s.target}  metrics http://{HOST}:{s.metrics_port}/metrics"
            f"  log {s.log_file}"
        )
    if not ctx.services:
        lines.append(f"{'services:':{LABEL_WIDTH}}none found (no services/<name>/__main__.py yet)")
    lines += [
        f"{'admin token:':{LABEL_WIDTH}}{ctx.admin_token}",
        f"{'internal token:':{LABEL_WIDTH}}{ctx.internal_token}",
        *(demo or []),
    ]
    return lines


class _Stop(Exception):
    """Raised from the signal handler: Ctrl-C and SIGTERM unwind to the same clean stop."""


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def _wait_until_stopped(ctx: UpContext) -> int:
    """Block until a signal arrives (0) or a service dies (1)."""
    while True:
        for s in ctx.services:
            if (code := s.poll()) is not None:
                print(
                    f"service {s.label} exited with {code}; stopping everything. "
                    f"Last log lines ({s.log_file}):\n{log_tail(s.log_file)}",
                    file=sys.stderr,
                )
                return 1
        time.sleep(0.5)


def start_suite(
    ctx: UpContext,
    progress: Progress,
    replicas: int = 1,
    overrides: Mapping[str, str] | None = None,
) -> None:
    """On ctx.stack (started): tokens, then every service that exists (`replicas` servers each,
    companions once) as processes with the stack's environment (plus `overrides`, e.g. a
    setting), until all answer SERVING.
    ctx.services is filled before they start, so the caller's cleanup stops them
    (`stop_services(ctx.services)`) whatever happens. The e2e suite starts its stack this way."""
    ctx.admin_token = secrets.token_urlsafe(24)
    ctx.internal_token = secrets.token_urlsafe(24)
    logs = ctx.stack.state_dir / "logs"
    # Ephemeral ports: four services share loopback (the registry's ports are containers').
    # Each service's companions (the mollifier drainer) run as processes of their own.
    ctx.services = [
        process
        for s in registry.available()
        for process in processes_of(s, free_port, logs, replicas)
    ]
    ctx.env = {
        **ctx.stack.service_env(),
        "RUNOPS_ADMIN_TOKEN": ctx.admin_token,
        "RUNOPS_INTERNAL_TOKEN": ctx.internal_token,
        **targets_env(ctx.services),
        **(overrides or {}),
    }
    if ctx.services:
        for service in ctx.services:
            service.env = {**ctx.env, **service.env}
        progress(f"starting services: {', '.join(s.label for s in ctx.services)}")
        start_services(ctx.services)
        progress("all services SERVING")


def up(state_dir: Path | None, with_cluster: bool, check: bool, replicas: int = 1) -> int:
    progress = printing_progress("runops up")
    # Installed explicitly: a shell starts background jobs with SIGINT ignored.
    previous_int = signal.signal(signal.SIGINT, _raise_stop)
    previous_term = signal.signal(signal.SIGTERM, _raise_stop)
    stack = LocalStack(state_dir, with_cluster=with_cluster, progress=progress)
    ctx = UpContext(stack=stack, services=[])
    try:
        stack.start()
        start_suite(ctx, progress, replicas)
        seeded = seed_demo(ctx) or []  # before the env file: it adds RUNOPS_DEMO_* to ctx.env
        env_file = write_env_file(ctx)
        demo = [f"{'env file:':{LABEL_WIDTH}}{env_file} (source it to reach the stack)", *seeded]
        print("\n".join(_endpoint_lines(ctx, demo)), flush=True)
        if check:
            progress("--check: everything started; stopping")
            return 0
        progress("press Ctrl-C to stop")
        return _wait_until_stopped(ctx)
    except (KeyboardInterrupt, _Stop):
        progress("stop requested")
        return 0
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a state dir that cannot be written, a full disk
        where = f" {exc.filename}" if exc.filename else ""
        print(
            f"error: cannot write{where}: {exc.strerror or exc} (pass --state-dir a writable "
            "directory, or free some space)",
            file=sys.stderr,
        )
        return 1
    finally:
        # A second Ctrl-C must not leave half the stack running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if ctx.services:
                progress("stopping services")
                stop_services(ctx.services)
            stack.stop()
            progress("stopped")
        finally:
            signal.signal(signal.SIGINT, previous_int)
            signal.signal(signal.SIGTERM, previous_term)


def command(args: argparse.Namespace) -> int:
    return up(args.state_dir, args.with_cluster, args.check, args.replicas)
