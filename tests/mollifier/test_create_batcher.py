"""The group commit of pass-through creates (`CreateBatcher`) against a run store stand-in:
concurrent callers share one CreateRuns and each gets its own run; a run refused, or a request
refused for a caller's mistake, is answered by CreateRun alone; a run store down fails every
caller of the batch with its (retryable) error."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import pytest

from runops.common.v1 import common_pb2
from runops.kit.errors import InvalidArgument
from runops.kit.ids import Residency, mint
from runops.runstore.v1 import runstore_pb2 as rs
from services.mollifier.create_batcher import CreateBatcher

BAD = b"bad"


def run_input(payload: bytes = b"{}", key: str = "") -> rs.RunInput:
    return rs.RunInput(
        run_id=mint("run", Residency.NEW),
        environment_id="env_1",
        task_identifier="t",
        payload=payload,
        options=common_pb2.TriggerOptions(idempotency_key=key),
    )


def down() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "run store down"
    )


class FakeRunStore:
    """Writes runs whose payload is not BAD; `refuse_whole` refuses a request holding a BAD
    run as a whole (as validation does), else it is that run's error only."""

    def __init__(self, *, refuse_whole: bool = False, failure: Exception | None = None) -> None:
        self.batches: list[list[str]] = []
        self.alone: list[str] = []
        self.refuse_whole = refuse_whole
        self.failure = failure

    def _run(self, run: rs.RunInput) -> common_pb2.Run:
        return common_pb2.Run(friendly_id=run.run_id, payload=run.payload)

    async def create_run(self, run: rs.RunInput) -> rs.CreateRunResponse:
        self.alone.append(run.run_id)
        if self.failure is not None:
            raise self.failure
        if run.payload == BAD:
            raise InvalidArgument("run.payload is bad", reason="BAD_PAYLOAD")
        return rs.CreateRunResponse(run=self._run(run), is_cached=bool(run.options.idempotency_key))

    async def create_runs(self, runs: Sequence[rs.RunInput]) -> list[rs.CreateRunResult]:
        self.batches.append([run.run_id for run in runs])
        await asyncio.sleep(0.001)
        if self.failure is not None:
            raise self.failure
        if self.refuse_whole and any(run.payload == BAD for run in runs):
            raise InvalidArgument("runs[0].payload is bad")
        return [
            rs.CreateRunResult(error=common_pb2.ItemError(code=3, reason="BAD_PAYLOAD"))
            if run.payload == BAD
            else rs.CreateRunResult(run=self._run(run))
            for run in runs
        ]


async def gather_creates(batcher: CreateBatcher, runs: Sequence[rs.RunInput]) -> list[object]:
    return await asyncio.gather(*(batcher.create(run) for run in runs), return_exceptions=True)


async def test_concurrent_callers_share_one_create_runs_and_each_gets_its_own_run() -> None:
    store = FakeRunStore()
    batcher = CreateBatcher(store, max_runs=100, max_wait_seconds=0.005)
    runs = [run_input(payload=f'{{"i": {i}}}'.encode()) for i in range(40)]
    answers = await gather_creates(batcher, runs)
    assert store.batches == [[run.run_id for run in runs]]
    assert not store.alone
    for run, answer in zip(runs, answers, strict=True):
        assert not isinstance(answer, BaseException)
        assert (answer.run.friendly_id, answer.run.payload) == (run.run_id, run.payload)  # type: ignore[attr-defined]


async def test_a_batch_is_sent_once_it_holds_max_runs() -> None:
    store = FakeRunStore()
    batcher = CreateBatcher(store, max_runs=10, max_wait_seconds=5)
    runs = [run_input() for _ in range(25)]
    answers = await asyncio.wait_for(gather_creates(batcher, runs[:20]), 2)
    assert [len(batch) for batch in store.batches] == [10, 10]
    assert all(not isinstance(a, BaseException) for a in answers)


@pytest.mark.parametrize("refuse_whole", [False, True], ids=["run-error", "request-refused"])
async def test_one_bad_run_fails_only_its_caller_with_create_runs_own_answer(
    refuse_whole: bool,
) -> None:
    store = FakeRunStore(refuse_whole=refuse_whole)
    batcher = CreateBatcher(store, max_runs=100, max_wait_seconds=0.005)
    runs = [run_input() for _ in range(5)]
    runs[2] = run_input(payload=BAD)
    answers = await gather_creates(batcher, runs)
    assert len(store.batches) == 1
    bad = answers[2]
    assert isinstance(bad, InvalidArgument)
    assert (bad.message, bad.reason) == ("run.payload is bad", "BAD_PAYLOAD")
    for i in (0, 1, 3, 4):
        answer = answers[i]
        assert not isinstance(answer, BaseException)
        assert answer.run.friendly_id == runs[i].run_id  # type: ignore[attr-defined]
    # Sent again alone: only the bad run after a run error, every run after a refused request.
    expected = [run.run_id for run in runs] if refuse_whole else [runs[2].run_id]
    assert sorted(store.alone) == sorted(expected)


async def test_run_store_down_fails_every_caller_with_its_retryable_error() -> None:
    failure = down()
    store = FakeRunStore(failure=failure)
    batcher = CreateBatcher(store, max_runs=100, max_wait_seconds=0.005)
    answers = await gather_creates(batcher, [run_input() for _ in range(8)])
    assert len(store.batches) == 1
    assert not store.alone
    for answer in answers:
        assert isinstance(answer, grpc.aio.AioRpcError)
        assert answer.code() is grpc.StatusCode.UNAVAILABLE


async def test_keyed_runs_are_created_alone() -> None:
    store = FakeRunStore()
    batcher = CreateBatcher(store, max_runs=100, max_wait_seconds=0.005)
    keyed, plain = run_input(key="k1"), run_input()
    answers = await gather_creates(batcher, [keyed, plain])
    assert store.alone == [keyed.run_id]
    assert store.batches == [[plain.run_id]]
    assert answers[0].is_cached  # type: ignore[attr-defined]


async def test_a_cancelled_caller_does_not_fail_the_others() -> None:
    store = FakeRunStore()
    batcher = CreateBatcher(store, max_runs=100, max_wait_seconds=0.01)
    runs = [run_input() for _ in range(3)]
    tasks = [asyncio.create_task(batcher.create(run)) for run in runs]
    await asyncio.sleep(0)
    tasks[0].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[0], asyncio.CancelledError)
    assert [a.run.friendly_id for a in done[1:]] == [r.run_id for r in runs[1:]]  # type: ignore[union-attr]
    assert store.batches == [[run.run_id for run in runs]]
