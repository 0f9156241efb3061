"""The mollifier as other services use it (batch ingest, the CLI): the stub on a kit channel
(internal token, request id, deadline propagation, round_robin) and typed helpers. A caller's
mistake comes back as the domain error it was raised as; transient failures stay AioRpcError.

    async with MollifierClient(target, token=internal_token) as mollifier:
        reply = await mollifier.trigger(m.TriggerRequest(environment_id=env, task_identifier=t))
        answers = await mollifier.claim_keys(environment_id=env, keys=[KeyToClaim("task", "key-1")])
        for answer in answers:  # runops.mollifier.claims
            if answer.outcome is ClaimOutcome.CLAIMED: ...   # write, then publish_keys
            elif answer.outcome is ClaimOutcome.EXISTING_RUN: ...  # link to answer.existing_run_id
            elif answer.outcome is ClaimOutcome.SKIPPED: ...  # no claim: write, the key is unique
            else: ...  # PENDING: still held by another caller after the wait; retry it
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import grpc

from runops.common.v1 import common_pb2
from runops.kit.clients import ServiceClient, consistency
from runops.kit.errors import NotFound
from runops.kit.limits import MAX_KEYS_PER_CALL
from runops.mollifier.claims import ClaimAnswer, ClaimOutcome, KeyToClaim
from runops.mollifier.v1 import mollifier_pb2 as m
from runops.mollifier.v1 import mollifier_pb2_grpc as m_grpc


class MollifierClient(ServiceClient):
    def __init__(
        self, target: str, *, token: str | None = None, channel: grpc.aio.Channel | None = None
    ) -> None:
        super().__init__(target, token=token, channel=channel)
        self.stub = m_grpc.MollifierServiceStub(self._channel)

    # -- triggers and reads -------------------------------------------------------------------
    async def trigger(self, request: m.TriggerRequest) -> m.TriggerResponse:
        """`buffered` (and run.buffered) when the run waits in the buffer; the id is final."""
        return await self._call(self.stub.Trigger, request)

    async def get_run(
        self, *, environment_id: str, run_id: str, read_your_writes: bool = False
    ) -> common_pb2.Run | None:
        """The run from the run store, else from the buffer (`buffered`); None when absent."""
        request = m.GetRunRequest(
            environment_id=environment_id, run_id=run_id, consistency=consistency(read_your_writes)
        )
        try:
            return (await self._call(self.stub.GetRun, request)).run
        except NotFound:
            return None

    async def find_run_by_idempotency_key(
        self,
        *,
        environment_id: str,
        task_identifier: str,
        idempotency_key: str,
        read_your_writes: bool = False,
    ) -> common_pb2.Run | None:
        request = m.FindRunByIdempotencyKeyRequest(
            environment_id=environment_id,
            task_identifier=task_identifier,
            idempotency_key=idempotency_key,
            consistency=consistency(read_your_writes),
        )
        reply = await self._call(self.stub.FindRunByIdempotencyKey, request)
        return reply.run if reply.HasField("run") else None

    async def reset_idempotency_key(
        self, *, environment_id: str, task_identifier: str, idempotency_key: str
    ) -> m.ResetIdempotencyKeyResponse:
        request = m.ResetIdempotencyKeyRequest(
            environment_id=environment_id,
            task_identifier=task_identifier,
            idempotency_key=idempotency_key,
        )
        return await self._call(self.stub.ResetIdempotencyKey, request)

    async def buffer_stats(self, environment_id: str = "") -> m.GetBufferStatsResponse:
        request = m.GetBufferStatsRequest(environment_id=environment_id)
        return await self._call(self.stub.GetBufferStats, request)

    # -- claims (batch ingest) ----------------------------------------------------------------
    async def claim_keys(
        self,
        *,
        environment_id: str,
        keys: Sequence[KeyToClaim],
        wait: timedelta | None = None,
    ) -> list[ClaimAnswer]:
        """One answer per key, in order; more than MAX_KEYS_PER_CALL keys are sent in several
        calls. `wait`: how long the service waits for keys another caller holds (≤ 5 s; None:
        its default); keys still held then answer PENDING."""
        answers: list[ClaimAnswer] = []
        for start in range(0, len(keys), MAX_KEYS_PER_CALL):
            chunk = keys[start : start + MAX_KEYS_PER_CALL]
            request = m.ClaimIdempotencyKeysRequest(environment_id=environment_id)
            if wait is not None:
                request.wait.FromTimedelta(wait)
            for key in chunk:
                item = request.keys.add(
                    task_identifier=key.task_identifier,
                    idempotency_key=key.idempotency_key,
                    owner=key.owner,
                )
                if key.expires_at is not None:
                    item.idempotency_key_expires_at.FromDatetime(key.expires_at)
            reply = await self._call(self.stub.ClaimIdempotencyKeys, request)
            answers.extend(
                ClaimAnswer(key, ClaimOutcome(r.outcome), r.claim_token, r.existing_run_id)
                for key, r in zip(chunk, reply.results, strict=True)
            )
        return answers

    async def publish_keys(
        self, *, environment_id: str, published: Sequence[tuple[ClaimAnswer, str]]
    ) -> list[bool]:
        """(claim, run id written for it) each: True where the token still owned the claim."""
        results: list[bool] = []
        for start in range(0, len(published), MAX_KEYS_PER_CALL):
            request = m.PublishIdempotencyKeysRequest(environment_id=environment_id)
            for claim, run_id in published[start : start + MAX_KEYS_PER_CALL]:
                request.keys.add(
                    task_identifier=claim.key.task_identifier,
                    idempotency_key=claim.key.idempotency_key,
                    claim_token=claim.claim_token,
                    run_id=run_id,
                )
            results.extend((await self._call(self.stub.PublishIdempotencyKeys, request)).published)
        return results

    async def release_keys(
        self, *, environment_id: str, claims: Sequence[ClaimAnswer]
    ) -> list[bool]:
        """Claims whose runs were not written; True where the token still owned the claim."""
        results: list[bool] = []
        for start in range(0, len(claims), MAX_KEYS_PER_CALL):
            request = m.ReleaseIdempotencyKeysRequest(environment_id=environment_id)
            for claim in claims[start : start + MAX_KEYS_PER_CALL]:
                request.keys.add(
                    task_identifier=claim.key.task_identifier,
                    idempotency_key=claim.key.idempotency_key,
                    claim_token=claim.claim_token,
                )
            results.extend((await self._call(self.stub.ReleaseIdempotencyKeys, request)).released)
        return results
