-- A trigger's gate decision and, when the gate refuses it, its buffer write: one round trip.
-- Runs after gate.lua and accept.lua, which scripts.py defines as the functions gate and accept.
-- KEYS: gate window, gate hold, entry, queue, draining set[, idempotency lookup]
-- ARGV: gate.lua's 5 (threshold, window us, hold us, now us, member), then accept.lua's 7
-- Returns {passed (0/1), tripped by this call (0/1), accept outcome ('' when passed), run id,
-- entries the environment held before this one (queued + draining: 0 means index it)}.
local decision = gate({KEYS[1], KEYS[2]}, {ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]})
if decision[1] == 1 then
  return {1, 0, '', '', 0}
end
local held = redis.call('LLEN', KEYS[4]) + redis.call('ZCARD', KEYS[5])
local accepted = accept({KEYS[3], KEYS[4], KEYS[6]}, {unpack(ARGV, 6)})
return {0, decision[2], accepted[1], accepted[2], held}
