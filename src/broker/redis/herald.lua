#!lua name=herald
-- herald's Redis functions, loaded at connect with FUNCTION LOAD REPLACE (on every master of a
-- cluster). Each call touches keys of one slot only.
--
-- Presence: one hash per user, `herald:presence:{<user channel>}`, field = instance id,
-- value = that instance's open connections of the user. The fleet total is the sum. A
-- transition (0 -> >0 online, >0 -> 0 offline) is seen by exactly one call, because calls
-- run one at a time: that call publishes the event, and its caller posts the webhook.

local function total(key)
  local n = 0
  for _, v in ipairs(redis.call('HVALS', key)) do
    n = n + tonumber(v)
  end
  return n
end

-- KEYS[1] presence hash. ARGV: instance, count, user id as JSON, presence channel ('' = none),
-- timestamp. Returns {status ('online', 'offline' or ''), fleet total}.
local function presence_set(keys, args)
  local key, instance, count = keys[1], args[1], tonumber(args[2])
  local before = total(key)
  if count > 0 then
    redis.call('HSET', key, instance, count)
  else
    redis.call('HDEL', key, instance)
  end
  local after = total(key)
  local status = ''
  if before == 0 and after > 0 then
    status = 'online'
  elseif before > 0 and after == 0 then
    status = 'offline'
  end
  if status ~= '' and args[4] ~= '' then
    redis.call('PUBLISH', args[4], '{"type":"presence","user_id":' .. args[3] .. ',"status":"' .. status ..
      '","connections":' .. after .. ',"timestamp":"' .. args[5] .. '"}')
  end
  return {status, after}
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- KEYS[1] the instances sorted set (score = when the instance counts as dead, Redis clock).
-- ARGV: instance, lifetime in ms. A live instance calls this well within its lifetime.
local function presence_beat(keys, args)
  redis.call('ZADD', keys[1], now_ms() + tonumber(args[2]), args[1])
  return 1
end

-- KEYS[1] the instances sorted set. Returns up to 16 instances past their lifetime.
local function presence_dead(keys, args)
  return redis.call('ZRANGE', keys[1], '-inf', now_ms(), 'BYSCORE', 'LIMIT', 0, 16)
end

redis.register_function('herald_presence_set', presence_set)
redis.register_function('herald_presence_beat', presence_beat)
redis.register_function('herald_presence_dead', presence_dead)
