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
    """Call an operation until it succeeds (redis-py's `Retry.call_with_retry` is the model).

    At most `attempts` tries (0: without end) and, with `budget`, no retry whose wait would end
    more than `budget` seconds after the first try started. An exception is retried when it is
    one of `retry_on` and `is_retryable(exc)` (when given) says so; anything else propagates at
    once. The wait is `delay_hint(exc)` when that gives a positive number (a server's RetryInfo),
    else the backoff. When the tries or the budget run out, `exhausted(exc, failures)` (when
    given) is raised from the last exception, else the last exception itself.
    """

    backoff: ExponentialBackoff
    attempts: int = 3
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    is_retryable: Callable[[BaseException], bool] | None = None
    delay_hint: Callable[[BaseException], float | None] | None = None
    exhausted: Callable[[BaseException, int], BaseException] | None = None
    budget: float | None = None
    # A poll (waiting for another caller's result) retries as its normal course: no warning.
    log_retries: bool = True

    def __post_init__(self) -> None:
        if self.attempts < 0:
            raise ValueError(f"attempts must be >= 0 (0: without end), got {self.attempts}")
        if self.budget is not None and self.budget < 0:
            raise ValueError(f"budget must be >= 0 seconds, got {self.budget}")

    def delay(self, exc: BaseException, failures: int) -> float:
        """The wait after `failures` consecutive failures, the last one `exc`."""
        hinted = self.delay_hint(exc) if self.delay_hint is not None else None
        if hinted is not None and hinted > 0:
            return hinted
        return self.backoff.compute(failures)

    async def call(self, operation: Callable[[], Awaitable[T]], *, what: str = "operation") -> T:
        loop = asyncio.get_running_loop()
        deadline = None if self.budget is None else loop.time() + self.budget
        failures = 0
        while True:
            try:
                return await operation()
            except self.retry_on as exc:
                if self.is_retryable is not None and not self.is_retryable(exc):
                    raise
                failures += 1
                delay = self.delay(exc, failures)
                out_of_tries = bool(self.attempts) and failures >= self.attempts
                out_of_time = deadline is not None and loop.time() + delay > deadline
                if out_of_tries or out_of_time:
                    if self.exhausted is not None:
                        raise self.exhausted(exc, failures) from exc
                    raise
                if self.log_retries:
                    log.warning("retrying", what=what, error=repr(exc), retry_in=round(delay, 3))
                await asyncio.sleep(delay)
