-- One environment's buffer: {depth (queued), draining, oldest created_at ms ('' none), now ms}.
-- Oldest: the front of the queue (requeues go there) or the longest-draining entry.
-- KEYS: queue, draining set
-- ARGV: entry key prefix
local now = redis.call('TIME')
now = now[1] * 1000 + math.floor(now[2] / 1000)
local depth = redis.call('LLEN', KEYS[1])
local draining = redis.call('ZCARD', KEYS[2])
local oldest = nil
local candidates = redis.call('LRANGE', KEYS[1], 0, 0)
local first_draining = redis.call('ZRANGE', KEYS[2], 0, 0)
if first_draining[1] then
  candidates[#candidates + 1] = first_draining[1]
end
for _, id in ipairs(candidates) do
  local created = tonumber(redis.call('HGET', ARGV[1] .. id, 'created_at'))
  if created and (oldest == nil or created < oldest) then
    oldest = created
  end
end
return {depth, draining, oldest and tostring(oldest) or '', now}
