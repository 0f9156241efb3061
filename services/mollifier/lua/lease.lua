-- Take or renew a lease: free, or already ours, it is (re)set for ttl ms.
-- KEYS: lease
-- ARGV: token, ttl ms
-- Returns 1 when we hold it.
local holder = redis.call('GET', KEYS[1])
if not holder or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
