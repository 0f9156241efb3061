"""`runops up`: the local stack plus every service that exists, until Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from runops.localstack import LocalStack, StackError, printing_progress
from runops.localstack.ports import HOST, free_port
from runops.localstack.process import log_tail, spawn, terminate
from runops.localstack.stack import LABEL_WIDTH

SERVICE_NAMES = ("controlplane", "runstore", "mollifier", "ingest")
HEALTH_TIMEOUT = 60.0
# Services drain in-flight RPCs for up to their grace period (20 s by default) after SIGTERM.
STOP_TIMEOUT = 30.0
DEMO_SLUG = "demo"


@dataclass
class ServiceProcess:
    name: str
    grpc_port: int
    metrics_port: int
    log_file: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"{HOST}:{self.grpc_port}"


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


def _services_roots() -> list[Path]:
    spec = importlib.util.find_spec("services")
    if spec is None or spec.submodule_search_locations is None:
        return []
    return [Path(p) for p in spec.submodule_search_locations if Path(p).is_dir()]


def discover_services() -> list[str]:
    """The services that exist: services/<name>/__main__.py, in start order."""
    roots = _services_roots()
    return [n for n in SERVICE_NAMES if any((r / n / "__main__.py").exists() for r in roots)]


def _python_path() -> str:
    """So `python -m services.<name>` imports without an install: services' and runops' parents."""
    import runops

    parts = [str(Path(runops.__file__).resolve().parents[1])]
    parts += [str(root.parent) for root in _services_roots()]
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(dict.fromkeys(parts))


def _service_env(ctx: UpContext, service: ServiceProcess) -> dict[str, str]:
    return {
        **os.environ,
        **ctx.env,
        "PYTHONPATH": _python_path(),
        "RUNOPS_GRPC_HOST": HOST,
        "RUNOPS_GRPC_PORT": str(service.grpc_port),
        "RUNOPS_METRICS_HOST": HOST,
        "RUNOPS_METRICS_PORT": str(service.metrics_port),
    }


async def _wait_serving(service: ServiceProcess, limit_seconds: float) -> None:
    # We fork pg_ctl and friends after using gRPC; its fork handlers only add log noise.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + limit_seconds
    async with grpc.aio.insecure_channel(service.target) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs type only sync channels
        while True:
            if service.proc is not None and service.proc.poll() is not None:
                raise StackError(
                    f"service {service.name} exited with {service.proc.returncode} before "
                    f"serving; last log lines ({service.log_file}):\n{log_tail(service.log_file)}"
                )
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise StackError(
                    f"service {service.name} not SERVING on {service.target} within "
                    f"{limit_seconds:.0f}s; last log lines ({service.log_file}):\n"
                    f"{log_tail(service.log_file)}"
                )
            await asyncio.sleep(0.1)


def start_services(ctx: UpContext) -> None:
    """Spawn every service and wait until all of them answer health SERVING."""
    for service in ctx.services:
        service.proc = spawn(
            [sys.executable, "-m", f"services.{service.name}"],
            service.log_file,
            env=_service_env(ctx, service),
        )

    async def all_serving() -> None:
        await asyncio.gather(*(_wait_serving(s, HEALTH_TIMEOUT) for s in ctx.services))

    asyncio.run(all_serving())


def stop_services(services: list[ServiceProcess]) -> None:
    """SIGTERM all at once (they drain concurrently), wait, then SIGKILL stragglers."""
    running = [s.proc for s in services if s.proc is not None and s.proc.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for proc in running:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            terminate(proc, timeout=0)


def _endpoint_lines(ctx: UpContext, demo: list[str] | None) -> list[str]:
    lines = ["", "runops local stack is up", *ctx.stack.describe()]
    for s in ctx.services:
        lines.append(
            f"{s.name + ':':{LABEL_WIDTH}}grpc {s.target}  metrics http://{HOST}:{s.metrics_port}/metrics"
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
            if s.proc is not None and s.proc.poll() is not None:
                print(
                    f"service {s.name} exited with {s.proc.returncode}; stopping everything. "
                    f"Last log lines ({s.log_file}):\n{log_tail(s.log_file)}",
                    file=sys.stderr,
                )
                return 1
        time.sleep(0.5)


def up(state_dir: Path | None, with_cluster: bool, check: bool) -> int:
    progress = printing_progress("runops up")
    # Installed explicitly: a shell starts background jobs with SIGINT ignored.
    previous_int = signal.signal(signal.SIGINT, _raise_stop)
    previous_term = signal.signal(signal.SIGTERM, _raise_stop)
    stack = LocalStack(state_dir, with_cluster=with_cluster, progress=progress)
    ctx = UpContext(stack=stack, services=[])
    try:
        stack.start()
        ctx.admin_token = secrets.token_urlsafe(24)
        ctx.internal_token = secrets.token_urlsafe(24)
        names = discover_services()
        logs = stack.state_dir / "logs"
        ctx.services = [
            ServiceProcess(n, free_port(), free_port(), logs / f"{n}.log") for n in names
        ]
        ctx.env = {
            **stack.service_env(),
            "RUNOPS_ADMIN_TOKEN": ctx.admin_token,
            "RUNOPS_INTERNAL_TOKEN": ctx.internal_token,
            **{f"RUNOPS_{s.name.upper()}_TARGET": s.target for s in ctx.services},
        }
        if names:
            progress(f"starting services: {', '.join(names)}")
            start_services(ctx)
            progress("all services SERVING")
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
    return up(args.state_dir, args.with_cluster, args.check)
