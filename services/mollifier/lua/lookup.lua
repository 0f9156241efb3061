-- The live buffered entry an idempotency key names (HGETALL), or an empty array.
-- KEYS: idempotency lookup
-- ARGV: entry key prefix
local holder = redis.call('GET', KEYS[1])
if not holder then
  return {}
end
return redis.call('HGETALL', ARGV[1] .. holder)
