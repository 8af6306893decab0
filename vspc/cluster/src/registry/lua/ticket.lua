-- vMotion tickets: sequence -> (secret, uuid, node), with a TTL.
-- ARGV: P, op ('put' | 'take' | 'drop'), seq_hex, then
--   put:  secret_hex, uuid, node, ttl_ms  -> 'ok' | 'clash'
--   take: secret_hex                      -> {'ok', uuid, node} | {'wrong'} | {'unknown'}
--   drop: uuid                            -> 1 | 0
local op, k = ARGV[2], P .. 'ticket:' .. ARGV[3]
if op == 'put' then
  local have = redis.call('HGET', k, 'uuid')
  if have and have ~= ARGV[5] then
    return 'clash'
  end
  redis.call('HSET', k, 'secret', ARGV[4], 'uuid', ARGV[5], 'node', ARGV[6])
  redis.call('PEXPIRE', k, tonumber(ARGV[7]))
  return 'ok'
elseif op == 'take' then
  local t = redis.call('HMGET', k, 'secret', 'uuid', 'node')
  if not t[1] then
    return { 'unknown' }
  end
  if t[1] ~= ARGV[4] then
    return { 'wrong' }
  end
  redis.call('DEL', k)
  return { 'ok', t[2], t[3] }
elseif op == 'drop' then
  if redis.call('HGET', k, 'uuid') == ARGV[4] then
    redis.call('DEL', k)
    return 1
  end
  return 0
end
return redis.error_reply('unknown operation ' .. op)
