-- Register a node at start.
-- ARGV: P, node, instance, advertise, ttl_ms, range_start
-- Returns {'taken', instance, advertise, pttl} while another live instance
-- holds the name, {'start', stored_start} when the cluster uses another
-- port range start, else {'ok', now_ms, json_of_inherited_vm...}: the VMs
-- the name held in a previous life (its key expired), handed to this
-- instance as disconnected VMs to keep or expire.
local node, instance, advertise = ARGV[2], ARGV[3], ARGV[4]
local ttl, start = tonumber(ARGV[5]), tonumber(ARGV[6])
local k = P .. 'node:' .. node
local other = redis.call('HGET', k, 'instance')
if other and other ~= instance then
  return { 'taken', other, redis.call('HGET', k, 'advertise') or '', redis.call('PTTL', k) }
end
local stored = redis.call('HGET', P .. 'meta', 'range_start')
if stored and tonumber(stored) ~= start then
  return { 'start', stored }
end
redis.call('HSETNX', P .. 'meta', 'range_start', start)
local now = now_ms()
local last = tonumber(redis.call('ZSCORE', P .. 'nodes', node) or '0') or 0
redis.call('HSET', k, 'instance', instance, 'advertise', advertise, 'hb', now, 'started', now)
redis.call('PEXPIRE', k, ttl)
redis.call('ZADD', P .. 'nodes', now, node)
local out = { 'ok', now }
if not other then
  -- A previous life's spares are stale: this instance knows nothing of
  -- them. Its VMs stay this node's, disconnected since its last heartbeat.
  drop_spares(node)
  for _, uuid in ipairs(redis.call('SMEMBERS', P .. 'held:' .. node)) do
    local r = get_vm(uuid)
    if r and r.o == node then
      if r.c == 1 then
        r.c = 0
        r.s = (last > 0) and last or now
        put_vm(uuid, r)
      end
      table.insert(out, cjson.encode({ u = uuid, n = r.n, p = r.p, e = dec(r.e), s = r.s, f = r.f }))
    else
      redis.call('SREM', P .. 'held:' .. node, uuid)
    end
  end
end
return out
