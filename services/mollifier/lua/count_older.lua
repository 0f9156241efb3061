-- How many of the first `limit` queued entries were created before a cutoff (the stale sweep).
-- KEYS: queue
-- ARGV: entry key prefix, cutoff ms, limit
local ids = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[3]) - 1)
local older = 0
local cutoff = tonumber(ARGV[2])
for _, id in ipairs(ids) do
  local created = tonumber(redis.call('HGET', ARGV[1] .. id, 'created_at'))
  if created and created < cutoff then
    older = older + 1
  end
end
return older
