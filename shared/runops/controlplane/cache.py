"""The control plane's cache layout, shared by the server and by every client-side cache, so an
Invalidation means the same thing wherever it is applied. What is cached, and the refusals a
cached absence turns into, are in `runops.controlplane.model`.

Entries carry scopes: ``org:<id>`` (everything of an organization), ``env:<id>`` (an environment
and the API key resolving to it) and ``workers:<env id>`` (resolved worker versions).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

from runops.controlplane.model import WorkerResolution
from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.kit.cache import Loaded, TtlCache


def org_scope(organization_id: str) -> str:
    return f"org:{organization_id}"


def env_scope(environment_id: str) -> str:
    return f"env:{environment_id}"


def workers_scope(environment_id: str) -> str:
    return f"workers:{environment_id}"


def environment_scopes(env: cp.Environment) -> tuple[str, ...]:
    return (org_scope(env.organization.id), env_scope(env.id))


def loaded_environment(env_id: str, env: cp.Environment | None) -> Loaded[cp.Environment]:
    """An environment (or its confirmed absence) as a cache entry with its scopes."""
    if env is None:
        return Loaded(None, (env_scope(env_id),))
    return Loaded(env, environment_scopes(env))


def loaded_worker(
    env: cp.Environment, resolution: WorkerResolution | None
) -> Loaded[WorkerResolution]:
    return Loaded(resolution, (*environment_scopes(env), workers_scope(env.id)))


def loaded_flags(org_id: str, flags: cp.OrganizationFlags | None) -> Loaded[cp.OrganizationFlags]:
    return Loaded(flags, (org_scope(org_id),))


class _Scoped(Protocol):
    def invalidate_scope(self, scope: str) -> int: ...
    def clear(self) -> None: ...


class ControlPlaneCache:
    """One bounded TTL cache per kind of lookup, each holding up to `max_entries`. Keys: the API
    key's hash; an environment id; (environment id, worker); an organization id."""

    def __init__(self, name: str, *, ttl_seconds: float, max_entries: int) -> None:
        ttl, size = ttl_seconds, max_entries
        self.api_keys: TtlCache[bytes, cp.Environment] = TtlCache(
            f"{name}.api_keys", ttl_seconds=ttl, max_entries=size
        )
        self.environments: TtlCache[str, cp.Environment] = TtlCache(
            f"{name}.environments", ttl_seconds=ttl, max_entries=size
        )
        self.workers: TtlCache[tuple[str, str], WorkerResolution] = TtlCache(
            f"{name}.workers", ttl_seconds=ttl, max_entries=size
        )
        self.flags: TtlCache[str, cp.OrganizationFlags] = TtlCache(
            f"{name}.flags", ttl_seconds=ttl, max_entries=size
        )
        self._all: tuple[_Scoped, ...] = (
            self.api_keys,
            self.environments,
            self.workers,
            self.flags,
        )

    @property
    def enabled(self) -> bool:
        return self.api_keys.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        for cache in (self.api_keys, self.environments, self.workers, self.flags):
            cache.enabled = value

    async def environments_batch(
        self,
        ids: Sequence[str],
        load_missing: Callable[[list[str]], Awaitable[Mapping[str, cp.Environment]]],
    ) -> dict[str, cp.Environment]:
        """The environments among `ids` that exist: cached ones from the cache, all the others
        with one `load_missing` call (what it does not return is cached as absent)."""
        cache = self.environments
        found: dict[str, cp.Environment] = {}
        missing: list[str] = []
        for env_id in ids:
            hit, env = cache.peek(env_id)
            if not hit:
                missing.append(env_id)
            elif env is not None:
                found[env_id] = env
        if missing:
            started = cache.begin()
            loaded = await load_missing(missing)
            for env_id in missing:
                env = loaded.get(env_id)
                cache.offer(env_id, loaded_environment(env_id, env), started)
                if env is not None:
                    found[env_id] = env
        return found

    def _drop_scope(self, scope: str) -> None:
        for cache in self._all:
            cache.invalidate_scope(scope)

    def apply(self, invalidation: cp.Invalidation) -> None:
        """Drop what `invalidation` makes stale; an unknown kind drops everything."""
        kind, key = invalidation.kind, invalidation.key
        if kind == cp.INVALIDATION_KIND_API_KEY:
            try:
                self.api_keys.invalidate(bytes.fromhex(key))
            except ValueError:
                self.clear()
        elif kind == cp.INVALIDATION_KIND_ENVIRONMENT:
            self._drop_scope(env_scope(key))
        elif kind == cp.INVALIDATION_KIND_ORGANIZATION:
            self._drop_scope(org_scope(key))
        elif kind == cp.INVALIDATION_KIND_WORKER:
            self.workers.invalidate_scope(workers_scope(key))
        else:
            self.clear()

    def clear(self) -> None:
        for cache in self._all:
            cache.clear()
