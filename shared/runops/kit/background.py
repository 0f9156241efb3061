"""One lifecycle for a process's background work (feeds, subscriptions, drainers, reapers).

    feed = Worker("invalidation-feed", listen, backoff=ExponentialBackoff(0.1, 5.0))
    app.add_background(feed, ready_timeout=10)   # or feed.start() / await feed.stop()

- `start()` runs the body in its own task with a fresh context (it must not inherit the
  deadline or log context of the RPC that happened to start it);
- `ready` is set by the body once it is up (connected, subscribed) and cleared when a run ends;
- `stopping()` runs when the server's shutdown begins, before in-flight RPCs drain (end
  streams, stop taking new work), through the `on_stopping` hook;
- `stop(within)` cancels and waits at most that long: a body that ignores cancellation is
  reported and left behind, never allowed to hold up the rest of shutdown.

A `BackgroundTask` runs its body once (a long one-shot job); a `Worker` runs it again after
every end, waiting the backoff policy's delay: failures in a row grow it, a run that got
ready starts it over.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

from runops.kit.backoff import ExponentialBackoff

log = structlog.get_logger("runops.background")

Body = Callable[[], Coroutine[Any, Any, object]]
Hook = Callable[[], Awaitable[object] | None]

DEFAULT_STOP_TIMEOUT_SECONDS = 5.0


class BackgroundTask:
    def __init__(
        self,
        name: str,
        body: Body,
        *,
        on_stopping: Hook | None = None,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT_SECONDS,
    ) -> None:
        self.name = name
        self._body = body
        self._on_stopping = on_stopping
        self.stop_timeout = stop_timeout
        # Set by the body once it is up; cleared whenever a run ends.
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(
                self._main(), name=self.name, context=contextvars.Context()
            )

    async def wait_ready(self, within: float) -> bool:
        """True once ready; False if not ready within `within` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ready.wait(), within)
        return self.ready.is_set()

    async def stopping(self) -> None:
        """Shutdown began (before the server drains): the `on_stopping` hook, once."""
        hook, self._on_stopping = self._on_stopping, None
        if hook is not None:
            result = hook()
            if result is not None:
                await result

    async def stop(self, within: float | None = None) -> bool:
        """Cancel and wait at most `within` seconds (default `stop_timeout`); True if it ended."""
        task = self._task
        if task is None:
            return True
        if not task.done():
            task.cancel()
            # Not wait_for: it would wait for the cancellation to take effect, however long.
            await asyncio.wait({task}, timeout=self.stop_timeout if within is None else within)
        if not task.done():
            log.error("background task ignored cancellation; leaving it behind", task=self.name)
            return False
        with contextlib.suppress(BaseException):
            task.result()
        return True

    async def _main(self) -> None:
        try:
            await self._body()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background task failed", task=self.name)
        finally:
            self.ready.clear()


class Worker(BackgroundTask):
    """Runs its body again after every end (return or failure) until stopped."""

    def __init__(
        self,
        name: str,
        body: Body,
        *,
        backoff: ExponentialBackoff | None = None,
        on_stopping: Hook | None = None,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT_SECONDS,
    ) -> None:
        super().__init__(name, body, on_stopping=on_stopping, stop_timeout=stop_timeout)
        self.backoff = backoff or ExponentialBackoff(base=0.1, cap=5.0, jitter=0.5)
        # Runs in a row that ended without getting ready.
        self.failures = 0

    async def _main(self) -> None:
        while True:
            error: Exception | None = None
            try:
                await self._body()
            except asyncio.CancelledError:
                self.ready.clear()
                raise
            except Exception as exc:
                error = exc
            self.failures = 1 if self.ready.is_set() else self.failures + 1
            self.ready.clear()
            delay = self.backoff.compute(self.failures)
            if error is not None:
                log.warning(
                    "background worker failed; retrying",
                    task=self.name,
                    error=repr(error),
                    failures=self.failures,
                    retry_in=round(delay, 3),
                )
            await asyncio.sleep(delay)
