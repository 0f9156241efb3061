"""The run store's background jobs per database (the seal-timeout reaper, TTL expiry): a kit
`Worker` that repeats a step under the database's lease for that job. Only the lease holder
works; each job's statements are correct without it (the lease avoids duplicate work)."""

from __future__ import annotations

import abc
import asyncio
import os
import socket
import uuid
from collections.abc import Awaitable, Callable

import structlog

from runops.kit.background import Worker
from runops.kit.backoff import ExponentialBackoff

log = structlog.get_logger("runops.runstore")


class LeasedJob(abc.ABC):
    def __init__(
        self, name: str, interval: float, release: Callable[[str], Awaitable[None]]
    ) -> None:
        """`release(holder)` gives the lease up (on shutdown)."""
        self.interval = interval
        self._release_lease = release
        # Unique per process (several run on one host, and a restarted one is a new holder).
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.holding = False
        self.worker = Worker(
            name,
            self._run,
            backoff=ExponentialBackoff(base=interval, cap=max(interval, 30.0)),
        )

    @abc.abstractmethod
    async def step(self) -> list[str] | None:
        """One step: the ids it acted on, or None when another process holds the lease."""

    def again_at_once(self, done: list[str]) -> bool:
        """Whether to step again without waiting the interval (a backlog)."""
        return False

    async def _run(self) -> None:
        try:
            while True:
                done = await self.step()
                self.holding = done is not None
                self.worker.ready.set()
                if done is None or not self.again_at_once(done):
                    await asyncio.sleep(self.interval)
        finally:
            if self.holding:
                await self._release()

    async def _release(self) -> None:
        """Another process may take over at once instead of after the lease expires."""
        try:
            await asyncio.wait_for(self._release_lease(self.holder), 2)
        except Exception as exc:
            log.warning("releasing a lease failed", job=self.worker.name, error=repr(exc))
        self.holding = False
