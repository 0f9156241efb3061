"""A bounded in-process TTL cache whose invalidations can never be undone by a slow read.

Entries are tagged with scopes (e.g. ``org:<id>``, ``env:<id>``) so one invalidation drops every
entry that depends on an organization or an environment. Each invalidation stamps the key or the
scope with a tick of a process-wide clock; a load that started before that tick does not store
its (possibly stale) result. Absent results are cached too (confirmed absence), and concurrent
misses of one key share a single load (single flight).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from prometheus_client import Counter

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

CACHE_LOOKUPS = Counter(
    "runops_cache_lookups_total",
    "Cache lookups by cache and result (hit, miss, shared: joined a load in flight).",
    ["cache", "result"],
)
CACHE_INVALIDATIONS = Counter(
    "runops_cache_invalidations_total",
    "Invalidations applied, by cache and kind.",
    ["cache", "kind"],
)

# Stamps of keys/scopes older than every load in flight are useless; prune past this many.
_MAX_STAMPS = 4096


@dataclass(frozen=True)
class Loaded(Generic[V]):
    """What a loader returns: the value (None = confirmed absent) and the scopes it depends on."""

    value: V | None
    scopes: tuple[str, ...] = ()


@dataclass
class _Entry(Generic[V]):
    value: V | None
    scopes: tuple[str, ...]
    expires_at: float


class TtlCache(Generic[K, V]):
    def __init__(
        self,
        name: str,
        *,
        ttl_seconds: float = 30.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_seconds <= 0 or max_entries <= 0:
            raise ValueError("ttl_seconds and max_entries must be positive")
        self.name = name
        self.ttl_seconds = ttl_seconds
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._inflight: dict[K, tuple[int, asyncio.Future[V | None]]] = {}
        # The invalidation clock: every invalidation takes the next tick.
        self._tick = 0
        self._key_stamps: dict[K, int] = {}
        self._scope_stamps: dict[str, int] = {}
        self._cleared_at = 0
        # Stamps up to this tick were pruned: a load that started before it cannot be checked,
        # so it is not stored (batched loads via begin/offer are not tracked in _inflight).
        self._pruned_through = 0
        # While disabled (e.g. a consumer lost its invalidation feed) nothing is stored.
        self.enabled = True
        self._hits = CACHE_LOOKUPS.labels(name, "hit")
        self._misses = CACHE_LOOKUPS.labels(name, "miss")
        self._shared = CACHE_LOOKUPS.labels(name, "shared")

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, key: K) -> tuple[bool, V | None]:
        """(found, value) without loading; expired entries are not found."""
        entry = self._entries.get(key)
        if entry is None or entry.expires_at <= self._clock():
            return False, None
        return True, entry.value

    async def get(self, key: K, load: Callable[[], Awaitable[Loaded[V]]]) -> V | None:
        entry = self._entries.get(key)
        if entry is not None:
            if entry.expires_at > self._clock():
                self._entries.move_to_end(key)
                self._hits.inc()
                return entry.value
            del self._entries[key]
        pending = self._inflight.get(key)
        if pending is not None:
            self._shared.inc()
            try:
                return await asyncio.shield(pending[1])
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not pending[1].cancelled() or (task is not None and task.cancelling()):
                    raise
                # The caller that was loading was cancelled, not us: load ourselves.
                return await self.get(key, load)
        self._misses.inc()
        started = self._tick
        future: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = (started, future)
        try:
            loaded = await load()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            # Joined waiters see the exception; nobody else needs to retrieve it.
            future.exception()
            raise
        finally:
            if self._inflight.get(key, (None, None))[1] is future:
                del self._inflight[key]
        if self._still_valid(key, loaded.scopes, started):
            self._store(key, loaded)
        future.set_result(loaded.value)
        return loaded.value

    def begin(self) -> int:
        """A stamp to pass to `offer` for a value loaded outside `get` (batched loads)."""
        return self._tick

    def offer(self, key: K, loaded: Loaded[V], started: int) -> bool:
        """Store `loaded` unless something invalidated it since `started`; True if stored."""
        if self._still_valid(key, loaded.scopes, started) and key not in self._inflight:
            self._store(key, loaded)
            return True
        return False

    def _still_valid(self, key: K, scopes: Iterable[str], started: int) -> bool:
        if not self.enabled or self._cleared_at > started or self._pruned_through > started:
            return False
        if self._key_stamps.get(key, -1) > started:
            return False
        return all(self._scope_stamps.get(scope, -1) <= started for scope in scopes)

    def _store(self, key: K, loaded: Loaded[V]) -> None:
        self._entries[key] = _Entry(loaded.value, loaded.scopes, self._clock() + self.ttl_seconds)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def _next_tick(self) -> int:
        self._tick += 1
        if len(self._key_stamps) + len(self._scope_stamps) > _MAX_STAMPS:
            self._prune_stamps()
        return self._tick

    def _prune_stamps(self) -> None:
        oldest = min((started for started, _ in self._inflight.values()), default=self._tick)
        self._pruned_through = oldest
        self._key_stamps = {k: t for k, t in self._key_stamps.items() if t > oldest}
        self._scope_stamps = {s: t for s, t in self._scope_stamps.items() if t > oldest}

    def invalidate(self, key: K) -> None:
        self._key_stamps[key] = self._next_tick()
        self._entries.pop(key, None)
        CACHE_INVALIDATIONS.labels(self.name, "key").inc()

    def invalidate_scope(self, scope: str) -> int:
        """Drop every entry depending on `scope`; returns how many were dropped."""
        self._scope_stamps[scope] = self._next_tick()
        doomed = [key for key, entry in self._entries.items() if scope in entry.scopes]
        for key in doomed:
            del self._entries[key]
        CACHE_INVALIDATIONS.labels(self.name, "scope").inc()
        return len(doomed)

    def clear(self) -> None:
        """Drop everything, including what loads in flight would store."""
        self._cleared_at = self._next_tick()
        self._entries.clear()
        self._key_stamps.clear()
        self._scope_stamps.clear()
        CACHE_INVALIDATIONS.labels(self.name, "clear").inc()
