-- Release claims by compare-and-delete: only the owner's token deletes.
-- KEYS: claims...
-- ARGV: per key: token
-- Returns per key 1 (released) or 0.
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('HGET', key, 't') == ARGV[i] then
    redis.call('DEL', key)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
