"""RUNOPS_PROCESSES=2: two control-plane processes behind one port (`python -m
services.controlplane`, a real supervisor and real children). Both answer, an invalidation
reaches both, metrics add up on one endpoint, one SIGTERM drains both, and a child that dies
takes the others down with a non-zero exit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.controlplane.v1 import controlplane_pb2_grpc as cp_grpc
from runops.kit.channels import channel_options, propagating_interceptors
from runops.localstack import LocalStack
from runops.localstack.ports import free_port
from runops.localstack.process import log_tail
from runops.localstack.services import ServiceProcess
from runops.localstack.settings import ADMIN_TOKEN, process_env
from tests.controlplane.harness import Seeded, Stub
from tests.harness import until

PROPAGATION_LIMIT_SECONDS = 1.0


@dataclass
class Supervised:
    proc: subprocess.Popen[bytes]
    target: str
    metrics_port: int
    log_file: Path

    def children(self) -> set[int]:
        """Pids of the server processes (the spawned children, not multiprocessing's helper)."""
        found = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == self.proc.pid and b"spawn_main" in (entry / "cmdline").read_bytes():
                    found.add(int(entry.name))
        return found


@contextlib.asynccontextmanager
async def two_processes(stack: LocalStack, log_file: Path, **env: str) -> AsyncIterator[Supervised]:
    environ = process_env(
        stack, **{"RUNOPS_PROCESSES": "2", "RUNOPS_ADMIN_TOKEN": ADMIN_TOKEN, **env}
    )
    service = ServiceProcess("controlplane", free_port(), free_port(), log_file, env=environ)
    async with service:
        assert service.proc is not None
        yield Supervised(service.proc, service.target, service.metrics_port, log_file)


@contextlib.asynccontextmanager
async def fresh_channels() -> AsyncIterator[list[grpc.aio.Channel]]:
    """Channels that each open their own connection (grpc shares one per address otherwise),
    so the kernel may hand each to either process."""
    channels: list[grpc.aio.Channel] = []
    try:
        yield channels
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


def open_channel(channels: list[grpc.aio.Channel], target: str) -> Stub:
    channel = grpc.aio.insecure_channel(
        target,
        options=[*channel_options(), ("grpc.use_local_subchannel_pool", 1)],
        interceptors=propagating_interceptors(ADMIN_TOKEN),
    )
    channels.append(channel)
    return cp_grpc.ControlPlaneServiceStub(channel)


def source_pid(invalidation: cp.Invalidation) -> int:
    """The pid of the process that published it (`Publisher.source` is host/pid/nonce)."""
    return int(invalidation.source.split("/")[1])


async def test_both_processes_answer_and_an_invalidation_reaches_both(
    stack: LocalStack, admin: Stub, tmp_path: Path
) -> None:
    async with (
        two_processes(stack, tmp_path / "controlplane.log") as plane,
        fresh_channels() as channels,
    ):
        children = plane.children()
        assert len(children) == 2, log_tail(plane.log_file)
        seeded = await _seed(admin)
        watch_stub = open_channel(channels, plane.target)
        watch: Any = watch_stub.WatchInvalidations(
            cp.WatchInvalidationsRequest(organization_id=seeded.org_id)
        )
        assert (await watch.read()).reset
        # Each channel's process, learnt from who published its write; until both are seen.
        by_pid: dict[int, Stub] = {}
        stubs: list[Stub] = []
        for _ in range(64):
            stub = open_channel(channels, plane.target)
            await stub.ResumeEnvironment(
                cp.ResumeEnvironmentRequest(environment_id=seeded.env_id), timeout=10
            )
            message = await asyncio.wait_for(watch.read(), 10)
            by_pid.setdefault(source_pid(message.invalidation), stub)
            stubs.append(stub)
            if len(by_pid) == 2:
                break
        watch.cancel()
        assert set(by_pid) == children, f"answered by {set(by_pid)}, children {children}"

        # Both caches hold the environment unpaused; a pause through one reaches both.
        for stub in stubs:
            reply = await stub.GetEnvironment(
                cp.GetEnvironmentRequest(environment_id=seeded.env_id)
            )
            assert not reply.environment.paused
        await admin.PauseEnvironment(cp.PauseEnvironmentRequest(environment_id=seeded.env_id))

        async def every_process_sees() -> bool:
            replies = await asyncio.gather(
                *(
                    stub.GetEnvironment(cp.GetEnvironmentRequest(environment_id=seeded.env_id))
                    for stub in by_pid.values()
                )
            )
            return all(reply.environment.paused for reply in replies)

        took = await until(every_process_sees)
        print(f"pause visible in both processes after {took * 1000:.0f} ms")
        assert took < PROPAGATION_LIMIT_SECONDS

        # One metrics endpoint, the sum of both processes.
        def handled(method: str) -> float:
            url = f"http://127.0.0.1:{plane.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as reply:
                text = reply.read().decode()
            return sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("grpc_server_handled_total{")
                and f'grpc_method="{method}"' in line
            )

        assert handled("ResumeEnvironment") == len(stubs)
        # Each stub read once before the pause, then each process's stub at least once more.
        assert handled("GetEnvironment") >= len(stubs) + len(by_pid)


async def test_one_sigterm_drains_every_process(
    stack: LocalStack, admin: Stub, controlplane_writer: asyncpg.Connection, tmp_path: Path
) -> None:
    seeded = await _seed(admin)
    async with (
        two_processes(
            stack, tmp_path / "controlplane.log", RUNOPS_GRACE_PERIOD_SECONDS="15"
        ) as plane,
        fresh_channels() as channels,
    ):
        children = plane.children()
        assert len(children) == 2
        # A slow call: its UPDATE waits on a row lock the test holds.
        lock = controlplane_writer.transaction()
        await lock.start()
        await controlplane_writer.execute(
            "SELECT 1 FROM runtime_environments WHERE id = $1 FOR UPDATE", seeded.env_id
        )
        stub = open_channel(channels, plane.target)
        call = asyncio.ensure_future(
            stub.PauseEnvironment(
                cp.PauseEnvironmentRequest(environment_id=seeded.env_id), timeout=30
            )
        )

        async def waiting_on_the_lock() -> bool:
            waiting = await controlplane_writer.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND application_name = 'runops-controlplane'"
            )
            return bool(waiting)

        await until(waiting_on_the_lock, limit=10)
        plane.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1)
        assert plane.proc.poll() is None, "the parent exited with a call in flight"
        await lock.rollback()
        reply = await call
        assert reply.environment.paused
        code = await asyncio.to_thread(plane.proc.wait, 30)
        assert code == 0, log_tail(plane.log_file, 40)
        assert not plane.children()
        for pid in children:
            assert _gone(pid)


async def test_a_process_that_dies_stops_the_others(stack: LocalStack, tmp_path: Path) -> None:
    async with two_processes(stack, tmp_path / "controlplane.log") as plane:
        first, second = sorted(plane.children())
        os.kill(first, signal.SIGKILL)
        code = await asyncio.to_thread(plane.proc.wait, 30)
        assert code != 0
        assert _gone(second)
        assert "exited unexpectedly" in plane.log_file.read_text()


async def test_processes_stop_when_their_parent_is_killed(
    stack: LocalStack, tmp_path: Path
) -> None:
    async with two_processes(stack, tmp_path / "controlplane.log") as plane:
        children = plane.children()
        plane.proc.kill()
        plane.proc.wait()

        async def all_gone() -> bool:
            return all(_gone(pid) for pid in children)

        await until(all_gone, limit=30, interval=0.1)


def test_a_bad_process_count_exits_2_naming_the_variable(stack: LocalStack) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.controlplane"],
        env={**os.environ, **stack.service_env(), "RUNOPS_PROCESSES": "lots"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "RUNOPS_PROCESSES" in done.stderr


def _gone(pid: int) -> bool:
    """Exited (a zombie not yet reaped by its parent counts)."""
    try:
        return " Z " in Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True


async def _seed(admin: Stub) -> Seeded:
    from tests.controlplane.harness import seed

    return await seed(admin)
