"""Services as OS processes, for `runops up` and the tests alike: `python -m services.<name>` with
the stack's environment, its output in a log file, ready once `grpc.health.v1` answers SERVING,
stopped by SIGTERM (it drains) and SIGKILL only after a bounded wait.

    service = ServiceProcess("controlplane", free_port(), -1, log_file, env=stack.service_env())
    async with service:                 # start + wait_serving; stop on the way out
        channel = create_channel(service.target, ...)
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from runops import registry
from runops.localstack.ports import HOST
from runops.localstack.process import StackError, log_tail, spawn, terminate

HEALTH_TIMEOUT = 60.0
# Services drain in-flight RPCs for up to their grace period (20 s by default) after SIGTERM.
STOP_TIMEOUT = 30.0


def python_path() -> str:
    """So `python -m services.<name>` imports without an install, and the same code as this
    process (a worktree's, not an editable install's): runops' and services' parents."""
    import runops

    parts = [str(Path(runops.__file__).resolve().parents[1])]
    parts += [str(root.parent) for root in registry.services_roots()]
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(dict.fromkeys(parts))


@dataclass
class ServiceProcess:
    """One service of runops.registry as a process on HOST.

    env: what it gets on top of this process's environment (the stack's endpoints, tokens, the
    other services' targets, overrides); the listen addresses below always win.
    companion: the name of one of the service's companions (registry.Companion, e.g.
    "mollifier-drainer"): its module runs instead of the server.
    """

    name: str
    grpc_port: int
    metrics_port: int  # -1: no metrics endpoint
    log_file: Path
    env: Mapping[str, str] = field(default_factory=dict)
    companion: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    service: registry.Service = field(init=False, repr=False)
    module: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.service = registry.service(self.name)  # an unknown name fails here
        self.module = self.service.module
        if self.companion:
            found = [c for c in self.service.companions if c.name == self.companion]
            if not found:
                raise ValueError(f"service {self.name} has no companion {self.companion!r}")
            self.module = found[0].module

    @property
    def label(self) -> str:
        """The service's name, or its companion's."""
        return self.companion or self.name

    @property
    def target(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    def environment(self) -> dict[str, str]:
        inherited = dict(os.environ)
        # A caller's multiprocess-metrics directory is not the service's (RUNOPS_PROCESSES
        # makes its own): inherited, a single process would write its metrics there.
        inherited.pop("PROMETHEUS_MULTIPROC_DIR", None)
        return {
            **inherited,
            **self.env,
            "PYTHONPATH": python_path(),
            "RUNOPS_GRPC_HOST": HOST,
            "RUNOPS_GRPC_PORT": str(self.grpc_port),
            "RUNOPS_METRICS_HOST": HOST,
            "RUNOPS_METRICS_PORT": str(self.metrics_port),
        }

    def start(self) -> None:
        if self.proc is not None:
            raise RuntimeError(f"service {self.label} was already started")
        self.proc = spawn(
            [sys.executable, "-m", self.module], self.log_file, env=self.environment()
        )

    def poll(self) -> int | None:
        """Its exit status once it has exited (None while it runs or before start)."""
        return None if self.proc is None else self.proc.poll()

    def _failure(self, what: str) -> StackError:
        return StackError(
            f"service {self.label} {what}; last log lines ({self.log_file}):\n"
            f"{log_tail(self.log_file)}"
        )

    async def wait_serving(self, limit_seconds: float = HEALTH_TIMEOUT) -> None:
        """Until health (the whole server, "") answers SERVING; StackError with the log's tail
        if it exits first or is not SERVING within `limit_seconds`."""
        # Callers fork pg_ctl and friends after using gRPC; its fork handlers only add noise.
        os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + limit_seconds
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs type only sync channels
            while True:
                code = self.poll()
                if code is not None:
                    raise self._failure(f"exited with {code} before serving")
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise self._failure(f"not SERVING on {self.target} within {limit_seconds:.0f}s")
                await asyncio.sleep(0.1)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, up to `timeout` seconds to drain and exit, then SIGKILL."""
        if self.proc is not None:
            terminate(self.proc, timeout)

    async def __aenter__(self) -> ServiceProcess:
        self.start()
        try:
            await self.wait_serving()
        except BaseException:
            await asyncio.to_thread(self.stop)
            raise
        return self

    async def __aexit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)


def start_services(services: Sequence[ServiceProcess], timeout: float = HEALTH_TIMEOUT) -> None:
    """Spawn them all, then wait until every one answers SERVING (they start concurrently).
    From sync code; on failure the caller stops them (stop_services)."""
    for service in services:
        service.start()

    async def all_serving() -> None:
        await asyncio.gather(*(s.wait_serving(timeout) for s in services))

    asyncio.run(all_serving())


def stop_services(services: Sequence[ServiceProcess], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM all at once (they drain concurrently), wait up to `timeout` seconds in all, then
    SIGKILL the stragglers."""
    running = [s.proc for s in services if s.proc is not None and s.proc.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in running:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            terminate(proc, timeout=0)


def targets_env(services: Sequence[ServiceProcess]) -> Mapping[str, str]:
    """RUNOPS_<NAME>_TARGET of each service's servers (not of companions), so services (and
    clients) find one another: `host:port` for one server, `ipv4:host:a,host:b` for several
    (runops.kit.channels spreads calls over them with round_robin, as over a headless
    Kubernetes service's pods)."""
    grouped: dict[str, list[str]] = {}
    for s in services:
        if not s.companion:
            grouped.setdefault(s.service.target_variable, []).append(s.target)
    return {
        variable: targets[0] if len(targets) == 1 else "ipv4:" + ",".join(targets)
        for variable, targets in grouped.items()
    }


def processes_of(
    service: registry.Service, ports: Callable[[], int], logs: Path, replicas: int = 1
) -> list[ServiceProcess]:
    """The service's server(s) and each companion (ports: a free port per call); the servers'
    environment gets what its companions ask for (`Companion.server_env`). `replicas` servers
    of the service on ports of their own (logs `<name>-<i>.log` when more than one); its
    companions run once."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    server_env = {k: v for c in service.companions for k, v in c.server_env}
    servers = []
    for i in range(1, replicas + 1):
        log = f"{service.name}.log" if replicas == 1 else f"{service.name}-{i}.log"
        servers.append(
            ServiceProcess(service.name, ports(), ports(), logs / log, env=dict(server_env))
        )
    companions = [
        ServiceProcess(service.name, ports(), ports(), logs / f"{c.name}.log", companion=c.name)
        for c in service.companions
    ]
    return [*servers, *companions]
