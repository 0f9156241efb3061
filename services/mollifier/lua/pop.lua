-- Take up to N entries from the front of an environment's queue and mark them DRAINING
-- (draining_since = now: the visibility timeout counts from here; owner = the drainer).
-- KEYS: queue, draining set
-- ARGV: count, entry key prefix, owner token, then the fields to read of each entry
-- Returns one array per entry taken: its fields in that order (nil where absent).
local now = redis.call('TIME')
now = now[1] * 1000 + math.floor(now[2] / 1000)
local taken = {}
local ids = redis.call('LPOP', KEYS[1], ARGV[1])
if not ids then
  return taken
end
local fields = {unpack(ARGV, 4)}
for _, id in ipairs(ids) do
  local entry = ARGV[2] .. id
  -- Anything else (an entry gone, or acked while requeued) is dropped from the queue.
  if redis.call('HGET', entry, 'status') == 'QUEUED' then
    redis.call('HSET', entry, 'status', 'DRAINING', 'draining_since', now, 'owner', ARGV[3])
    redis.call('ZADD', KEYS[2], now, id)
    taken[#taken + 1] = redis.call('HMGET', entry, unpack(fields))
  end
end
return taken
