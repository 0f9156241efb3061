"""The bounded-concurrency engine of Phase 2 (spec §5): at most N units of work in flight.

`Pipeline(n).run(units, work)` pulls a unit (a chunk of items) from an async iterator only when
one of its N slots is free, and runs `work(unit)` in its own task. So:

- at most N units are pulled and unfinished at any time: peak memory is about N x the largest
  unit, and while every slot is busy nothing is read from the stream, so gRPC's flow control
  pushes back on the client (backpressure);
- N = 1 is strictly sequential: the next unit is pulled only after the previous one finished;
- the first failure (of a unit, or of the iterator itself: a bad message, a cancelled client)
  stops the pulling, lets the units already in flight finish (what they wrote stays written:
  nothing accepted is lost) and is raised; later failures are logged, not raised;
- cancelling `run` cancels the units in flight and waits for them before re-raising.

Instrumented: `in_flight` / `peak_in_flight` on the instance (tests), and Prometheus gauges
`runops_ingest_units_in_flight` (all streams of the process) and
`runops_ingest_stream_units_in_flight_peak` (the most any single stream had in flight: never above
RUNOPS_INGEST_CONCURRENCY).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import structlog
from prometheus_client import Counter, Gauge

log = structlog.get_logger("runops.ingest.pipeline")

T = TypeVar("T")

IN_FLIGHT = Gauge(
    "runops_ingest_units_in_flight",
    "Units of work (chunks) in flight, over every stream of the process.",
    multiprocess_mode="livesum",
)
STREAM_PEAK = Gauge(
    "runops_ingest_stream_units_in_flight_peak",
    "The most units any single stream had in flight (bounded by RUNOPS_INGEST_CONCURRENCY).",
    multiprocess_mode="max",
)
UNITS = Counter("runops_ingest_units", "Units of work finished, by outcome.", ("outcome",))

# The process-wide figure behind STREAM_PEAK (a gauge cannot be read back portably).
_process_peak = 0


class Pipeline(Generic[T]):
    """Runs units of work from a lazily pulled async iterator, at most `concurrency` at once."""

    def __init__(self, concurrency: int) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.concurrency = concurrency
        self.in_flight = 0
        self.peak_in_flight = 0
        self.pulled = 0
        self.completed = 0
        self._failure: BaseException | None = None
        self._failed = asyncio.Event()
        self._ran = False

    async def run(self, units: AsyncIterable[T], work: Callable[[T], Awaitable[object]]) -> int:
        """Process every unit; return how many were processed. Raises the first failure once
        the units in flight have finished."""
        if self._ran:
            raise RuntimeError("a Pipeline runs once (make one per stream)")
        self._ran = True
        slots = asyncio.Semaphore(self.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        iterator = aiter(units)

        async def one(unit: T) -> None:
            try:
                await work(unit)
                self.completed += 1
                UNITS.labels("ok").inc()
            except asyncio.CancelledError:
                UNITS.labels("cancelled").inc()
                raise
            except Exception as exc:
                UNITS.labels("failed").inc()
                self._fail(exc)
            finally:
                self._leave()
                # Released before this task is done, so the loop sees the failure first.
                slots.release()

        try:
            while self._failure is None:
                await slots.acquire()
                if self._failure is not None:
                    break
                try:
                    unit = await self._pull(iterator)
                except (StopAsyncIteration, _Stopped):
                    break
                except Exception as exc:
                    self._fail(exc)
                    break
                self._enter()
                task = asyncio.create_task(one(unit))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                del unit  # held by its task only
            if tasks:
                await asyncio.wait(set(tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            if hasattr(iterator, "aclose") and self._failure is not None:
                with contextlib.suppress(Exception):
                    await iterator.aclose()
        if self._failure is not None:
            raise self._failure
        return self.completed

    async def _pull(self, iterator: AsyncIterator[T]) -> T:
        """The next unit; _Stopped if a unit failed while we waited for it (a client that
        sends nothing more must not hold a failed stream open)."""
        pull = asyncio.ensure_future(anext(iterator))
        stop = asyncio.ensure_future(self._failed.wait())
        try:
            await asyncio.wait({pull, stop}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            pull.cancel()
            raise
        finally:
            stop.cancel()
        if not pull.done():
            pull.cancel()
            with contextlib.suppress(BaseException):
                await pull
            raise _Stopped
        self.pulled += 1
        return pull.result()

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
            self._failed.set()
        else:
            log.warning("another unit failed after the first failure", error=repr(exc))

    def _enter(self) -> None:
        global _process_peak
        self.in_flight += 1
        IN_FLIGHT.inc()
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight
            if self.in_flight > _process_peak:
                _process_peak = self.in_flight
                STREAM_PEAK.set(_process_peak)

    def _leave(self) -> None:
        self.in_flight -= 1
        IN_FLIGHT.dec()


class _Stopped(Exception):
    """Pulling stopped because a unit failed."""


def process_peak_in_flight() -> int:
    """The most units any one stream of this process had in flight so far."""
    return _process_peak


async def split_units(
    chunks: AsyncIterable[Sequence[T]], max_items: int
) -> AsyncIterator[Sequence[T]]:
    """Units of at most `max_items` from received chunks (a chunk larger than a unit is split;
    smaller ones are not merged, so nothing waits for the next message). A chunk that fits is
    one unit as it is: nothing is copied item by item."""
    if max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items}")
    async for chunk in chunks:
        if len(chunk) <= max_items:
            if chunk:
                yield chunk
            continue
        for start in range(0, len(chunk), max_items):
            yield chunk[start : start + max_items]
