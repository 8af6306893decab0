-- Compare-and-set on a VM's epoch: only the owner at that epoch may act.
-- ARGV: P, op ('disconnected' | 'connected' | 'expire' | 'rename'), uuid,
--       node, epoch, name
-- Returns 1 when done, 0 when the record is gone or newer (a stale node).
local op, uuid, node, epoch = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local r = get_vm(uuid)
if not r or r.o ~= node or r.e ~= epoch then
  return 0
end
if op == 'disconnected' then
  r.c = 0
  r.s = now_ms()
  put_vm(uuid, r)
elseif op == 'connected' then
  r.c = 1
  r.s = 0
  put_vm(uuid, r)
elseif op == 'rename' then
  r.n = ARGV[6]
  put_vm(uuid, r)
elseif op == 'expire' then
  redis.call('HDEL', P .. 'vms', uuid)
  if redis.call('HGET', P .. 'ports', r.p) == uuid then
    free_port(r.p)
  end
  redis.call('SREM', P .. 'held:' .. node, uuid)
else
  return redis.error_reply('unknown operation ' .. op)
end
redis.call('PUBLISH', P .. 'events', op .. ' ' .. uuid)
return 1
