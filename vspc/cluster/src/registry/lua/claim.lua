-- A VM connected to this node (the newest connection for a uuid wins,
-- cluster-wide).
-- ARGV: P, uuid, name, node, range_start, preferred_port (0: none)
-- Returns {port, epoch, first_ms, previous_owner}, or {'noport'}.
local uuid, name, node = ARGV[2], ARGV[3], ARGV[4]
local start, preferred = tonumber(ARGV[5]), tonumber(ARGV[6])
local now = now_ms()
local r = get_vm(uuid)
local prev = ''
if r then
  local holder = redis.call('HGET', P .. 'ports', r.p)
  if holder and holder ~= uuid then
    -- The index says another VM has the port (only after lost writes):
    -- this VM moves.
    local p = alloc(start)
    if not p then
      return { 'noport' }
    end
    r.p = p
    r.f = now
  end
  take_port(r.p, uuid)
  if r.o ~= node then
    prev = r.o
  end
  r.e = new_epoch(r.e + 1)
  if prev ~= '' then
    redis.call('SREM', P .. 'held:' .. prev, uuid)
    mail(prev, { k = 'taken', u = uuid, by = node, e = dec(r.e) })
  end
  r.o = node
  r.n = name
  r.c = 1
  r.s = 0
else
  local p = nil
  if preferred >= start and preferred <= 65535 then
    local h = redis.call('HGET', P .. 'ports', preferred)
    if not h or h == '@' .. node then
      p = preferred
      redis.call('SREM', P .. 'spares:' .. node, p)
    end
  end
  if not p then
    p = alloc(start)
  end
  if not p then
    return { 'noport' }
  end
  take_port(p, uuid)
  r = { n = name, p = p, o = node, e = new_epoch(0), c = 1, s = 0, f = now }
end
put_vm(uuid, r)
redis.call('SADD', P .. 'held:' .. node, uuid)
redis.call('PUBLISH', P .. 'events', 'claim ' .. uuid)
return { r.p, r.e, r.f, prev }
