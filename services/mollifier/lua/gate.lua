-- The per-environment gate: a sliding-window log. A trigger passes when fewer than `threshold`
-- triggers passed in the window (now - window, now] and the environment is not held; else it
-- is buffered, and the first refusal holds the environment tripped for `hold`.
-- KEYS: window log (sorted set of pass times), hold (held-until time)
-- ARGV: threshold, window us, hold us, now us ('' = the server's clock), unique member
-- Returns {passed (0/1), tripped by this call (0/1)}.
local now = tonumber(ARGV[4])
if now == nil then
  local t = redis.call('TIME')
  now = t[1] * 1000000 + t[2]
end
local window = tonumber(ARGV[2])
local hold = tonumber(ARGV[3])
local held = tonumber(redis.call('GET', KEYS[2]))
if held and held > now then
  return {0, 0}
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now, ARGV[5])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000) + 1000)
  return {1, 0}
end
redis.call('SET', KEYS[2], string.format('%.0f', now + hold), 'PX', math.ceil(hold / 1000) + 1000)
return {0, 1}
