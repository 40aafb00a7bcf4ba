-- The Redis+Lua flash-sale reserve step shops use: check stock, take one, pop a key.
-- KEYS[1] = stock counter, KEYS[2] = list of keys.
local left = tonumber(redis.call('GET', KEYS[1]) or '0')
if left <= 0 then return false end
redis.call('DECR', KEYS[1])
return redis.call('LPOP', KEYS[2])
