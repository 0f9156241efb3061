-- Entries an environment still holds (queued + draining), read atomically: the drainer drops
-- an environment from the index only when this is 0 after removing it.
-- KEYS: queue, draining set
return redis.call('LLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])
