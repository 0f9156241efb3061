"""A trigger's gate decision and buffer write in one Redis round trip
(`MollifierBuffer.gate_and_accept`), on real Redis and the 3-master Cluster."""

from __future__ import annotations

from typing import Any

import pytest

from runops.kit.redis import RedisClient
from services.mollifier.buffer import AcceptOutcome, MollifierBuffer
from services.mollifier.gate import Gate
from tests.mollifier.helpers import now, snapshot

ENV = "env_gate_accept"


class Calls:
    """Counts the buffer's script calls (by name) and its index writes."""

    def __init__(self, buffer: MollifierBuffer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.scripts: list[str] = []
        self.index_writes = 0
        call, hset = buffer.scripts.call, buffer.client.hset

        async def counted_call(name: str, keys: list[str], args: list[Any]) -> Any:
            self.scripts.append(name)
            return await call(name, keys, args)

        async def counted_hset(*args: Any, **kwargs: Any) -> Any:
            self.index_writes += 1
            return await hset(*args, **kwargs)

        monkeypatch.setattr(buffer.scripts, "call", counted_call)
        monkeypatch.setattr(buffer.client, "hset", counted_hset)

    def take(self) -> tuple[list[str], int]:
        taken = (self.scripts, self.index_writes)
        self.scripts, self.index_writes = [], 0
        return taken


def gate_of(buffer: MollifierBuffer, threshold: int) -> Gate:
    return Gate(
        buffer.scripts, prefix=buffer.prefix, threshold=threshold, window_seconds=60,
        hold_seconds=60,
    )  # fmt: skip


async def test_a_trigger_is_gated_and_buffered_in_one_round_trip(
    buffer: MollifierBuffer, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = gate_of(buffer, threshold=2)
    calls = Calls(buffer, monkeypatch)
    snaps = [snapshot(ENV) for _ in range(5)]
    outcomes = [await buffer.gate_and_accept(gate, snap, created_at=now()) for snap in snaps]
    # Two pass (nothing written), the third trips the gate and is buffered, the rest too.
    assert [o.decision.passed for o in outcomes] == [True, True, False, False, False]
    assert [o.decision.tripped_now for o in outcomes] == [False, False, True, False, False]
    assert [o.accepted.outcome if o.accepted else None for o in outcomes[2:]] == [
        AcceptOutcome.ACCEPTED
    ] * 3
    scripts, index_writes = calls.take()
    assert scripts == ["trigger"] * 5, "one script call per trigger, gate and write together"
    assert index_writes == 1, "the environment is indexed once, by its first entry"
    assert await buffer.environments() == {ENV: "org_1"}
    popped = await buffer.pop(ENV, 10, "owner")
    assert [e.run_id for e in popped] == [s.run_id for s in snaps[2:]]


async def test_an_environment_that_emptied_is_indexed_again_by_its_next_entry(
    buffer: MollifierBuffer, redis: RedisClient
) -> None:
    gate = gate_of(buffer, threshold=1)
    first, second = snapshot(ENV), snapshot(ENV)
    await buffer.gate_and_accept(gate, snapshot(ENV), created_at=now())  # takes the pass
    await buffer.gate_and_accept(gate, first, created_at=now())
    popped = await buffer.pop(ENV, 10, "owner")
    await buffer.ack(ENV, [e.run_id for e in popped])
    assert await buffer.forget_if_empty(ENV, "org_1")
    assert await buffer.environments() == {}
    # Within the refresh interval, but the environment held nothing: indexed at once.
    await buffer.gate_and_accept(gate, second, created_at=now())
    assert await buffer.environments() == {ENV: "org_1"}


async def test_a_live_key_answers_its_buffered_run_and_writes_nothing(
    buffer: MollifierBuffer,
) -> None:
    gate = gate_of(buffer, threshold=1)
    await buffer.gate_and_accept(gate, snapshot(ENV), created_at=now())  # takes the pass
    winner, loser = snapshot(ENV, idempotency_key="k"), snapshot(ENV, idempotency_key="k")
    won = await buffer.gate_and_accept(gate, winner, created_at=now())
    lost = await buffer.gate_and_accept(gate, loser, created_at=now())
    assert won.accepted is not None
    assert won.accepted.outcome is AcceptOutcome.ACCEPTED
    assert lost.accepted is not None
    assert (lost.accepted.outcome, lost.accepted.run_id) == (AcceptOutcome.EXISTING, winner.run_id)
    assert await buffer.get(ENV, loser.run_id) is None
    assert (await buffer.stats(ENV)).depth == 1
