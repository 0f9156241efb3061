"""The suite the end-to-end tests drive, once per session.

Default: the session's local stack plus every service started the way `runops up` starts them
(`runops.cli.up.start_suite`), two server processes of each service on ports of their own, the
targets listing both (`ipv4:a,b`: clients spread calls with round_robin, as over a headless
Kubernetes service), one mollifier drainer; its runops.env written and read back like any
other env file.

`--e2e-env-file PATH` (or RUNOPS_E2E_ENV_FILE): drive an existing suite instead, e.g. a
`runops up` (its runops.env) or `docker compose -f docker/compose.yaml up` (docker/e2e.env);
nothing is started then (the model: Temporal's Python SDK tests' "target an existing server").
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from runops.cli.up import UpContext, start_suite, write_env_file
from runops.localstack import LocalStack, printing_progress
from runops.localstack.ports import HOST
from runops.localstack.services import stop_services
from tests.e2e.containers import Compose, compose_project
from tests.e2e.suite import Clients, Endpoints, read_env_file

# Two server processes per service: what scale-out looks like, on 2 cores.
REPLICAS = 2
# The local suite's gate trips at 20 triggers per 200 ms (default 100), so a burst trips it
# however slowly a shared 2-core machine runs the callers. Against an env file's suite the
# defaults apply and the burst test reports what it saw.
LOCAL_OVERRIDES = {"RUNOPS_GATE_THRESHOLD": "20", "RUNOPS_LOG_LEVEL": "warning"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The compose-only checks stop and restart containers: after everything else."""
    items.sort(key=lambda item: item.get_closest_marker("compose") is not None)


@pytest.fixture(scope="session")
def compose() -> Compose:
    """The compose project's containers (tests/e2e/containers.py); skips without one."""
    project = compose_project()
    if project is None:
        pytest.skip("needs the compose stack: RUNOPS_E2E_COMPOSE_PROJECT (.ci/compose sets it)")
    return Compose(project)


@pytest.fixture(scope="session")
def endpoints(request: pytest.FixtureRequest) -> Iterator[Endpoints]:
    given = request.config.getoption("e2e_env_file", default=None)
    if given:
        path = Path(str(given))
        yield Endpoints.from_env(read_env_file(path), str(path))
        return
    stack: LocalStack = request.getfixturevalue("stack")
    ctx = UpContext(stack=stack, services=[])
    # start_suite waits with asyncio.run: a thread of its own, away from the session's loop.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    try:
        with ThreadPoolExecutor(1) as pool:
            pool.submit(
                start_suite, ctx, printing_progress("e2e"), REPLICAS, LOCAL_OVERRIDES
            ).result()
        env_file = write_env_file(ctx)
        metrics: dict[str, tuple[str, ...]] = {}
        for s in ctx.services:
            if not s.companion:
                url = f"http://{HOST}:{s.metrics_port}/metrics"
                metrics[s.name] = (*metrics.get(s.name, ()), url)
        logs = tuple(s.log_file for s in ctx.services)
        yield Endpoints.from_env(read_env_file(env_file), str(env_file), metrics, logs)
    finally:
        stop_services(ctx.services)


@pytest.fixture(scope="session")
async def clients(endpoints: Endpoints) -> AsyncIterator[Clients]:
    made = Clients(endpoints)
    try:
        yield made
    finally:
        await made.close()
