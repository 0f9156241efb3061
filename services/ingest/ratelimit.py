"""Per-organization token bucket in Redis, charged `run_count` tokens by CreateBatch (spec §5).

One Lua call per charge reads, refills, spends and writes the bucket atomically, so every ingest
process shares it and concurrent charges never over-spend. The bucket is one hash key
(`runops:ingest:bucket:{<organization>}`: the braces make the whole key its own hash tag), so
the script runs on Redis Cluster too. Time is Redis's own clock (`TIME`): processes whose clocks
disagree still agree on the refill. A key that would be full again expires: an idle
organization costs nothing.

A replayed `CreateBatch` (same idempotency key) is not charged (`charged_create`): a keyed
create that made a new batch leaves a marker (`runops:ingest:batch-key:{<organization>}:<env>:
<sha256 of the key>`, kept `REPLAY_MEMORY`); a create whose key has one skips the charge. Without
a marker yet (a concurrent create through another process, a marker expired) the charge is
taken, refunded when the run store answers `is_cached`, and the marker written. Every process shares the markers and
the bucket, so a replay is free through any of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis.exceptions
import structlog

from runops.kit.dependencies import dependency_error
from runops.kit.errors import FieldViolation, InvalidArgument, ResourceExhausted, RunopsError
from runops.kit.redis import RedisClient
from runops.runstore.v1 import runstore_pb2 as rs
from services.ingest.settings import IngestSettings

log = structlog.get_logger(__name__)

KEY_PREFIX = "runops:ingest:bucket:"

# KEYS[1] bucket; ARGV capacity, refill per second, cost, [now in microseconds: tests only].
# Returns {allowed 0|1, tokens left, seconds until `cost` tokens are there} (numbers as strings:
# Lua numbers returned to Redis are truncated to integers).
_SCRIPT = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local now
if ARGV[4] then
  now = tonumber(ARGV[4])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = capacity
  ts = now
end
if now > ts then
  tokens = math.min(capacity, tokens + (now - ts) * rate / 1000000)
  ts = now
end
local allowed = 0
local wait = 0
if cost <= tokens then
  tokens = tokens - cost
  allowed = 1
else
  wait = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'ts', string.format('%d', ts))
local full_in_ms = math.ceil((capacity - tokens) / rate * 1000) + 1000
redis.call('PEXPIRE', KEYS[1], full_in_ms)
return {allowed, string.format('%.6f', tokens), string.format('%.6f', wait)}
"""


# KEYS[1] bucket; ARGV capacity, refill per second, tokens to give back. A bucket that expired
# (full again) stays absent. Returns the tokens now held (a string), or false when absent.
_REFUND = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens'))
if tokens == nil then
  return false
end
tokens = math.min(capacity, tokens + tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / rate * 1000) + 1000)
return string.format('%.6f', tokens)
"""
REPLAY_PREFIX = "runops:ingest:batch-key:"
# How long a keyed batch's replays stay free without a charge first (after that a replay is
# charged and refunded at once, so it needs the tokens for a moment).
REPLAY_MEMORY = timedelta(days=7)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    # Tokens left after this charge (or before it, when refused).
    remaining: float
    # Seconds until the bucket holds the tokens asked for (0 when allowed).
    retry_after: float


class TokenBucket:
    """`charge(organization_id, run_count)`: spend or refuse with RetryInfo."""

    def __init__(self, client: RedisClient, *, capacity: int, refill_per_second: float) -> None:
        if capacity < 1 or refill_per_second <= 0:
            raise ValueError("need capacity >= 1 and refill_per_second > 0")
        self.capacity = capacity
        self.refill_per_second = refill_per_second
        self._redis = client
        self._script: Any = client.register_script(_SCRIPT)
        self._refund: Any = client.register_script(_REFUND)

    @staticmethod
    def key(organization_id: str) -> str:
        return f"{KEY_PREFIX}{{{organization_id}}}"

    @staticmethod
    def replay_key(organization_id: str, environment_id: str, idempotency_key: str) -> str:
        digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
        return f"{REPLAY_PREFIX}{{{organization_id}}}:{environment_id}:{digest}"

    async def try_charge(
        self, organization_id: str, tokens: int, *, now_us: int | None = None
    ) -> Decision:
        """Spend `tokens` if the bucket holds them. `now_us` replaces Redis's clock (tests of
        the refill arithmetic only)."""
        if tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {tokens}")
        args: list[Any] = [self.capacity, repr(float(self.refill_per_second)), tokens]
        if now_us is not None:
            args.append(now_us)
        with _mapped():
            allowed, remaining, wait = await self._script(
                keys=[self.key(organization_id)], args=args
            )
        return Decision(bool(int(allowed)), float(remaining), float(wait))

    async def refund(self, organization_id: str, tokens: int) -> float | None:
        """Gives `tokens` back (never above capacity); the tokens now held, None when the
        bucket is full again (expired)."""
        args = [self.capacity, repr(float(self.refill_per_second)), tokens]
        with _mapped():
            held = await self._refund(keys=[self.key(organization_id)], args=args)
        return None if held is None else float(held)

    async def charged_create(
        self,
        organization_id: str,
        environment_id: str,
        idempotency_key: str,
        run_count: int,
        create: Callable[[], Awaitable[rs.CreateBatchResponse]],
    ) -> rs.CreateBatchResponse:
        """`create()` after `charge` (module docstring: a replayed key is not charged). A
        failure after the batch exists (the marker, the refund) is logged, never raised: the
        batch is made and the client must hear so."""
        replay = self.replay_key(organization_id, environment_id, idempotency_key)
        known = False  # a marker: a replay, not charged
        if idempotency_key:
            with _mapped():
                known = bool(await self._redis.exists(replay))
        if not known:
            await self.charge(organization_id, run_count)
        created = await create()
        if known or not idempotency_key:
            return created
        try:
            if created.is_cached:
                await self.refund(organization_id, run_count)
            # Set again after a refund too: the next replay is not charged at all.
            await self._redis.set(replay, created.batch.id, ex=int(REPLAY_MEMORY.total_seconds()))
        except (RunopsError, redis.exceptions.RedisError) as exc:
            log.warning(
                "settling a keyed batch's charge failed",
                batch_id=created.batch.friendly_id,
                refund=created.is_cached,
                error=repr(exc),
            )
        return created

    async def charge(self, organization_id: str, run_count: int) -> Decision:
        """CreateBatch's check: INVALID_ARGUMENT when run_count exceeds what the bucket can ever
        hold; RESOURCE_EXHAUSTED with RetryInfo (when enough tokens will be there) when it
        holds too few now."""
        if run_count > self.capacity:
            raise InvalidArgument(
                f"run_count {run_count} exceeds the organization's batch rate-limit capacity "
                f"({self.capacity} runs); split the batch",
                reason="RUN_COUNT_ABOVE_RATE_LIMIT_CAPACITY",
                metadata={"capacity": str(self.capacity)},
                violations=[FieldViolation("run_count", f"must be at most {self.capacity}")],
            )
        decision = await self.try_charge(organization_id, run_count)
        if not decision.allowed:
            # Whole milliseconds, rounded up: retrying at the hint must succeed (if nobody else
            # spends meanwhile).
            retry_after = math.ceil(decision.retry_after * 1000) / 1000
            raise ResourceExhausted(
                f"the organization's batch rate limit is exhausted: {run_count} runs asked, "
                f"{int(decision.remaining)} available; retry in {retry_after:.3f}s",
                reason="BATCH_RATE_LIMITED",
                metadata={
                    "organization_id": organization_id,
                    "requested": str(run_count),
                    "available": str(int(decision.remaining)),
                },
                retry_after=retry_after,
            )
        return decision


@contextlib.contextmanager
def _mapped() -> Iterator[None]:
    """A Redis failure as the domain error it maps to (UNAVAILABLE with RetryInfo)."""
    try:
        yield
    except redis.exceptions.RedisError as exc:
        mapped = dependency_error(exc)
        if mapped is None:
            raise
        raise mapped from exc


def bucket_from_settings(settings: IngestSettings, client: RedisClient) -> TokenBucket:
    return TokenBucket(
        client,
        capacity=settings.rate_limit_capacity,
        refill_per_second=settings.rate_limit_refill_per_second,
    )
