#!lua name=herald
-- herald's Redis functions, loaded at connect with FUNCTION LOAD REPLACE (on every master of a
-- cluster). Each call touches keys of one slot only. herald fills in the settings below when
-- it loads the library; the instance that loaded it last decides them.
--
-- History: each channel's stream lives next to it, in its slot: `herald:{<channel>}:h`, a
-- list of `<offset>:<stored ms>\n<json>`, newest first, and `herald:{<channel>}:m`, a hash
-- {e: epoch, s: newest offset, a: acked offset}. A stream whose hash is gone starts again in
-- a new epoch, so positions from before are recognised as foreign rather than misread.
--
-- Presence: one hash per user, `herald:presence:{<user channel>}`, field = instance id,
-- value = that instance's open connections of the user. The fleet total is the sum. A
-- transition (0 -> >0 online, >0 -> 0 offline) is seen by exactly one call, because calls
-- run one at a time: that call publishes the event, and its caller posts the webhook.

local HISTORY_SIZE = __HISTORY_SIZE__
local HISTORY_TTL_MS = __HISTORY_TTL_MS__
local META_TTL_MS = __META_TTL_MS__
local PUBLISH = '__PUBLISH__'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local ALPHABET = 'abcdefghijklmnopqrstuvwxyz234567'

-- 40 bits of the server's clock in microseconds, as 8 base32 characters: a stream reset
-- twice in the same microsecond is not a thing.
local function new_epoch()
  local t = redis.call('TIME')
  local n = (tonumber(t[1]) * 1000000 + tonumber(t[2])) % 1099511627776
  local out = {}
  for i = 8, 1, -1 do
    local d = n % 32
    out[i] = string.sub(ALPHABET, d + 1, d + 1)
    n = math.floor(n / 32)
  end
  return table.concat(out)
end

local function stream_keys(channel)
  return 'herald:{' .. channel .. '}:h', 'herald:{' .. channel .. '}:m'
end

-- KEYS[1] the channel; ARGV[1] the notification (JSON). Stores it in the channel's stream and
-- publishes it, atomically; the published form carries its position:
-- "\0h1 <epoch>:<offset>:<stored ms>\n<json>". Returns {offset, epoch, receivers}. With
-- history off it only publishes (no envelope): {0, '', receivers}.
local function publish(keys, args)
  local channel, message = keys[1], args[1]
  if HISTORY_SIZE == 0 then
    return {0, '', redis.call(PUBLISH, channel, message)}
  end
  local h, m = stream_keys(channel)
  local now = now_ms()
  local epoch = redis.call('HGET', m, 'e')
  if not epoch then
    epoch = new_epoch()
    redis.call('DEL', h)
    redis.call('HSET', m, 'e', epoch, 's', 0)
  end
  local offset = redis.call('HINCRBY', m, 's', 1)
  redis.call('LPUSH', h, offset .. ':' .. now .. '\n' .. message)
  redis.call('LTRIM', h, 0, HISTORY_SIZE - 1)
  -- Entries past their age leave from the old end, a few per publish; readers skip the rest.
  for _ = 1, 4 do
    local oldest = redis.call('LINDEX', h, -1)
    local stored = oldest and tonumber(string.match(oldest, '^%d+:(%d+)\n'))
    if stored and stored + HISTORY_TTL_MS < now then
      redis.call('RPOP', h)
    else
      break
    end
  end
  redis.call('PEXPIRE', h, HISTORY_TTL_MS)
  redis.call('PEXPIRE', m, META_TTL_MS)
  local envelope = '\0h1 ' .. epoch .. ':' .. offset .. ':' .. now .. '\n' .. message
  return {offset, epoch, redis.call(PUBLISH, channel, envelope)}
end

-- KEYS[1] the channel. ARGV: epoch of the position to read after ('' = none), its offset,
-- most entries. Returns {epoch, newest offset, oldest offset kept, acked offset, entries
-- newest first}; {''} when the channel has no stream. A position of another epoch, or past
-- the newest, reads from the oldest entry kept.
local function history(keys, args)
  local h, m = stream_keys(keys[1])
  local meta = redis.call('HMGET', m, 'e', 's', 'a')
  if not meta[1] then
    return {''}
  end
  local epoch, top = meta[1], tonumber(meta[2])
  local oldest = top - redis.call('LLEN', h) + 1
  local after = tonumber(args[2]) or 0
  if args[1] ~= epoch or after > top or after < oldest - 1 then
    after = oldest - 1
  end
  local last = math.min(top, after + tonumber(args[3]))
  local entries = {}
  if last > after then
    entries = redis.call('LRANGE', h, top - last, top - after - 1)
  end
  return {epoch, top, oldest, meta[3] or '0', entries}
end

-- KEYS[1] a user's channel; ARGV: epoch, offset. Moves the read marker forward to a position
-- the stream handed out. Returns 1 when it moved, 0 otherwise.
local function ack(keys, args)
  local _, m = stream_keys(keys[1])
  local meta = redis.call('HMGET', m, 'e', 's', 'a')
  local offset = tonumber(args[2])
  if meta[1] ~= args[1] or not offset or offset < 1 or offset > tonumber(meta[2]) then
    return 0
  end
  if meta[3] and tonumber(meta[3]) >= offset then
    return 0
  end
  redis.call('HSET', m, 'a', offset)
  return 1
end

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
  -- A classic PUBLISH in sharded mode too: the presence channel is not in this key's slot (a
  -- SPUBLISH would be refused as a non-local key), and a cluster's bus relays a PUBLISH to
  -- every node, so a subscriber on any node hears the event.
  if status ~= '' and args[4] ~= '' then
    redis.call('PUBLISH', args[4], '{"type":"presence","user_id":' .. args[3] .. ',"status":"' .. status ..
      '","connections":' .. after .. ',"timestamp":"' .. args[5] .. '"}')
  end
  return {status, after}
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

redis.register_function('herald_publish', publish)
redis.register_function('herald_history', history)
redis.register_function('herald_ack', ack)
redis.register_function('herald_presence_set', presence_set)
redis.register_function('herald_presence_beat', presence_beat)
redis.register_function('herald_presence_dead', presence_dead)
