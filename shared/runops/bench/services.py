"""The suite's services as OS processes for a benchmark (`python -m services.<name>`, as `runops
up` runs them), and a seeded environment with its API key."""

from __future__ import annotations

import contextlib
import secrets
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from runops.bench import profile
from runops.localstack.ports import free_port
from runops.localstack.services import ServiceProcess, targets_env
from runops.localstack.settings import process_env

if TYPE_CHECKING:
    from runops.localstack import LocalStack

Progress = Callable[[str], None]
# What ingest (and the mollifier) call: started once per benchmark run, in this order.
BASE_SERVICES = ("controlplane", "runstore", "mollifier")


@dataclass
class Suite:
    """The control plane, run store and mollifier running as processes on `stack`, and one
    seeded DEVELOPMENT environment."""

    stack: LocalStack
    logs: Path
    admin_token: str
    internal_token: str
    base: list[ServiceProcess]
    environment_id: str = ""
    organization_id: str = ""
    api_key: str = ""
    extra: list[ServiceProcess] = field(default_factory=list)

    def env(self, **overrides: str) -> dict[str, str]:
        """What a service of the suite is started with: the stack, tokens, the others' targets."""
        return process_env(
            self.stack,
            RUNOPS_ADMIN_TOKEN=self.admin_token,
            RUNOPS_INTERNAL_TOKEN=self.internal_token,
            RUNOPS_LOG_LEVEL="warning",
            **targets_env([*self.base, *self.extra]),
            **overrides,
        )

    @contextlib.asynccontextmanager
    async def service(self, name: str, label: str, **env: str) -> AsyncIterator[ServiceProcess]:
        """One more service process (a fresh one per configuration: its RSS is its own)."""
        process = ServiceProcess(
            name, free_port(), -1, self.logs / f"{label}.log", env=self.env(**env)
        )
        async with process:
            self.extra.append(process)
            try:
                with profile.watching(label, pid_of(process), children=True):
                    yield process
            finally:
                self.extra.remove(process)


def pid_of(process: ServiceProcess) -> int:
    assert process.proc is not None
    return process.proc.pid


@contextlib.asynccontextmanager
async def running_suite(stack: LocalStack, progress: Progress) -> AsyncIterator[Suite]:
    from runops.cli.admin import bootstrap_at

    logs = Path(tempfile.mkdtemp(prefix="runops-bench-"))
    suite = Suite(
        stack,
        logs,
        secrets.token_urlsafe(16),
        secrets.token_urlsafe(16),
        [ServiceProcess(n, free_port(), -1, logs / f"{n}.log") for n in BASE_SERVICES],
    )
    for process in suite.base:
        # The base mollifier answers claims only: no drainer of its own, so the mollifier
        # benchmark's burst stays buffered until its drainer process starts.
        quiet = {"RUNOPS_DRAINER_ENABLED": "false"} if process.name == "mollifier" else {}
        process.env = suite.env(**quiet)
    async with contextlib.AsyncExitStack() as exits:
        for process in suite.base:
            await exits.enter_async_context(process)
            # The base mollifier only answers claims: the benchmarks' own is "mollifier".
            label = "mollifier-claims" if process.name == "mollifier" else process.name
            exits.enter_context(profile.watching(label, pid_of(process), children=True))
        progress(f"{', '.join(BASE_SERVICES)} serving (logs in {logs})")
        seeded = await bootstrap_at(
            suite.base[0].target, suite.admin_token, "bench", suffix_if_taken=True
        )
        environment, suite.api_key = seeded.environments[0]
        suite.environment_id, suite.organization_id = environment.id, seeded.organization.id
        yield suite
