"""One backoff policy for everything that retries (after redis-py's Backoff/Retry objects).

A policy is a value: `compute(failures)` is the delay after that many consecutive failures
(1 for the first). Loops that reconnect (`runops.kit.background.Worker`) and calls that retry
(`Retry`) share it, so every retry in the suite grows, caps and spreads the same way.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import structlog

log = structlog.get_logger("runops.backoff")

T = TypeVar("T")

# 2**62 times any sensible base is past any cap; larger exponents would overflow a float.
_MAX_EXPONENT = 62


@dataclass(frozen=True)
class ExponentialBackoff:
    """`base` after the first failure, doubling up to `cap`. With `jitter` (0..1) each delay
    is drawn uniformly from [(1 - jitter)·d, d], so clients that failed together (a restart, a
    lost feed) do not come back together, and a delay never exceeds `cap`."""

    base: float = 0.1
    cap: float = 5.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.cap:
            raise ValueError(f"need 0 < base <= cap, got base={self.base} cap={self.cap}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter is a fraction in [0, 1], got {self.jitter}")

    def nominal(self, failures: int) -> float:
        """The delay before jitter."""
        exponent = min(max(failures, 1) - 1, _MAX_EXPONENT)
        return min(self.cap, self.base * 2.0**exponent)

    def compute(self, failures: int) -> float:
        delay = self.nominal(failures)
        if self.jitter:
            delay -= delay * self.jitter * random.random()
        return delay

    def delays(self) -> Iterator[float]:
        """compute(1), compute(2), … without end."""
        failures = 0
        while True:
            failures += 1
            yield self.compute(failures)


@dataclass(frozen=True)
class Retry:
    """Call an operation until it succeeds, at most `attempts` times (0: without end), waiting
    `backoff` between tries. Only `retry_on` exceptions are retried; the last one propagates."""

    backoff: ExponentialBackoff
    attempts: int = 3
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    async def call(self, operation: Callable[[], Awaitable[T]], *, what: str = "operation") -> T:
        failures = 0
        while True:
            try:
                return await operation()
            except self.retry_on as exc:
                failures += 1
                if self.attempts and failures >= self.attempts:
                    raise
                delay = self.backoff.compute(failures)
                log.warning("retrying", what=what, error=repr(exc), retry_in=round(delay, 3))
                await asyncio.sleep(delay)
