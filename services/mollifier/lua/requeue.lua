-- Put entries this drainer holds back at the FRONT of their queue, in the given order, as
-- QUEUED (attempts + increment, or at least a floor: a permanent failure jumps to the last
-- attempt). Entries another drainer took over (recovered, re-popped) are left alone.
-- KEYS: queue, draining set
-- ARGV: entry key prefix, owner token, attempts increment, attempts floor ('' none),
--       error message ('' none), run ids...
-- Returns how many entries were requeued.
local requeued = 0
for i = #ARGV, 6, -1 do
  local id = ARGV[i]
  local entry = ARGV[1] .. id
  local state = redis.call('HMGET', entry, 'status', 'owner')
  if state[1] == 'DRAINING' and state[2] == ARGV[2] then
    local attempts = redis.call('HINCRBY', entry, 'attempts', ARGV[3])
    local floor = tonumber(ARGV[4])
    if floor and attempts < floor then
      redis.call('HSET', entry, 'attempts', floor)
    end
    if ARGV[5] ~= '' then
      redis.call('HSET', entry, 'error', ARGV[5])
    end
    redis.call('HSET', entry, 'status', 'QUEUED')
    redis.call('HDEL', entry, 'owner', 'draining_since')
    redis.call('ZREM', KEYS[2], id)
    redis.call('LPUSH', KEYS[1], id)
    requeued = requeued + 1
  end
end
return requeued
