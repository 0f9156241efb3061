"""The control plane's cached reads: each answers from the process's ControlPlaneCache and
loads from the store on a miss (one load per key at a time; the entry carries the scopes an
invalidation drops it by). The resolve RPCs answer through these."""

from __future__ import annotations

from collections.abc import Sequence

from runops.controlplane.cache import (
    ControlPlaneCache,
    loaded_environment,
    loaded_flags,
    loaded_worker,
)
from runops.controlplane.model import WorkerResolution, hash_api_key, invalid_api_key
from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.kit.cache import Loaded
from services.controlplane.store import ControlPlaneStore


class CachedReads:
    def __init__(self, store: ControlPlaneStore, cache: ControlPlaneCache) -> None:
        self._store = store
        self._cache = cache

    async def authenticate(self, api_key: str) -> cp.Environment:
        """Every key takes the same path: hash, cache, indexed lookup of the hash. Comparing
        digests rather than keys means timing can only ever reveal bits of a sha256."""
        key_hash = hash_api_key(api_key)

        async def load() -> Loaded[cp.Environment]:
            env = await self._store.environment_by_key_hash(key_hash)
            return Loaded(None) if env is None else loaded_environment(env.id, env)

        env = await self._cache.api_keys.get(key_hash, load)
        if env is None:
            raise invalid_api_key()
        return env

    async def environment(self, env_id: str) -> cp.Environment | None:
        async def load() -> Loaded[cp.Environment]:
            found = await self._store.environments([env_id])
            return loaded_environment(env_id, found.get(env_id))

        return await self._cache.environments.get(env_id, load)

    async def environments(self, ids: Sequence[str]) -> dict[str, cp.Environment]:
        """The environments among `ids` that exist (one store call for every id not cached)."""
        return await self._cache.environments_batch(ids, self._store.environments)

    async def worker(self, env: cp.Environment, worker: str) -> WorkerResolution | None:
        """The worker `worker` names in `env` (its current one when empty) with its tasks."""

        async def load() -> Loaded[WorkerResolution]:
            return loaded_worker(env, await self._store.worker(env.id, worker))

        return await self._cache.workers.get((env.id, worker), load)

    async def flags(self, org_id: str) -> cp.OrganizationFlags | None:
        async def load() -> Loaded[cp.OrganizationFlags]:
            return loaded_flags(org_id, await self._store.flags(org_id))

        return await self._cache.flags.get(org_id, load)
