-- Expire the VMs of dead nodes (node key gone) that have been without a
-- connection longer than the expire time: since their own disconnect, or
-- since their node's last heartbeat if they were connected when it died.
-- Forget dead nodes that hold nothing any more.
-- ARGV: P, expire_ms, node_ttl_ms, max
-- Returns {uuid, port, node, ...} of the VMs expired.
local expire, ttl, max = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
local out = {}
local dead = redis.call('ZRANGEBYSCORE', P .. 'nodes', '-inf', now - ttl, 'WITHSCORES')
for i = 1, #dead, 2 do
  local node, hb = dead[i], tonumber(dead[i + 1])
  if redis.call('EXISTS', P .. 'node:' .. node) == 0 then
    drop_spares(node)
    local hk = P .. 'held:' .. node
    for _, uuid in ipairs(redis.call('SMEMBERS', hk)) do
      if #out >= max * 3 then
        return out
      end
      local r = get_vm(uuid)
      if not r or r.o ~= node then
        redis.call('SREM', hk, uuid)
      else
        local since = r.s
        if r.c == 1 or since == 0 then
          since = hb
        end
        if now - since >= expire then
          redis.call('HDEL', P .. 'vms', uuid)
          if redis.call('HGET', P .. 'ports', r.p) == uuid then
            free_port(r.p)
          end
          redis.call('SREM', hk, uuid)
          redis.call('PUBLISH', P .. 'events', 'expire ' .. uuid)
          table.insert(out, uuid)
          table.insert(out, r.p)
          table.insert(out, node)
        end
      end
    end
    if redis.call('SCARD', hk) == 0 then
      redis.call('ZREM', P .. 'nodes', node)
    end
  end
end
return out
