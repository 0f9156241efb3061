-- Change a still-buffered snapshot: 'tags' (add, deduplicated), 'metadata', 'delay', 'cancel'.
-- Overrides live beside the snapshot; the entry decoder applies them.
-- KEYS: entry
-- ARGV: operation, arguments...
-- Returns {'ok', HGETALL...}; {'busy'} once draining started; {'drained'} once written (the
-- run store has it now); {'not_found'}.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return {'not_found'}
end
if status == 'DONE' or status == 'FAILED' then
  return {'drained'}
end
if status ~= 'QUEUED' then
  return {'busy'}
end
local op = ARGV[1]
if op == 'tags' then
  local tags = {}
  local seen = {}
  local stored = redis.call('HGET', KEYS[1], 'tags')
  if stored then
    for _, tag in ipairs(cjson.decode(stored)) do
      tags[#tags + 1] = tag
      seen[tag] = true
    end
  end
  for i = 2, #ARGV do
    if not seen[ARGV[i]] then
      tags[#tags + 1] = ARGV[i]
      seen[ARGV[i]] = true
    end
  end
  if #tags > 0 then
    redis.call('HSET', KEYS[1], 'tags', cjson.encode(tags))
  end
elseif op == 'metadata' then
  redis.call('HSET', KEYS[1], 'metadata', ARGV[2], 'metadata_type', ARGV[3])
elseif op == 'delay' then
  redis.call('HSET', KEYS[1], 'delay_until', ARGV[2])
elseif op == 'cancel' then
  if redis.call('HEXISTS', KEYS[1], 'cancelled_at') == 0 then
    local now = redis.call('TIME')
    now = now[1] * 1000 + math.floor(now[2] / 1000)
    redis.call('HSET', KEYS[1], 'cancelled_at', now, 'cancel_reason', ARGV[2])
  end
else
  return redis.error_reply('unknown mutation ' .. op)
end
local result = redis.call('HGETALL', KEYS[1])
table.insert(result, 1, 'ok')
return result
