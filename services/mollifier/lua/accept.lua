-- Buffer one trigger snapshot (QUEUED, at the back of its environment's queue).
-- KEYS: entry, queue[, idempotency lookup]
-- ARGV: run id, RunInput bytes, organization id, environment id, created_at ms,
--       idempotency key expiry ms ('' none), entry key prefix
-- Returns {outcome, run id}: 'accepted'; 'existing' (the key's live buffered run, nothing
-- written); 'duplicate' (this run id is already buffered: a retried accept).
local now = redis.call('TIME')
now = now[1] * 1000 + math.floor(now[2] / 1000)
local lookup = KEYS[3]
if lookup then
  local holder = redis.call('GET', lookup)
  if holder then
    local status = redis.call('HGET', ARGV[7] .. holder, 'status')
    if status == 'QUEUED' or status == 'DRAINING' then
      return {'existing', holder}
    end
    -- Stale: its entry is gone (expired, flushed) or finished. Heal it and go on.
    redis.call('DEL', lookup)
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'duplicate', ARGV[1]}
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'input', ARGV[2], 'org', ARGV[3], 'env', ARGV[4],
  'created_at', ARGV[5], 'status', 'QUEUED', 'attempts', '0')
if lookup then
  local expires = tonumber(ARGV[6])
  if expires == nil then
    redis.call('SET', lookup, ARGV[1])
  elseif expires > now then
    redis.call('SET', lookup, ARGV[1], 'PXAT', ARGV[6])
  end
  redis.call('HSET', KEYS[1], 'lookup', lookup)
  if expires ~= nil then
    redis.call('HSET', KEYS[1], 'idem_expires_at', ARGV[6])
  end
end
redis.call('RPUSH', KEYS[2], ARGV[1])
return {'accepted', ARGV[1]}
