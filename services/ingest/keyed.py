"""Items with an idempotency key: which of them link to an existing run (spec §5).

The contract the servicer uses is `KeyedItems.resolve(environment_id, items)`: for a unit's
keyed items, which already resolve to a run (link to it: `existing`), and a handle to settle
the claims it took once the unit was written (`publish`) or failed (`release`).

The target implementation is the mollifier's batched claim (spec §4: one call for many keys;
outcome per key: claimed, existing run — stored or still buffered —, skipped), with its read
fallback, so an item links to a run that is still in the mollifier's buffer too. The mollifier
does not exist yet: `RunStoreKeyedItems` is the INTERIM implementation, asking the run store
(`FindRunByIdempotencyKey`) directly. It links to every *persisted* live run holding the key;
within a batch the run store itself gives two items with one key one run (the second links).
What it cannot see: runs still buffered in the mollifier, and a concurrent single trigger of
the same key that the mollifier is about to drain (no claim serializes with it). Replace it
with the mollifier client's batched claim once that RPC exists; nothing else changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from runops.runstore.client import RunStoreClient

# Lookups of one unit in flight at once (a unit of 1000 keyed items is not 1000 calls at once).
INTERIM_LOOKUP_CONCURRENCY = 16


@dataclass(frozen=True)
class KeyedItem:
    index: int
    task_identifier: str
    idempotency_key: str


class KeyClaims(Protocol):
    """What `resolve` found for one unit's keyed items."""

    @property
    def existing(self) -> Mapping[int, str]:
        """Batch index -> id of the run the item links to (its key resolves to it)."""
        ...

    async def publish(self, run_ids: Mapping[int, str]) -> None:
        """After the unit was written: the runs created for the claimed keys (index -> run)."""
        ...

    async def release(self) -> None:
        """The unit failed: give up every claim taken, so another caller may create the run."""
        ...


class KeyedItems(Protocol):
    async def resolve(self, environment_id: str, items: Sequence[KeyedItem]) -> KeyClaims: ...


@dataclass
class ResolvedKeys:
    """Claims that need no settling (the interim resolver takes none)."""

    existing: dict[int, str] = field(default_factory=dict)

    async def publish(self, run_ids: Mapping[int, str]) -> None:
        return None

    async def release(self) -> None:
        return None


class RunStoreKeyedItems:
    """INTERIM (until the mollifier's batched claim RPC exists): persisted runs only."""

    def __init__(self, run_store: RunStoreClient) -> None:
        self._run_store = run_store

    async def resolve(self, environment_id: str, items: Sequence[KeyedItem]) -> ResolvedKeys:
        resolved = ResolvedKeys()
        # One lookup per distinct (task, key); items sharing one link to the same answer.
        keys = sorted({(item.task_identifier, item.idempotency_key) for item in items})
        found: dict[tuple[str, str], str] = {}
        slots = asyncio.Semaphore(INTERIM_LOOKUP_CONCURRENCY)

        async def look_up(task: str, key: str) -> None:
            async with slots:
                # The writers: a run created a moment ago by another chunk must be seen.
                run = await self._run_store.find_run_by_idempotency_key(
                    environment_id, task, key, read_your_writes=True
                )
            if run is not None:
                found[(task, key)] = run.friendly_id

        outcomes = await asyncio.gather(
            *(look_up(task, key) for task, key in keys), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        for item in items:
            run_id = found.get((item.task_identifier, item.idempotency_key))
            if run_id is not None:
                resolved.existing[item.index] = run_id
        return resolved
