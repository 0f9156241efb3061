"""Keyed batch items resolved through the mollifier's batched claims (spec §5, §4): a key held
by a run still buffered in the mollifier, by a persisted run, by an organization without the
mollifier flag (SKIPPED: the run store's unique key dedups), claims released when a unit fails
before its runs were written, and the claim failing open when the mollifier or its Redis is
down."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from prometheus_client import REGISTRY

from runops.common.v1 import common_pb2
from runops.ingest.v1 import ingest_pb2 as ing
from runops.kit.errors import Aborted
from runops.localstack.ports import free_port
from runops.localstack.settings import INTERNAL_TOKEN
from runops.mollifier.claims import ClaimAnswer, ClaimOutcome, KeyToClaim
from runops.mollifier.client import MollifierClient
from runops.mollifier.v1 import mollifier_pb2 as m
from services.ingest.app import Ingest
from services.ingest.keyed import KEY_BUSY, KeyedItem, MollifierKeyedItems
from services.mollifier.app import Mollifier
from services.mollifier.builders import drainer_of
from tests.controlplane.harness import Seeded
from tests.harness import expect_error
from tests.ingest.harness import (
    Stub,
    Suite,
    database_of,
    ingest_in_process,
    item,
    requests,
    stub,
)
from tests.mollifier.service_harness import (
    TASK,
    body,
    runs_in_postgres,
    seeded_env,
    start_mollifier,
    trigger_request,
)
from tests.mollifier.service_harness import stub as mollifier_stub


def keyed(index: int, key: str, **fields: Any) -> ing.BatchItem:
    return item(index, task=TASK, options=common_pb2.TriggerOptions(idempotency_key=key), **fields)


async def outcomes(
    suite: Suite, api: Stub, batch: common_pb2.Batch
) -> dict[int, ing.BatchItemOutcome]:
    """The batch's items by index, once its replica has replayed what was written so far
    (ListBatchItems reads a replica)."""
    await database_of(suite, batch).wait_for_replica()
    request = ing.ListBatchItemsRequest(batch_id=batch.friendly_id, page_size=1000)
    return {o.index: o for o in (await api.ListBatchItems(request)).items}


async def runs_with_key(suite: Suite, env: str, key: str) -> list[str]:
    """Ids (bodies) of the runs of `env` holding `key`, read on both writers directly."""
    found: list[str] = []
    for db in (suite.stack.controlplane_db, suite.stack.runops_db):
        conn = await asyncpg.connect(db.admin_writer_dsn)
        try:
            rows = await conn.fetch(
                "SELECT id FROM runs WHERE environment_id = $1 AND idempotency_key = $2", env, key
            )
        finally:
            await conn.close()
        found += [row["id"] for row in rows]
    return found


async def flagged(suite: Suite) -> Seeded:
    return await seeded_env(suite.controlplane_target, enabled=True)


async def test_an_item_links_to_a_run_still_buffered_in_the_mollifier(
    suite: Suite, ingest: Ingest, mollifier: Mollifier
) -> None:
    env = await flagged(suite)
    triggers = mollifier_stub(suite.mollifier_target)
    # A burst past the gate (the suite's: 20 per second): some runs wait in the buffer.
    replies = await asyncio.gather(
        *(
            triggers.Trigger(
                trigger_request(
                    env.env_id, options=common_pb2.TriggerOptions(idempotency_key=f"burst-{i}")
                )
            )
            for i in range(300)
        )
    )
    buffered = [r for r in replies if r.buffered]
    assert buffered, "the gate tripped"
    target = buffered[-1].run
    assert (await mollifier.buffer.stats(env.env_id)).depth == len(buffered)

    api = stub(ingest.app.target, env.api_key)
    batch = (await api.CreateBatch(ing.CreateBatchRequest(run_count=2))).batch
    chunk = [keyed(0, target.idempotency_key), keyed(1, "fresh-key")]
    reply = await api.StreamBatchItems(requests(batch.friendly_id, chunk))
    assert reply.sealed
    assert reply.linked_count == 1
    found = await outcomes(suite, api, batch)
    assert found[0].outcome == ing.ITEM_OUTCOME_LINKED
    assert found[0].run_id == target.friendly_id
    assert found[1].outcome == ing.ITEM_OUTCOME_CREATED
    # Nothing of the key in Postgres yet: the run is still buffered, and no new run was made.
    assert await runs_with_key(suite, env.env_id, target.idempotency_key) == []

    drainer = drainer_of(mollifier.buffer, mollifier.run_store, mollifier.settings)
    while (await mollifier.buffer.stats(env.env_id)).depth:
        await drainer.tick()
    assert await runs_with_key(suite, env.env_id, target.idempotency_key) == [
        body(target.friendly_id)
    ]
    assert len(await runs_in_postgres(suite.stack, env.env_id)) == 300 + 1


async def test_an_item_links_to_a_persisted_run_and_a_repeated_key_to_one_run(
    suite: Suite, ingest: Ingest
) -> None:
    env = await flagged(suite)
    triggers = mollifier_stub(suite.mollifier_target)
    options = common_pb2.TriggerOptions(idempotency_key="k-persisted")
    persisted = await triggers.Trigger(trigger_request(env.env_id, options=options))
    assert not persisted.buffered, "a fresh environment's first trigger passes the gate"

    api = stub(ingest.app.target, env.api_key)
    batch = (await api.CreateBatch(ing.CreateBatchRequest(run_count=5))).batch
    # Units of 2 items, one at a time: "k-twice" is claimed in one unit (and repeated there),
    # then found published by the next.
    async with ingest_in_process(suite, max_chunk_items=2, ingest_concurrency=1) as small:
        small_api = stub(small.app.target, env.api_key)
        chunk = [
            keyed(0, "k-persisted"),
            item(1, task=TASK),
            keyed(2, "k-twice"),
            keyed(3, "k-twice"),
            keyed(4, "k-twice"),
        ]
        reply = await small_api.StreamBatchItems(requests(batch.friendly_id, chunk))
    assert reply.sealed
    found = await outcomes(suite, api, batch)
    assert found[0].outcome == ing.ITEM_OUTCOME_LINKED
    assert found[0].run_id == persisted.run.friendly_id
    assert found[2].outcome == ing.ITEM_OUTCOME_CREATED
    twice = found[2].run_id
    assert found[3].outcome == found[4].outcome == ing.ITEM_OUTCOME_LINKED
    assert found[3].run_id == found[4].run_id == twice
    assert await runs_with_key(suite, env.env_id, "k-twice") == [body(twice)]
    assert len(await runs_with_key(suite, env.env_id, "k-persisted")) == 1
    # The claim was published with the run: a single trigger with the key gets it.
    again = await triggers.Trigger(
        trigger_request(env.env_id, options=common_pb2.TriggerOptions(idempotency_key="k-twice"))
    )
    assert again.is_cached
    assert again.run.friendly_id == twice


async def test_an_organization_without_the_flag_still_dedups_through_the_run_store(
    suite: Suite, ingest: Ingest
) -> None:
    env = await seeded_env(suite.controlplane_target, enabled=False)
    async with MollifierClient(suite.mollifier_target, token=INTERNAL_TOKEN) as client:
        claims = await client.claim_keys(
            environment_id=env.env_id, keys=[KeyToClaim(TASK, "k-off")]
        )
    assert [c.outcome for c in claims] == [ClaimOutcome.SKIPPED]

    triggers = mollifier_stub(suite.mollifier_target)
    options = common_pb2.TriggerOptions(idempotency_key="k-off")
    earlier = await triggers.Trigger(trigger_request(env.env_id, options=options))
    api = stub(ingest.app.target, env.api_key)
    batch = (await api.CreateBatch(ing.CreateBatchRequest(run_count=3))).batch
    chunk = [keyed(0, "k-off"), keyed(1, "k-off-new"), keyed(2, "k-off-new")]
    reply = await api.StreamBatchItems(requests(batch.friendly_id, chunk))
    assert reply.sealed
    found = await outcomes(suite, api, batch)
    assert found[0].outcome == ing.ITEM_OUTCOME_LINKED
    assert found[0].run_id == earlier.run.friendly_id
    assert found[2].outcome == ing.ITEM_OUTCOME_LINKED
    assert found[2].run_id == found[1].run_id
    assert len(await runs_with_key(suite, env.env_id, "k-off")) == 1
    assert len(await runs_with_key(suite, env.env_id, "k-off-new")) == 1


async def test_a_failed_unit_releases_its_claims(suite: Suite, ingest: Ingest) -> None:
    env = await flagged(suite)
    api = stub(ingest.app.target, env.api_key)
    batch = (await api.CreateBatch(ing.CreateBatchRequest(run_count=2))).batch
    # Claimed, then the offload fails (object store down): the unit writes nothing.
    chunk = [keyed(0, "k-released", payload=b"p" * 5000), keyed(1, "k-released-too")]
    async with ingest_in_process(suite, s3_endpoint_url=f"http://127.0.0.1:{free_port()}") as down:
        broken = stub(down.app.target, env.api_key)
        exc = await expect_error(
            broken.StreamBatchItems(requests(batch.friendly_id, chunk)),
            grpc.StatusCode.UNAVAILABLE,
        )
        assert exc.code() == grpc.StatusCode.UNAVAILABLE

    # Not held any more: claimable at once (a held key would answer PENDING after no wait).
    async with MollifierClient(suite.mollifier_target, token=INTERNAL_TOKEN) as client:
        keys = [KeyToClaim(TASK, "k-released"), KeyToClaim(TASK, "k-released-too")]
        claims = await client.claim_keys(environment_id=env.env_id, keys=keys, wait=timedelta(0))
        assert [c.outcome for c in claims] == [ClaimOutcome.CLAIMED] * 2
        assert await client.release_keys(environment_id=env.env_id, claims=claims) == [True, True]

    reply = await api.StreamBatchItems(requests(batch.friendly_id, chunk))
    assert reply.sealed
    assert reply.accepted_count == 2
    found = await outcomes(suite, api, batch)
    assert {o.outcome for o in found.values()} == {ing.ITEM_OUTCOME_CREATED}
    found_run = await mollifier_stub(suite.mollifier_target).FindRunByIdempotencyKey(
        m.FindRunByIdempotencyKeyRequest(
            environment_id=env.env_id, task_identifier=TASK, idempotency_key="k-released"
        )
    )
    assert found_run.run.friendly_id == found[0].run_id


class HeldElsewhere:
    """A mollifier whose every key another caller holds (PENDING after the wait)."""

    def __init__(self) -> None:
        self.claim_calls = 0

    async def claim_keys(
        self, environment_id: str, keys: list[KeyToClaim], *, wait: timedelta | None = None
    ) -> list[ClaimAnswer]:
        self.claim_calls += 1
        return [ClaimAnswer(key, ClaimOutcome.PENDING) for key in keys]


async def test_keys_held_elsewhere_fail_the_unit_retryably_after_the_rounds() -> None:
    held = HeldElsewhere()
    keyed_items = MollifierKeyedItems(held, rounds=3, pause_seconds=0.01)  # type: ignore[arg-type]
    items = [KeyedItem(0, TASK, "k-held"), KeyedItem(1, TASK, "k-held"), KeyedItem(2, TASK, "k2")]
    with pytest.raises(Aborted) as caught:
        await keyed_items.resolve("env_x", items, owner="batch_x")
    assert held.claim_calls == 3
    assert caught.value.reason == KEY_BUSY
    assert caught.value.metadata == {"keys": "2"}
    assert caught.value.retry_after == 1.0


def fail_open_count() -> float:
    return REGISTRY.get_sample_value("runops_ingest_keyed_fail_open_total") or 0.0


@contextlib.asynccontextmanager
async def unreachable_mollifier(suite: Suite, down: str) -> AsyncIterator[str]:
    """The target of a mollifier that cannot claim: stopped (nothing listens), or running on a
    Redis that is stopped (nothing listens on its port)."""
    if down == "mollifier":
        yield f"127.0.0.1:{free_port()}"
        return
    lost = await start_mollifier(
        redis={"url": f"redis://127.0.0.1:{free_port()}"},
        runstore_target=suite.runstore_target,
        controlplane_target=suite.controlplane_target,
    )
    try:
        yield lost.app.target
    finally:
        await lost.app.stop(grace=1)


@pytest.mark.parametrize("down", ["mollifier", "mollifier_redis"])
async def test_keyed_items_fail_open_to_the_run_store_when_the_mollifier_cannot_claim(
    suite: Suite, down: str
) -> None:
    env = await flagged(suite)
    fell_open = fail_open_count()
    async with (
        unreachable_mollifier(suite, down) as target,
        # Units of 3, one at a time: "k-a" repeats in a unit and across units.
        ingest_in_process(
            suite, mollifier_target=target, max_chunk_items=3, ingest_concurrency=1
        ) as lost,
    ):
        api = stub(lost.app.target, env.api_key)
        batch = (await api.CreateBatch(ing.CreateBatchRequest(run_count=6))).batch
        chunk = [
            keyed(0, "k-a"),
            keyed(1, "k-b"),
            keyed(2, "k-a"),
            keyed(3, "k-a"),
            item(4, task=TASK),
            keyed(5, "k-c"),
        ]
        reply = await api.StreamBatchItems(requests(batch.friendly_id, chunk))
        assert reply.sealed
        assert reply.accepted_count == 6
        found = await outcomes(suite, api, batch)
    assert fail_open_count() - fell_open == 5  # every keyed item, counted
    assert sorted(found) == list(range(6))
    assert all(o.run_id for o in found.values())
    assert found[0].outcome == ing.ITEM_OUTCOME_CREATED
    assert found[2].run_id == found[3].run_id == found[0].run_id
    assert found[2].outcome == found[3].outcome == ing.ITEM_OUTCOME_LINKED
    # One run per distinct key, and the unkeyed item's: four runs in Postgres for six items.
    runs = await runs_in_postgres(suite.stack, env.env_id)
    assert sorted(runs) == sorted({body(o.run_id) for o in found.values()})
    assert len(runs) == 4
    for key in ("k-a", "k-b", "k-c"):
        assert len(await runs_with_key(suite, env.env_id, key)) == 1
