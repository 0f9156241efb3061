-- Ack (status DONE) or fail (status FAILED, terminal) entries whose run was written: drop them
-- from the queue / draining set, delete their idempotency lookup (only if it still names
-- them) and keep the entry readable for the grace period. Whoever drains it, a written run is
-- finished: no owner check (a requeued copy still in the queue is removed).
-- KEYS: queue, draining set
-- ARGV: entry key prefix, grace ms, final status, error message ('' none), run ids...
-- Returns how many entries were finished by this call.
local now = redis.call('TIME')
now = now[1] * 1000 + math.floor(now[2] / 1000)
local finished = 0
for i = 5, #ARGV do
  local id = ARGV[i]
  local entry = ARGV[1] .. id
  local status = redis.call('HGET', entry, 'status')
  if status == 'QUEUED' or status == 'DRAINING' then
    if status == 'QUEUED' then
      redis.call('LREM', KEYS[1], 1, id)
    end
    redis.call('ZREM', KEYS[2], id)
    local lookup = redis.call('HGET', entry, 'lookup')
    if lookup and redis.call('GET', lookup) == id then
      redis.call('DEL', lookup)
    end
    redis.call('HSET', entry, 'status', ARGV[3], 'done_at', now)
    if ARGV[4] ~= '' then
      redis.call('HSET', entry, 'error', ARGV[4])
    end
    redis.call('PEXPIRE', entry, ARGV[2])
    finished = finished + 1
  end
end
return finished
