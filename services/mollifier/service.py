"""runops.mollifier.v1.MollifierService: validate, call the domain, shape the answer."""

from __future__ import annotations

from typing import Any

import grpc

from runops.mollifier.claims import ClaimAnswer
from runops.mollifier.v1 import mollifier_pb2 as m
from runops.mollifier.v1 import mollifier_pb2_grpc as m_grpc
from services.mollifier import validation
from services.mollifier.claims import IdempotencyClaims
from services.mollifier.policy import Policies
from services.mollifier.runs import BufferedRuns, run_not_found
from services.mollifier.trigger import TriggerFront

Context = grpc.aio.ServicerContext[Any, Any]


def _key_result(answer: ClaimAnswer) -> m.ClaimKeyResult:
    return m.ClaimKeyResult(
        outcome=answer.outcome.value,
        claim_token=answer.claim_token,
        existing_run_id=answer.existing_run_id,
    )


class MollifierServicer(m_grpc.MollifierServiceServicer):
    def __init__(
        self,
        policies: Policies,
        front: TriggerFront,
        runs: BufferedRuns,
        claims: IdempotencyClaims,
    ) -> None:
        self._policies = policies
        self._front = front
        self._runs = runs
        self._claims = claims

    async def Trigger(self, request: m.TriggerRequest, context: Context) -> m.TriggerResponse:
        run = validation.trigger(request)
        policy = await self._policies.of(request.environment_id)
        done = await self._front.trigger(run, policy)
        return m.TriggerResponse(
            run=done.run, is_cached=done.is_cached, buffered=done.buffered, notice=done.notice
        )

    # -- reads ------------------------------------------------------------------------------
    async def GetRun(self, request: m.GetRunRequest, context: Context) -> m.GetRunResponse:
        read_your_writes = validation.get_run(request)
        run = await self._runs.get(
            request.environment_id, request.run_id, read_your_writes=read_your_writes
        )
        if run is None:
            raise run_not_found(request.run_id)
        return m.GetRunResponse(run=run)

    async def FindRunByIdempotencyKey(
        self, request: m.FindRunByIdempotencyKeyRequest, context: Context
    ) -> m.FindRunByIdempotencyKeyResponse:
        read_your_writes = validation.key_ref(
            request.environment_id,
            request.task_identifier,
            request.idempotency_key,
            request.consistency,
        )
        run = await self._runs.find_by_idempotency_key(
            request.environment_id,
            request.task_identifier,
            request.idempotency_key,
            read_your_writes=read_your_writes,
        )
        return m.FindRunByIdempotencyKeyResponse(run=run)

    async def ResetIdempotencyKey(
        self, request: m.ResetIdempotencyKeyRequest, context: Context
    ) -> m.ResetIdempotencyKeyResponse:
        validation.key_ref(request.environment_id, request.task_identifier, request.idempotency_key)
        reset = await self._runs.reset_idempotency_key(
            request.environment_id, request.task_identifier, request.idempotency_key
        )
        return m.ResetIdempotencyKeyResponse(
            cleared_count=reset.cleared_count, buffer_cleared=reset.buffer_cleared
        )

    # -- claims -----------------------------------------------------------------------------
    async def ClaimIdempotencyKey(
        self, request: m.ClaimIdempotencyKeyRequest, context: Context
    ) -> m.ClaimIdempotencyKeyResponse:
        claim = validation.claim(request)
        policy = await self._policies.of(request.environment_id)
        answer = await self._claims.claim(policy, claim)
        return m.ClaimIdempotencyKeyResponse(
            outcome=answer.outcome.value,
            claim_token=answer.claim_token,
            existing_run_id=answer.existing_run_id,
            existing_run=answer.existing_run,
        )

    async def PublishIdempotencyKey(
        self, request: m.PublishIdempotencyKeyRequest, context: Context
    ) -> m.PublishIdempotencyKeyResponse:
        claim = validation.publish(request)
        policy = await self._policies.of(request.environment_id)
        published = await self._claims.publish_many(
            policy, [(claim, request.claim_token, validation.friendly_run_id(request.run_id))]
        )
        return m.PublishIdempotencyKeyResponse(published=published[0])

    async def ReleaseIdempotencyKey(
        self, request: m.ReleaseIdempotencyKeyRequest, context: Context
    ) -> m.ReleaseIdempotencyKeyResponse:
        claim = validation.release(request)
        policy = await self._policies.of(request.environment_id)
        released = await self._claims.release_many(policy, [(claim, request.claim_token)])
        return m.ReleaseIdempotencyKeyResponse(released=released[0])

    async def ClaimIdempotencyKeys(
        self, request: m.ClaimIdempotencyKeysRequest, context: Context
    ) -> m.ClaimIdempotencyKeysResponse:
        claims, wait = validation.claim_many(request, self._claims.default_wait)
        policy = await self._policies.of(request.environment_id)
        answers = await self._claims.claim_many(policy, claims, wait)
        return m.ClaimIdempotencyKeysResponse(results=[_key_result(a) for a in answers])

    async def PublishIdempotencyKeys(
        self, request: m.PublishIdempotencyKeysRequest, context: Context
    ) -> m.PublishIdempotencyKeysResponse:
        published = validation.publish_many(request)
        policy = await self._policies.of(request.environment_id)
        return m.PublishIdempotencyKeysResponse(
            published=await self._claims.publish_many(policy, published)
        )

    async def ReleaseIdempotencyKeys(
        self, request: m.ReleaseIdempotencyKeysRequest, context: Context
    ) -> m.ReleaseIdempotencyKeysResponse:
        released = validation.release_many(request)
        policy = await self._policies.of(request.environment_id)
        return m.ReleaseIdempotencyKeysResponse(
            released=await self._claims.release_many(policy, released)
        )

    # -- mutations --------------------------------------------------------------------------
    async def AddRunTags(
        self, request: m.AddRunTagsRequest, context: Context
    ) -> m.AddRunTagsResponse:
        validation.add_tags(request)
        run = await self._runs.add_tags(request.environment_id, request.run_id, request.tags)
        return m.AddRunTagsResponse(run=run)

    async def UpdateRunMetadata(
        self, request: m.UpdateRunMetadataRequest, context: Context
    ) -> m.UpdateRunMetadataResponse:
        validation.update_metadata(request)
        run = await self._runs.update_metadata(
            request.environment_id, request.run_id, request.metadata, request.metadata_type
        )
        return m.UpdateRunMetadataResponse(run=run)

    async def RescheduleRun(
        self, request: m.RescheduleRunRequest, context: Context
    ) -> m.RescheduleRunResponse:
        delay_until = validation.reschedule(request)
        run = await self._runs.reschedule(request.environment_id, request.run_id, delay_until)
        return m.RescheduleRunResponse(run=run)

    async def CancelRun(self, request: m.CancelRunRequest, context: Context) -> m.CancelRunResponse:
        validation.cancel(request)
        run = await self._runs.cancel(request.environment_id, request.run_id, request.reason)
        return m.CancelRunResponse(run=run)

    # -- stats ------------------------------------------------------------------------------
    async def GetBufferStats(
        self, request: m.GetBufferStatsRequest, context: Context
    ) -> m.GetBufferStatsResponse:
        validation.stats(request)
        stats = await self._runs.stats(request.environment_id or None)
        if request.environment_id and not (stats[0].depth or stats[0].draining):
            # Nothing buffered: "empty" only for an environment that exists (else NOT_FOUND).
            await self._policies.of(request.environment_id)
        reply = m.GetBufferStatsResponse()
        for env in stats:
            item = reply.environments.add(
                environment_id=env.environment_id, depth=env.depth, draining=env.draining
            )
            if env.oldest_age is not None:
                item.oldest_entry_age.FromTimedelta(env.oldest_age)
            reply.total_depth += env.depth
            reply.total_draining += env.draining
        return reply
