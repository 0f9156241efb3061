"""The bounded TTL cache: expiry, bound, confirmed absence, single flight, and epochs that keep
an invalidation from being undone by a load that started before it."""

from __future__ import annotations

import asyncio

import pytest

from runops.kit.cache import Loaded, TtlCache


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Loader:
    """Counts loads; each returns the next value (or what `values` says)."""

    def __init__(self, value: str | None = "v", scopes: tuple[str, ...] = ()) -> None:
        self.calls = 0
        self.value = value
        self.scopes = scopes
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> Loaded[str]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        value = None if self.value is None else f"{self.value}{self.calls}"
        return Loaded(value, self.scopes)


def cache(clock: FakeClock | None = None, **kw: float) -> TtlCache[str, str]:
    return TtlCache("test", clock=clock or FakeClock(), **kw)  # type: ignore[arg-type]


async def test_hit_until_the_ttl_then_reload() -> None:
    clock = FakeClock()
    c = cache(clock, ttl_seconds=30)
    load = Loader()
    assert await c.get("k", load) == "v1"
    clock.now += 29.9
    assert await c.get("k", load) == "v1"
    clock.now += 0.2
    assert await c.get("k", load) == "v2"
    assert load.calls == 2


async def test_absence_is_cached_too() -> None:
    c = cache()
    load = Loader(value=None)
    assert await c.get("k", load) is None
    assert await c.get("k", load) is None
    assert load.calls == 1
    assert c.peek("k") == (True, None)


async def test_bounded_least_recently_used_goes_first() -> None:
    c = cache(max_entries=2)
    await c.get("a", Loader("a"))
    await c.get("b", Loader("b"))
    await c.get("a", Loader("x"))  # touch a: b is now the oldest
    await c.get("c", Loader("c"))
    assert len(c) == 2
    assert c.peek("a") == (True, "a1")
    assert c.peek("b") == (False, None)


async def test_concurrent_misses_share_one_load() -> None:
    c = cache()
    load = Loader()
    load.gate = asyncio.Event()
    waiters = [asyncio.create_task(c.get("k", load)) for _ in range(20)]
    await asyncio.sleep(0)
    load.gate.set()
    assert await asyncio.gather(*waiters) == ["v1"] * 20
    assert load.calls == 1


async def test_a_failed_load_reaches_every_waiter_and_is_not_cached() -> None:
    c = cache()
    gate = asyncio.Event()

    async def failing() -> Loaded[str]:
        await gate.wait()
        raise ConnectionError("db down")

    waiters = [asyncio.create_task(c.get("k", failing)) for _ in range(3)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    assert await c.get("k", Loader()) == "v1"


async def test_a_cancelled_loader_does_not_cancel_the_waiters() -> None:
    c = cache()
    first = Loader()
    first.gate = asyncio.Event()
    leader = asyncio.create_task(c.get("k", first))
    await asyncio.sleep(0)
    follower = asyncio.create_task(c.get("k", Loader("f")))
    await asyncio.sleep(0)
    leader.cancel()
    assert await follower == "f1"
    with pytest.raises(asyncio.CancelledError):
        await leader


async def test_invalidation_during_a_load_is_not_undone() -> None:
    c = cache()
    load = Loader()
    load.gate = asyncio.Event()
    pending = asyncio.create_task(c.get("k", load))
    await asyncio.sleep(0)
    c.invalidate("k")  # the row changed while the (stale) read was in flight
    load.gate.set()
    assert await pending == "v1"  # that caller gets what it read...
    assert c.peek("k") == (False, None)  # ...but it is not kept
    assert await c.get("k", load) == "v2"


async def test_scope_invalidation_during_a_load_is_not_undone() -> None:
    c = cache()
    load = Loader(scopes=("org:o1", "env:e1"))
    load.gate = asyncio.Event()
    pending = asyncio.create_task(c.get("k", load))
    await asyncio.sleep(0)
    c.invalidate_scope("org:o1")
    load.gate.set()
    await pending
    assert c.peek("k") == (False, None)


async def test_invalidation_before_a_load_does_not_block_it() -> None:
    c = cache()
    c.invalidate("k")
    c.invalidate_scope("org:o1")
    await c.get("k", Loader(scopes=("org:o1",)))
    assert c.peek("k") == (True, "v1")


async def test_scope_invalidation_drops_only_dependants() -> None:
    c = cache()
    await c.get("a", Loader(scopes=("org:o1", "env:e1")))
    await c.get("b", Loader(scopes=("org:o1", "env:e2")))
    await c.get("c", Loader(scopes=("org:o2", "env:e3")))
    assert c.invalidate_scope("env:e1") == 1
    assert c.invalidate_scope("org:o1") == 1
    assert [k for k in "abc" if c.peek(k)[0]] == ["c"]


async def test_clear_during_a_load_and_disabled_cache_store_nothing() -> None:
    c = cache()
    load = Loader()
    load.gate = asyncio.Event()
    pending = asyncio.create_task(c.get("k", load))
    await asyncio.sleep(0)
    c.clear()
    load.gate.set()
    await pending
    assert c.peek("k") == (False, None)
    c.enabled = False
    await c.get("k", load)
    assert len(c) == 0


async def test_offer_respects_epochs() -> None:
    c = cache()
    started = c.begin()
    c.invalidate("stale")
    assert not c.offer("stale", Loaded("old"), started)
    assert c.offer("fresh", Loaded("new"), started)
    assert c.peek("fresh") == (True, "new")


async def test_stamps_stay_bounded_under_many_invalidations() -> None:
    c = cache()
    for i in range(20_000):
        c.invalidate(f"k{i}")
    assert len(c._key_stamps) <= 4097


async def test_a_batched_load_older_than_pruned_stamps_is_not_stored() -> None:
    c = cache()
    started = c.begin()
    c.invalidate("k")  # happened during the batched load...
    for i in range(5000):  # ...and its stamp is pruned away by many later ones
        c.invalidate(f"other{i}")
    assert "k" not in c._key_stamps
    assert not c.offer("k", Loaded("stale"), started)
    assert c.offer("k", Loaded("fresh"), c.begin())
