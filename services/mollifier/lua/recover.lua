-- Requeue (to the front, attempts + 1) entries DRAINING for longer than the visibility
-- timeout: their drainer died or hangs. If it was only slow, its ack still finishes them.
-- KEYS: queue, draining set
-- ARGV: entry key prefix, visibility timeout ms, limit
-- Returns how many entries were requeued.
local now = redis.call('TIME')
now = now[1] * 1000 + math.floor(now[2] / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]),
  'LIMIT', 0, tonumber(ARGV[3]))
local requeued = 0
-- Oldest last, so it ends up at the very front.
for i = #ids, 1, -1 do
  local id = ids[i]
  local entry = ARGV[1] .. id
  redis.call('ZREM', KEYS[2], id)
  if redis.call('HGET', entry, 'status') == 'DRAINING' then
    redis.call('HINCRBY', entry, 'attempts', 1)
    redis.call('HSET', entry, 'status', 'QUEUED', 'error', 'recovered: DRAINING past the visibility timeout')
    redis.call('HDEL', entry, 'owner', 'draining_since')
    redis.call('LPUSH', KEYS[1], id)
    requeued = requeued + 1
  end
end
return requeued
