"""runops.controlplane.v1.ControlPlaneService: cached resolves and admin writes."""

from __future__ import annotations

from typing import Any

import grpc

from runops.controlplane.model import (
    environment_not_found,
    no_worker,
    organization_not_found,
    select_tasks,
)
from runops.controlplane.v1 import controlplane_pb2 as cp
from runops.controlplane.v1 import controlplane_pb2_grpc as cp_grpc
from services.controlplane import validation
from services.controlplane.invalidation import InvalidationHub
from services.controlplane.reads import CachedReads
from services.controlplane.store import ControlPlaneStore

Context = grpc.aio.ServicerContext[Any, Any]


class ControlPlaneServicer(cp_grpc.ControlPlaneServiceServicer):
    def __init__(self, store: ControlPlaneStore, reads: CachedReads, hub: InvalidationHub) -> None:
        self._store = store
        self._reads = reads
        self._hub = hub

    # -- resolve RPCs -----------------------------------------------------------------------
    async def AuthenticateApiKey(
        self, request: cp.AuthenticateApiKeyRequest, context: Context
    ) -> cp.AuthenticateApiKeyResponse:
        env = await self._reads.authenticate(request.api_key)
        return cp.AuthenticateApiKeyResponse(environment=env)

    async def GetEnvironment(
        self, request: cp.GetEnvironmentRequest, context: Context
    ) -> cp.GetEnvironmentResponse:
        env_id = validation.environment_id(request.environment_id)
        env = await self._reads.environment(env_id)
        if env is None:
            raise environment_not_found(env_id)
        return cp.GetEnvironmentResponse(environment=env)

    async def BatchGetEnvironments(
        self, request: cp.BatchGetEnvironmentsRequest, context: Context
    ) -> cp.BatchGetEnvironmentsResponse:
        ids = validation.environment_ids(list(request.environment_ids))
        found = await self._reads.environments(ids)
        return cp.BatchGetEnvironmentsResponse(
            environments=[found[i] for i in ids if i in found],
            missing_ids=[i for i in ids if i not in found],
        )

    async def ResolveWorkerVersion(
        self, request: cp.ResolveWorkerVersionRequest, context: Context
    ) -> cp.ResolveWorkerVersionResponse:
        query = validation.resolve_worker(request)
        env = await self._reads.environment(query.environment_id)
        if env is None:
            raise environment_not_found(query.environment_id)
        resolution = await self._reads.worker(env, query.worker)
        if resolution is None:
            raise no_worker(env, query.worker)
        worker, tasks = select_tasks(resolution, query.task_identifiers)
        return cp.ResolveWorkerVersionResponse(worker=worker, tasks=tasks)

    async def GetOrganizationFlags(
        self, request: cp.GetOrganizationFlagsRequest, context: Context
    ) -> cp.GetOrganizationFlagsResponse:
        org_id = validation.organization_id(request.organization_id)
        flags = await self._reads.flags(org_id)
        if flags is None:
            raise organization_not_found(org_id)
        return cp.GetOrganizationFlagsResponse(flags=flags)

    # -- admin RPCs -------------------------------------------------------------------------
    async def CreateOrganization(
        self, request: cp.CreateOrganizationRequest, context: Context
    ) -> cp.CreateOrganizationResponse:
        validation.create_organization(request)
        org = await self._store.create_organization(request.slug, request.title)
        return cp.CreateOrganizationResponse(organization=org)

    async def CreateProject(
        self, request: cp.CreateProjectRequest, context: Context
    ) -> cp.CreateProjectResponse:
        validation.create_project(request)
        project = await self._store.create_project(
            request.organization_id, request.slug, request.name
        )
        return cp.CreateProjectResponse(project=project)

    async def CreateEnvironment(
        self, request: cp.CreateEnvironmentRequest, context: Context
    ) -> cp.CreateEnvironmentResponse:
        env_type = validation.create_environment(request)
        env, api_key = await self._store.create_environment(
            request.project_id, request.slug, env_type
        )
        return cp.CreateEnvironmentResponse(environment=env, api_key=api_key)

    async def BootstrapOrganization(
        self, request: cp.BootstrapOrganizationRequest, context: Context
    ) -> cp.BootstrapOrganizationResponse:
        org, project, envs = await self._store.bootstrap_organization(
            validation.bootstrap_organization(request)
        )
        return cp.BootstrapOrganizationResponse(
            organization=org,
            project=project,
            environments=[cp.CreatedEnvironment(environment=e, api_key=k) for e, k in envs],
        )

    async def RotateApiKey(
        self, request: cp.RotateApiKeyRequest, context: Context
    ) -> cp.RotateApiKeyResponse:
        env, api_key = await self._store.rotate_api_key(
            validation.environment_id(request.environment_id)
        )
        return cp.RotateApiKeyResponse(environment=env, api_key=api_key)

    async def PauseEnvironment(
        self, request: cp.PauseEnvironmentRequest, context: Context
    ) -> cp.PauseEnvironmentResponse:
        env = await self._store.set_paused(validation.environment_id(request.environment_id), True)
        return cp.PauseEnvironmentResponse(environment=env)

    async def ResumeEnvironment(
        self, request: cp.ResumeEnvironmentRequest, context: Context
    ) -> cp.ResumeEnvironmentResponse:
        env = await self._store.set_paused(validation.environment_id(request.environment_id), False)
        return cp.ResumeEnvironmentResponse(environment=env)

    async def SetOrganizationFlags(
        self, request: cp.SetOrganizationFlagsRequest, context: Context
    ) -> cp.SetOrganizationFlagsResponse:
        flags = await self._store.set_flags(validation.set_flags(request))
        return cp.SetOrganizationFlagsResponse(flags=flags)

    async def RegisterWorker(
        self, request: cp.RegisterWorkerRequest, context: Context
    ) -> cp.RegisterWorkerResponse:
        tasks = validation.register_worker(request)
        worker, stored = await self._store.register_worker(
            request.environment_id, request.version, request.sdk_version, tasks
        )
        return cp.RegisterWorkerResponse(worker=worker, tasks=stored)

    async def PromoteWorker(
        self, request: cp.PromoteWorkerRequest, context: Context
    ) -> cp.PromoteWorkerResponse:
        validation.promote_worker(request)
        worker = await self._store.promote_worker(request.environment_id, request.worker_id)
        return cp.PromoteWorkerResponse(worker=worker)

    # -- invalidation stream ----------------------------------------------------------------
    async def WatchInvalidations(
        self, request: cp.WatchInvalidationsRequest, context: Context
    ) -> Any:
        if request.organization_id:
            validation.organization_id(request.organization_id)
        subscription = self._hub.subscribe(request.organization_id)
        try:
            while (message := await subscription.next()) is not None:
                yield message
        finally:
            self._hub.unsubscribe(subscription)
