"""`python -m services.mollifier.drainer` as a real process, SIGKILLed while it holds entries in
DRAINING (its writes held up by a delay proxy in front of the run store): another drainer
recovers them after the visibility timeout; Postgres ends with every run exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog.testing

from runops.localstack import LocalStack
from runops.localstack.delay_proxy import DelayProxy
from runops.localstack.ports import free_port
from runops.localstack.process import log_tail
from runops.localstack.services import ServiceProcess
from runops.localstack.settings import INTERNAL_TOKEN
from services.mollifier.app import Mollifier
from services.runstore.app import RunStoreApp
from tests.controlplane.harness import Seeded
from tests.harness import until
from tests.mollifier.service_harness import (
    TRIPPED,
    count_runs,
    runs_in_postgres,
    stub,
    trigger_request,
)

Factory = Callable[..., Awaitable[Mollifier]]


async def test_a_killed_drainer_process_loses_nothing(
    services: Factory,
    env: Seeded,
    stack: LocalStack,
    svc_run_store: RunStoreApp,
    redis_settings: dict[str, object],
    prefix: str,
    tmp_path: Path,
) -> None:
    service = await services(**TRIPPED)
    client = stub(service.app.target)
    replies = [await client.Trigger(trigger_request(env.env_id)) for _ in range(600)]
    ids = {r.run.friendly_id.removeprefix("run_") for r in replies}
    assert sum(r.buffered for r in replies) == 599

    host, port = svc_run_store.app.target.rsplit(":", 1)
    # The stack's environment names the Cluster once a test started it: say which one here.
    base = {k: v for k, v in stack.service_env().items() if not k.startswith("RUNOPS_REDIS_")}
    redis_env = (
        {"RUNOPS_REDIS_URL": str(redis_settings["url"])}
        if "url" in redis_settings
        else {"RUNOPS_REDIS_CLUSTER_NODES": ",".join(redis_settings["cluster_nodes"])}  # type: ignore[arg-type]
    )
    async with DelayProxy(host, int(port), delay=3.0) as proxy:
        process = ServiceProcess(
            "mollifier",
            free_port(),
            -1,
            tmp_path / "drainer.log",
            env={
                **base,
                **redis_env,
                "RUNOPS_INTERNAL_TOKEN": INTERNAL_TOKEN,
                "RUNOPS_KEY_PREFIX": prefix,
                "RUNOPS_RUNSTORE_TARGET": f"127.0.0.1:{proxy.port}",
                "RUNOPS_CONTROLPLANE_TARGET": "127.0.0.1:1",
                "RUNOPS_LOG_FORMAT": "console",
            },
            companion="mollifier-drainer",
        )
        process.start()
        try:

            async def holding() -> bool:
                return (await service.buffer.stats(env.env_id)).draining > 0

            try:
                await until(holding, limit=60, interval=0.05)
            except AssertionError as exc:
                raise AssertionError(log_tail(tmp_path / "drainer.log")) from exc
        finally:
            assert process.proc is not None
            process.proc.kill()
            process.proc.wait(timeout=10)
    assert (await service.buffer.stats(env.env_id)).draining > 0, "killed holding entries"

    # Another drainer requeues them after the visibility timeout and writes them.
    rescuer = await services(
        drainer_enabled=True,
        drain_visibility_timeout_seconds=1,
        drain_recovery_interval_seconds=0.5,
    )

    async def done() -> bool:
        stats = await rescuer.buffer.stats(env.env_id)
        return stats.depth == 0 and await count_runs(stack, env.env_id) >= 600

    with structlog.testing.capture_logs() as rescuer_logs:
        try:
            await until(done, limit=120, interval=0.05)
        except AssertionError as exc:
            stats = await rescuer.buffer.stats(env.env_id)
            indexed = env.env_id in await rescuer.buffer.environments()
            runs = await count_runs(stack, env.env_id)
            raise AssertionError(
                f"{exc}: depth {stats.depth}, draining {stats.draining}, runs {runs}/600, "
                f"indexed {indexed}\n-- killed drainer's log tail:\n"
                f"{log_tail(tmp_path / 'drainer.log')}\n-- rescuer's log tail:\n"
                + ("\n".join(map(str, rescuer_logs[-20:])) or "(nothing logged)")
            ) from exc
    await asyncio.sleep(0.5)
    stored = await runs_in_postgres(stack, env.env_id)
    assert set(stored) == ids, "no loss, no duplicates"
