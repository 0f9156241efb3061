"""Idempotency claims in Redis (spec §4), the primitive: one attempt per key, never waiting.

`claim` takes a key with an ownership token (a UUID) for a TTL clamped to [min, max] by the
key's own expiry; a key already claimed answers PENDING, or EXISTING_RUN once its owner
published a run. A claim may name its `owner` (the caller's logical attempt, e.g. a batch): the
same non-empty owner asking for a key it holds unpublished gets it back, CLAIMED with the token
held and the TTL renewed as for a new claim, instead of waiting on itself (a claim a hung Redis
applied after the call that took it gave up would otherwise be held by nobody until its TTL). `publish` records the run id and `release` deletes the claim, each only with
the owner's token (compare-and-delete). A published claim whose key has expired is claimed
anew: after the key's TTL a trigger makes a new run. Waiting for a PENDING key and what a claim
means for a trigger or a batch is the protocol's (`claims.py`).

Every call is for one environment, whose keys share one Cluster slot (`keys.py`): a batch is one
script call per `batch_size` keys.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

from runops.mollifier.claims import ClaimAnswer, ClaimOutcome, KeyToClaim
from services.mollifier.entries import to_ms
from services.mollifier.keys import EnvKeys
from services.mollifier.scripts import Scripts

# The claim script's answers.
_OUTCOMES = {
    "claimed": ClaimOutcome.CLAIMED,
    "existing": ClaimOutcome.EXISTING_RUN,
    "pending": ClaimOutcome.PENDING,
}


class ClaimStore:
    def __init__(
        self,
        scripts: Scripts,
        *,
        prefix: str,
        min_ttl_seconds: float = 5.0,
        max_ttl_seconds: float = 30.0,
        batch_size: int = 1000,
    ) -> None:
        self._scripts = scripts
        self._prefix = prefix
        self._min_ttl_ms = int(min_ttl_seconds * 1000)
        self._max_ttl_ms = int(max_ttl_seconds * 1000)
        self._batch_size = batch_size

    async def _run(
        self,
        script: str,
        environment_id: str,
        calls: Sequence[tuple[KeyToClaim, tuple[str, ...]]],
        head: Sequence[object] = (),
    ) -> list[object]:
        """One script call per `batch_size` keys, concurrently; replies in the order of `calls`."""
        env_keys = EnvKeys(self._prefix, environment_id)

        async def one(chunk: Sequence[tuple[KeyToClaim, tuple[str, ...]]]) -> list[object]:
            keys = [env_keys.claim(key.task_identifier, key.idempotency_key) for key, _ in chunk]
            args: list[object] = [*head, *(arg for _, key_args in chunk for arg in key_args)]
            return list(await self._scripts.call(script, keys, args))

        size = self._batch_size
        chunks = [calls[start : start + size] for start in range(0, len(calls), size)]
        return [value for reply in await asyncio.gather(*map(one, chunks)) for value in reply]

    async def try_claim_many(
        self, environment_id: str, keys: Sequence[KeyToClaim]
    ) -> list[ClaimAnswer]:
        """One attempt per key: CLAIMED (with its token; the held one for its own owner),
        EXISTING_RUN or PENDING each."""
        calls = [
            (
                key,
                (
                    uuid.uuid4().hex,
                    "" if key.expires_at is None else str(to_ms(key.expires_at)),
                    key.owner,
                ),
            )
            for key in keys
        ]
        replies = await self._run(
            "claim", environment_id, calls, (self._min_ttl_ms, self._max_ttl_ms)
        )
        answers = []
        for key, reply in zip(keys, replies, strict=True):
            pair: list[bytes] = reply  # type: ignore[assignment]
            outcome = _OUTCOMES[pair[0].decode()]
            value = pair[1].decode()
            if outcome is ClaimOutcome.CLAIMED:
                answers.append(ClaimAnswer(key, outcome, claim_token=value))
            elif outcome is ClaimOutcome.EXISTING_RUN:
                answers.append(ClaimAnswer(key, outcome, existing_run_id=value))
            else:
                answers.append(ClaimAnswer(key, outcome))
        return answers

    async def publish_many(
        self, environment_id: str, published: Sequence[tuple[KeyToClaim, str, str]]
    ) -> list[bool]:
        """(key, token, run id) each: True where the token still owned the claim."""
        calls = [(key, (token, run_id)) for key, token, run_id in published]
        replies = await self._run("publish", environment_id, calls)
        return [bool(int(r)) for r in replies]  # type: ignore[call-overload]

    async def release_many(
        self, environment_id: str, released: Sequence[tuple[KeyToClaim, str]]
    ) -> list[bool]:
        """(key, token) each: True where the token owned the claim and it is gone now."""
        calls = [(key, (token,)) for key, token in released]
        replies = await self._run("release", environment_id, calls)
        return [bool(int(r)) for r in replies]  # type: ignore[call-overload]
