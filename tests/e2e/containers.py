"""The compose stack's containers, for the checks only a real deployment shows (test_containers):
found by compose's labels through the `docker` CLI, so they work under `docker compose` v2 and
`docker-compose` 1.29 alike. The project comes from RUNOPS_E2E_COMPOSE_PROJECT (.ci/compose
sets it); without it those tests are skipped."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from dataclasses import dataclass
from typing import Any

PROJECT_VARIABLE = "RUNOPS_E2E_COMPOSE_PROJECT"
# The runops services and companions compose runs from the runops image.
SERVICES = ("controlplane", "runstore", "mollifier", "mollifier-drainer", "ingest")


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=check, timeout=120
    )


@dataclass(frozen=True)
class Compose:
    project: str

    def container(self, service: str) -> str:
        """The id of `service`'s one container (running or not)."""
        found = docker(
            "ps", "-aq",
            "--filter", f"label=com.docker.compose.project={self.project}",
            "--filter", f"label=com.docker.compose.service={service}",
        ).stdout.split()  # fmt: skip
        assert len(found) == 1, f"{service}: containers {found}"
        return found[0]

    def inspect(self, service: str) -> dict[str, Any]:
        inspected: list[dict[str, Any]] = json.loads(
            docker("inspect", self.container(service)).stdout
        )
        return inspected[0]

    def exec(self, service: str, *command: str) -> subprocess.CompletedProcess[str]:
        return docker("exec", self.container(service), *command, check=False)

    async def stop(self, service: str) -> None:
        """`docker stop`: the image's STOPSIGNAL, SIGKILL after compose's stop_grace_period."""
        await asyncio.to_thread(docker, "stop", "--time", "60", self.container(service))

    def start(self, service: str) -> None:
        docker("start", self.container(service))

    def restart(self, service: str) -> None:
        docker("restart", self.container(service))

    async def healthy(self, service: str, limit: float = 120.0) -> None:
        """Waits until the container's health check passes."""
        began = time.monotonic()
        while (state := self.inspect(service)["State"]).get("Health", {}).get("Status") != (
            "healthy"
        ):
            if time.monotonic() - began > limit:
                raise AssertionError(f"{service} not healthy within {limit:.0f}s: {state}")
            await asyncio.sleep(1)


def compose_project() -> str | None:
    return os.environ.get(PROJECT_VARIABLE) or None
