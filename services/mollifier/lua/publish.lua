-- Publish the run id of claims this caller owns (compare token, then set; the TTL stays).
-- KEYS: claims...
-- ARGV: per key: token, run id
-- Returns per key 1 (published) or 0 (the token no longer owns the claim).
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('HGET', key, 't') == ARGV[2 * i - 1] then
    redis.call('HSET', key, 'r', ARGV[2 * i])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
