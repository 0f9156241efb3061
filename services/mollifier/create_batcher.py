"""Group commit of the gate's pass-through creates (spec §7: the Trigger burst): concurrent
triggers that pass the gate are written by one `CreateRuns` call instead of a `CreateRun` each,
and each caller is answered with its own run or error.

A batch is sent once it holds `max_runs` runs, or `max_wait` after its first run arrived
(0: on the event loop's next turn, which still gathers callers already waiting). Each answer is
what `CreateRun` would have given that caller:
- a written run (or the live run holding its idempotency key, `is_cached`) goes back as is;
- a run refused within the batch, or every run of a batch the run store refused as a whole for a
  caller's mistake (one invalid run fails the request's validation), is sent again alone through
  `CreateRun`, so its caller gets that call's own answer (field paths, details) and a bad run
  never fails the others;
- a transient failure of the whole call (the run store down, a deadline) fails every caller of
  the batch with that same error, which the kit answers as a retryable status.

Runs keep their pre-minted ids, so a run sent again alone after a refusal is written at most once.
Idempotency-keyed runs are not batched: they go through `CreateRun` one by one, as before.
The batch's call runs outside any caller's request context: one caller's short deadline or
cancellation does not fail the others' runs.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from runops.common.v1 import common_pb2
from runops.kit.errors import RunopsError
from runops.runstore.v1 import runstore_pb2 as rs


class RunCreator(Protocol):
    """What the batcher needs of the run store (`RunStoreClient`)."""

    async def create_run(self, run: rs.RunInput) -> rs.CreateRunResponse: ...

    async def create_runs(self, runs: Sequence[rs.RunInput]) -> list[rs.CreateRunResult]: ...


@dataclass(frozen=True)
class Created:
    run: common_pb2.Run
    is_cached: bool


@dataclass
class _Batch:
    runs: list[rs.RunInput] = field(default_factory=list)
    answers: list[asyncio.Future[Created]] = field(default_factory=list)


class CreateBatcher:
    def __init__(self, run_store: RunCreator, *, max_runs: int, max_wait_seconds: float) -> None:
        if max_runs < 1 or max_wait_seconds < 0:
            raise ValueError("max_runs must be positive and max_wait_seconds not negative")
        self._run_store = run_store
        self.max_runs = max_runs
        self.max_wait = max_wait_seconds
        self._open: _Batch | None = None
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    async def create(self, run: rs.RunInput) -> Created:
        """`run` written with the next batch (or alone, if keyed): CreateRun's answer."""
        if run.options.idempotency_key or self.max_runs == 1:
            return await self._alone(run)
        loop = asyncio.get_running_loop()
        batch = self._open
        if batch is None:
            batch = self._open = _Batch()
            if self.max_wait > 0:
                self._timer = loop.call_later(self.max_wait, self._flush)
            else:
                self._timer = loop.call_soon(self._flush)
        answer: asyncio.Future[Created] = loop.create_future()
        batch.runs.append(run)
        batch.answers.append(answer)
        if len(batch.runs) >= self.max_runs:
            self._flush()
        return await answer

    def _flush(self) -> None:
        batch, self._open = self._open, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if batch is None:
            return
        # A fresh context: no caller's deadline or request id rides on the batch's call.
        task = asyncio.get_running_loop().create_task(
            self._send(batch), context=contextvars.Context()
        )
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: _Batch) -> None:
        try:
            await self._write(batch)
        finally:  # cancelled (the service stopping): nobody waits forever
            for answer in batch.answers:
                answer.cancel()

    async def _write(self, batch: _Batch) -> None:
        try:
            results = await self._run_store.create_runs(batch.runs)
        except RunopsError:
            # A caller's mistake refused the whole request: each run alone.
            results = None
        except Exception as exc:
            for answer in batch.answers:
                if not answer.done():
                    answer.set_exception(exc)
            return
        again: list[int] = []
        if results is None or len(results) != len(batch.runs):
            again.extend(range(len(batch.runs)))
        else:
            for i, (answer, result) in enumerate(zip(batch.answers, results, strict=True)):
                if result.HasField("error"):
                    again.append(i)
                elif not answer.done():
                    answer.set_result(Created(result.run, result.is_cached))
        await asyncio.gather(*(self._answer_alone(batch.runs[i], batch.answers[i]) for i in again))

    async def _answer_alone(self, run: rs.RunInput, answer: asyncio.Future[Created]) -> None:
        try:
            created = await self._alone(run)
        except Exception as exc:
            if not answer.done():
                answer.set_exception(exc)
            return
        if not answer.done():
            answer.set_result(created)

    async def _alone(self, run: rs.RunInput) -> Created:
        created = await self._run_store.create_run(run)
        return Created(created.run, created.is_cached)
