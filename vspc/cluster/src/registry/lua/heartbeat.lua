-- A node's heartbeat, every second or so.
-- ARGV: P, node, instance, advertise, ttl_ms, range_start, spares_wanted,
--       max_mail
-- Returns {'stolen', instance} when another instance holds the name now,
-- else {status, now_ms, n_spares, spare..., mail_json...} where status is
-- 'ok', or 'recreated' when the node's key was gone (Redis restarted,
-- failed over or was flushed, or this node stalled past its TTL).
local node, instance, advertise = ARGV[2], ARGV[3], ARGV[4]
local ttl, start = tonumber(ARGV[5]), tonumber(ARGV[6])
local want, max_mail = tonumber(ARGV[7]), tonumber(ARGV[8])
local k = P .. 'node:' .. node
local other = redis.call('HGET', k, 'instance')
if other and other ~= instance then
  return { 'stolen', other }
end
local status = 'ok'
local now = now_ms()
if not other then
  status = 'recreated'
  redis.call('HSET', k, 'started', now)
end
redis.call('HSETNX', P .. 'meta', 'range_start', start)
redis.call('HSET', k, 'instance', instance, 'advertise', advertise, 'hb', now)
redis.call('PEXPIRE', k, ttl)
redis.call('ZADD', P .. 'nodes', now, node)
-- Spares: ports this node may hand out while Redis is away.
local sk = P .. 'spares:' .. node
local spares = {}
for _, p in ipairs(redis.call('SMEMBERS', sk)) do
  if redis.call('HGET', P .. 'ports', p) == '@' .. node then
    table.insert(spares, tonumber(p))
  else
    redis.call('SREM', sk, p)
  end
end
while #spares < want do
  local p = alloc_top(start)
  if not p then
    break
  end
  take_port(p, '@' .. node)
  redis.call('SADD', sk, p)
  table.insert(spares, p)
end
table.sort(spares)
local out = { status, now, #spares }
for _, p in ipairs(spares) do
  table.insert(out, p)
end
local mk = P .. 'mail:' .. node
local mails = redis.call('LRANGE', mk, 0, max_mail - 1)
if #mails > 0 then
  redis.call('LTRIM', mk, #mails, -1)
  for _, m in ipairs(mails) do
    table.insert(out, m)
  end
end
return out
