//! The usage store's Lua scripts (`store`). Each touches one session's keys only, so
//! that on a Cluster it runs in that session's slot.

/// Counts the fingerprints not seen in the window; returns how many were new.
/// KEYS: seen, usage. ARGV: window ms, fingerprints...
pub(super) const ACCOUNT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local added = 0
for i = 2, #ARGV do
  added = added + redis.call('ZADD', KEYS[1], 'NX', now, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], window)
if added > 0 then redis.call('HINCRBY', KEYS[2], 'pending', added) end
return added";

/// Notes our liveness (deadline now + ttl), forgets owners dead for longer than the
/// retention, and returns the owners whose deadline has passed. An owner that is not
/// listed at all is never taken for dead: it may have started after this was read.
/// KEYS: alive. ARGV: owner, ttl ms (0: only read), retention ms.
pub(super) const ALIVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(ARGV[2]) > 0 then redis.call('HSET', KEYS[1], ARGV[1], now + tonumber(ARGV[2])) end
local retain = tonumber(ARGV[3])
local fields = redis.call('HGETALL', KEYS[1])
local dead = {}
for i = 1, #fields, 2 do
  local deadline = tonumber(fields[i + 1])
  if deadline < now - retain then
    redis.call('HDEL', KEYS[1], fields[i])
  elseif deadline < now then
    dead[#dead + 1] = fields[i]
  end
end
return dead";

/// Gives in-flight counts of dead owners back, then moves `pending` (and any count of
/// ours still in flight) into our in-flight field. Returns {taken, settled}: settled
/// (1) when nothing is left at all. KEYS: usage. ARGV: owner, dead owners...
pub(super) const TAKE: &str = r"
local dead = {}
for i = 2, #ARGV do dead[ARGV[i]] = true end
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local owner = string.match(fields[i], '^inflight:(.*)$')
  if owner and owner ~= ARGV[1] and dead[owner] then
    redis.call('HINCRBY', KEYS[1], 'pending', fields[i + 1])
    redis.call('HDEL', KEYS[1], fields[i])
  end
end
local mine = 'inflight:' .. ARGV[1]
local n = tonumber(redis.call('HGET', KEYS[1], 'pending') or '0')
  + tonumber(redis.call('HGET', KEYS[1], mine) or '0')
if n > 0 then
  redis.call('HSET', KEYS[1], 'pending', 0, mine, n)
  return {n, 0}
end
if redis.call('HLEN', KEYS[1]) <= 1 then
  redis.call('DEL', KEYS[1])
  return {0, 1}
end
return {0, 0}";

/// Our report was answered for good: drop our in-flight count. Returns {0, settled}.
/// KEYS: usage. ARGV: owner.
pub(super) const SETTLE: &str = r"
redis.call('HDEL', KEYS[1], 'inflight:' .. ARGV[1])
if tonumber(redis.call('HGET', KEYS[1], 'pending') or '0') == 0
    and redis.call('HLEN', KEYS[1]) <= 1 then
  redis.call('DEL', KEYS[1])
  return {0, 1}
end
return {0, 0}";

/// Our report failed: give our in-flight count back to `pending`. Returns {n, 0}.
pub(super) const GIVE_BACK: &str = r"
local mine = 'inflight:' .. ARGV[1]
local n = tonumber(redis.call('HGET', KEYS[1], mine) or '0')
redis.call('HDEL', KEYS[1], mine)
if n > 0 then redis.call('HINCRBY', KEYS[1], 'pending', n) end
return {n, 0}";
