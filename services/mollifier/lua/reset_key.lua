-- Clear an idempotency key in the buffer: the lookup, any claim, and the key on the snapshot
-- (idem_reset: the drainer writes the run without it).
-- KEYS: idempotency lookup, claim
-- ARGV: entry key prefix
-- Returns {cleared (0/1), status of the entry it named ('' none)}: a DRAINING entry may be
-- written with the key at this very moment, so clear the run store after this.
redis.call('DEL', KEYS[2])
local holder = redis.call('GET', KEYS[1])
if not holder then
  return {0, ''}
end
redis.call('DEL', KEYS[1])
local entry = ARGV[1] .. holder
local status = redis.call('HGET', entry, 'status')
if status then
  redis.call('HSET', entry, 'idem_reset', '1')
  redis.call('HDEL', entry, 'lookup')
  return {1, status}
end
return {1, ''}
