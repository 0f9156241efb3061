"""The control plane as other services use it: the stub behind a client-side cache that a
WatchInvalidations subscription keeps fresh (reconnecting on its own).

    async with ControlPlaneClient(target, token=internal_token) as control_plane:
        env = await control_plane.authenticate_api_key(key)    # raises Unauthenticated
        app = ServiceApp(..., api_key_resolver=control_plane.authenticate_api_key)

While the subscription is down the client cannot know what changed, so it stores nothing new
(what it holds is served until its TTL) and asks the control plane for the rest; the first
message of every (re)subscription is a reset.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Self

import grpc
import structlog

from runops.controlplane.cache import (
    ControlPlaneCache,
    loaded_environment,
    loaded_flags,
    loaded_worker,
)
from runops.controlplane.model import (
    ENVIRONMENT_NOT_FOUND,
    INVALID_API_KEY,
    NO_CURRENT_WORKER,
    ORGANIZATION_NOT_FOUND,
    WORKER_NOT_FOUND,
    WorkerResolution,
    environment_not_found,
    hash_api_key,
    invalid_api_key,
    no_worker,
    organization_not_found,
    select_tasks,
)
from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.controlplane.v1 import controlplane_pb2_grpc as cp_grpc
from runops.kit.background import Worker
from runops.kit.backoff import ExponentialBackoff
from runops.kit.cache import Loaded
from runops.kit.clients import ServiceClient
from runops.kit.errors import FailedPrecondition, NotFound, details_of

log = structlog.get_logger("runops.controlplane.client")

# A watch is reopened this often (calls carry a deadline); each reopening starts with a reset.
WATCH_STREAM_SECONDS = 3600.0
MAX_BACKOFF_SECONDS = 5.0


class ControlPlaneClient(ServiceClient):
    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        cache_ttl_seconds: float = 30.0,
        cache_max_entries: int = 10_000,
        organization_id: str = "",
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        super().__init__(target, token=token, channel=channel)
        self.stub = cp_grpc.ControlPlaneServiceStub(self._channel)
        self.cache = ControlPlaneCache(
            "controlplane_client", ttl_seconds=cache_ttl_seconds, max_entries=cache_max_entries
        )
        self.cache.enabled = False
        self._organization_id = organization_id
        self._watch = Worker(
            "controlplane-watch",
            self._watch_once,
            backoff=ExponentialBackoff(base=0.1, cap=MAX_BACKOFF_SECONDS, jitter=0.5),
        )
        # Set while a subscription is live (after its reset); tests and health can wait on it.
        self.subscribed = self._watch.ready

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def start(self, wait_seconds: float = 5.0) -> None:
        """Subscribe in the background; wait up to `wait_seconds` for the first reset (the
        client works uncached until then)."""
        # The worker runs in a fresh context: it must not inherit the deadline of an RPC.
        self._watch.start()
        await self._watch.wait_ready(wait_seconds)

    @property
    def watch(self) -> Worker:
        """The resubscription worker, for a service that runs it on its ServiceApp instead
        (`app.add_background(client.watch)` starts and stops it with the server)."""
        return self._watch

    async def close(self) -> None:
        await self._watch.stop()
        await super().close()

    async def _watch_once(self) -> None:
        """One subscription, until its stream ends; the worker opens the next one."""
        request = cp.WatchInvalidationsRequest(organization_id=self._organization_id)
        try:
            call = self.stub.WatchInvalidations(request, timeout=WATCH_STREAM_SECONDS)
            async for message in call:
                if message.reset:
                    self.cache.clear()
                    self.cache.enabled = True
                    self.subscribed.set()
                else:
                    self.cache.apply(message.invalidation)
        except grpc.aio.AioRpcError as exc:
            # The periodic reopening is no failure; anything else is (the worker backs off).
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        finally:
            # Missed invalidations from here on: store nothing new, but serve what is cached
            # for the rest of its TTL (a control plane outage must not refuse live keys). The
            # next subscription's reset drops it all.
            self.cache.enabled = False

    # -- lookups ----------------------------------------------------------------------------
    async def authenticate_api_key(self, api_key: str) -> cp.Environment:
        """The key's environment; raises Unauthenticated for any key that is not live. Fits
        ServiceApp's `api_key_resolver`."""
        key_hash = hash_api_key(api_key)

        async def load() -> Loaded[cp.Environment]:
            request = cp.AuthenticateApiKeyRequest(api_key=api_key)
            try:
                reply = await self._call(self.stub.AuthenticateApiKey, request)
            except grpc.aio.AioRpcError as exc:
                # UNAUTHENTICATED is no caller's mistake to pass on: only a dead key is absent.
                if (
                    exc.code() == grpc.StatusCode.UNAUTHENTICATED
                    and details_of(exc).reason == INVALID_API_KEY
                ):
                    return Loaded(None)
                raise
            return loaded_environment(reply.environment.id, reply.environment)

        env = await self.cache.api_keys.get(key_hash, load)
        if env is None:
            raise invalid_api_key()
        return env

    async def get_environment(self, environment_id: str) -> cp.Environment | None:
        """None when the environment does not exist."""

        async def load() -> Loaded[cp.Environment]:
            request = cp.GetEnvironmentRequest(environment_id=environment_id)
            try:
                reply = await self._call(self.stub.GetEnvironment, request)
            except NotFound as err:
                if err.reason != ENVIRONMENT_NOT_FOUND:
                    raise
                return loaded_environment(environment_id, None)
            return loaded_environment(environment_id, reply.environment)

        return await self.cache.environments.get(environment_id, load)

    async def batch_get_environments(self, ids: Iterable[str]) -> dict[str, cp.Environment]:
        """The environments that exist among `ids`: cached ones locally, the rest in one call."""

        async def load_missing(missing: list[str]) -> dict[str, cp.Environment]:
            request = cp.BatchGetEnvironmentsRequest(environment_ids=missing)
            reply = await self._call(self.stub.BatchGetEnvironments, request)
            return {env.id: env for env in reply.environments}

        return await self.cache.environments_batch(list(dict.fromkeys(ids)), load_missing)

    async def resolve_worker_version(
        self, environment_id: str, *, worker: str = "", task_identifiers: Sequence[str] = ()
    ) -> WorkerResolution:
        """The worker new runs lock to and its task defaults (only `task_identifiers`, in that
        order, when given). Domain errors (NOT_FOUND, FAILED_PRECONDITION) pass through; "no
        such worker" and "no current worker yet" are cached as absence, as the server does."""
        env = await self.get_environment(environment_id)
        if env is None:
            raise environment_not_found(environment_id)

        async def load() -> Loaded[WorkerResolution]:
            request = cp.ResolveWorkerVersionRequest(environment_id=environment_id, worker=worker)
            try:
                reply = await self._call(self.stub.ResolveWorkerVersion, request)
            except (NotFound, FailedPrecondition) as err:
                if err.reason not in (WORKER_NOT_FOUND, NO_CURRENT_WORKER):
                    raise
                return loaded_worker(env, None)
            return loaded_worker(env, (reply.worker, tuple(reply.tasks)))

        resolution = await self.cache.workers.get((environment_id, worker), load)
        if resolution is None:
            raise no_worker(env, worker)
        return select_tasks(resolution, task_identifiers)

    async def get_organization_flags(self, organization_id: str) -> cp.OrganizationFlags:
        async def load() -> Loaded[cp.OrganizationFlags]:
            request = cp.GetOrganizationFlagsRequest(organization_id=organization_id)
            try:
                reply = await self._call(self.stub.GetOrganizationFlags, request)
            except NotFound as err:
                if err.reason != ORGANIZATION_NOT_FOUND:
                    raise
                return loaded_flags(organization_id, None)
            return loaded_flags(organization_id, reply.flags)

        flags = await self.cache.flags.get(organization_id, load)
        if flags is None:
            raise organization_not_found(organization_id)
        return flags
