"""A 100,000-item batch through gRPC (issue 8): chunks that overlap (duplicates) and leave holes,
exact missing ranges midway and at the end, seal, and every run listed by pages exactly once.
Correctness only; runops.bench.runstore times the same flow and samples the service's
RSS."""

from __future__ import annotations

import pytest

from runops.runstore.v1 import runstore_pb2 as rs
from tests.runstore.harness import RYW, Stub, batch_request, items, new_env

pytestmark = pytest.mark.slow

N = 100_000
# Chunks of the service's maximum (10,000 items), each starting 100 indexes before the previous
# one ended: those 100 come back as duplicates with the run written the first time.
CHUNK = 10_000
STEP = 9_900
MIDWAY = 4 * STEP + CHUNK  # the end of the fifth chunk: 49,600
# Never sent with the chunks: the first and last index, single ones, a run of 250, and one that
# is also the start of a chunk's overlap.
HOLES = [(0, 1), (7, 8), (4_999, 5_000), (9_900, 9_901), (55_555, 55_556), (70_000, 70_250),
         (99_999, 100_000)]  # fmt: skip
ABSENT = {i for start, end in HOLES for i in range(start, end)}
PAGE = 1000


async def missing(
    client: Stub, batch_id: str, env: str, max_ranges: int = 0
) -> rs.GetBatchMissingRangesResponse:
    return await client.GetBatchMissingRanges(
        rs.GetBatchMissingRangesRequest(
            batch_id=batch_id, environment_id=env, max_ranges=max_ranges, consistency=RYW
        )
    )


def ranges(reply: rs.GetBatchMissingRangesResponse) -> list[tuple[int, int]]:
    return [(r.start, r.end) for r in reply.ranges]


async def test_hundred_thousand_items_accept_missing_seal_list(client: Stub) -> None:
    env = new_env()
    batch = (await client.CreateBatch(batch_request(env, N))).batch.friendly_id
    run_ids: list[str] = [""] * N  # the run each index got the first time it was sent

    async def accept(indexes: list[int]) -> int:
        reply = await client.AcceptBatchItems(
            rs.AcceptBatchItemsRequest(batch_id=batch, environment_id=env, items=items(indexes))
        )
        assert [item.index for item in reply.items] == indexes
        for item in reply.items:
            assert item.duplicate == bool(run_ids[item.index]), item.index
            if item.duplicate:
                assert item.run_id == run_ids[item.index], item.index
            else:
                run_ids[item.index] = item.run_id
        return reply.accepted_count

    for start in range(0, N, STEP):
        end = min(start + CHUNK, N)
        accepted = await accept([i for i in range(start, end) if i not in ABSENT])
        assert accepted == sum(1 for i in range(end) if i not in ABSENT)
        if end == MIDWAY:
            reply = await missing(client, batch, env)
            assert ranges(reply) == [h for h in HOLES if h[0] < MIDWAY] + [(MIDWAY, N)]
            assert not reply.truncated
            assert reply.accepted_count == accepted
        if end == N:
            break

    reply = await missing(client, batch, env)
    assert ranges(reply) == HOLES
    assert not reply.truncated
    assert (reply.run_count, reply.accepted_count) == (N, N - len(ABSENT))
    first_two = await missing(client, batch, env, max_ranges=2)
    assert ranges(first_two) == HOLES[:2]
    assert first_two.truncated

    sealed = await client.SealBatch(rs.SealBatchRequest(batch_id=batch, environment_id=env))
    assert sealed.outcome == rs.SEAL_BATCH_OUTCOME_COUNT_MISMATCH

    # The holes, with a present index either side of each (duplicates).
    refill = sorted(ABSENT | {i for s, e in HOLES for i in (s - 1, e) if 0 <= i < N})
    assert await accept(refill) == N
    reply = await missing(client, batch, env)
    assert ranges(reply) == []
    assert reply.accepted_count == N

    sealed = await client.SealBatch(rs.SealBatchRequest(batch_id=batch, environment_id=env))
    assert sealed.outcome == rs.SEAL_BATCH_OUTCOME_SEALED
    assert sealed.batch.accepted_count == N

    listed = bytearray(N)
    token, pages = "", 0
    while True:
        page = await client.ListBatchRuns(
            rs.ListBatchRunsRequest(
                batch_id=batch, environment_id=env, page_size=PAGE, page_token=token
            )
        )
        pages += 1
        assert len(page.runs) <= PAGE
        for run in page.runs:
            index = run.batch_index
            assert not listed[index], f"index {index} listed twice"
            listed[index] = 1
            assert run.friendly_id == run_ids[index]
            assert run.batch_id == batch
        token = page.next_page_token
        if not token:
            break
    assert sum(listed) == N
    assert pages in (N // PAGE, N // PAGE + 1)
