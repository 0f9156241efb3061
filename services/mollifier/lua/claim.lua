-- Claim idempotency keys (one slot's share of a batch). Per key: a live claim that published
-- its run answers 'existing' with the run id; one still in progress answers 'pending' (the
-- caller waits) unless this caller's non-empty owner holds it: then it is claimed again with
-- the token it holds (the caller never waits on itself, e.g. on a claim a hung Redis applied
-- after the call that took it gave up); otherwise this caller claims it with its token for the
-- clamped TTL. A published claim whose key's own expiry passed is claimed anew.
-- KEYS: claims...
-- ARGV: min TTL ms, max TTL ms, then per key: token, key expiry ms ('' none), owner ('' none)
-- Returns per key {outcome, token or run id}.
local now = redis.call('TIME')
now = now[1] * 1000 + math.floor(now[2] / 1000)
local min_ttl = tonumber(ARGV[1])
local max_ttl = tonumber(ARGV[2])
local out = {}
for i, key in ipairs(KEYS) do
  local token = ARGV[3 * i]
  local expires = tonumber(ARGV[1 + 3 * i])
  local owner = ARGV[2 + 3 * i]
  local cur = redis.call('HMGET', key, 't', 'r', 'x', 'o')
  local expired = cur[2] and cur[3] and tonumber(cur[3]) <= now
  local held = cur[1] and not expired
  if held and cur[2] then
    out[i] = {'existing', cur[2]}
  elseif held and not (owner ~= '' and cur[4] == owner) then
    out[i] = {'pending', ''}
  else
    if held then
      token = cur[1]  -- re-entered by its owner: same token, claimed as anew
    end
    local ttl = max_ttl
    if expires then
      ttl = math.max(min_ttl, math.min(max_ttl, expires - now))
    end
    redis.call('DEL', key)
    redis.call('HSET', key, 't', token)
    if expires then
      redis.call('HSET', key, 'x', ARGV[1 + 3 * i])
    end
    if owner ~= '' then
      redis.call('HSET', key, 'o', owner)
    end
    redis.call('PEXPIRE', key, ttl)
    out[i] = {'claimed', token}
  end
end
return out
