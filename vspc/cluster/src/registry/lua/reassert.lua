-- Write back what a node holds, after Redis restarted (even empty), failed
-- over, or was unreachable for a while.
-- ARGV: P, node, range_start, JSON array of {u, n, p, e, c, s, f}
-- Returns a flat list of reports:
--   'ok', uuid                     written back as it was
--   'lost', uuid, node, epoch      another node holds the uuid at a newer epoch
--   'moved', uuid, from, to        this VM lost its port and has a new one
--   'displaced', uuid, from, to    another node's VM lost its port to ours
--   'noport', uuid                 no free port left for this VM
-- A port claimed by two uuids goes to the one that has held it longer
-- (smaller f: Redis's clock when it got the port, or the node's clock
-- corrected to Redis's for a claim made during an outage); equal times go
-- to the smaller uuid. The other gets the lowest free port.
local node, start = ARGV[2], tonumber(ARGV[3])
local vms = cjson.decode(ARGV[4])
local now = now_ms()
local out = {}
-- The ports this batch re-asserts: a loser is not moved onto one of them.
local avoid = {}
for _, v in ipairs(vms) do
  avoid[v.p] = true
end

local function report(...)
  for _, x in ipairs({ ... }) do
    table.insert(out, x)
  end
end

local function one(v)
  local uuid, e = v.u, tonumber(v.e)
  bump_epoch(e)
  local r = get_vm(uuid)
  if r and r.o ~= node and r.e > e then
    redis.call('SREM', P .. 'held:' .. node, uuid)
    report('lost', uuid, r.o, dec(r.e))
    return
  end
  if r and r.o == node and r.e >= e and redis.call('HGET', P .. 'ports', r.p) == uuid then
    -- Redis kept this node's record (possibly with a port it moved to
    -- meanwhile): it stands; the node's view of the connection is newer.
    if r.p ~= v.p then
      report('moved', uuid, v.p, r.p)
    else
      report('ok', uuid)
    end
    r.c, r.s, r.n = v.c, v.s, v.n
    put_vm(uuid, r)
    redis.call('SADD', P .. 'held:' .. node, uuid)
    return
  end
  if r and r.o ~= node then
    redis.call('SREM', P .. 'held:' .. r.o, uuid)
    mail(r.o, { k = 'taken', u = uuid, by = node, e = dec(e) })
  end
  local p, f = v.p, v.f
  local holder = redis.call('HGET', P .. 'ports', p)
  local moved = false
  if holder and holder ~= uuid and holder ~= '@' .. node then
    if string.sub(holder, 1, 1) == '@' then
      -- Another node's spare: a VM beats a reservation.
      redis.call('SREM', P .. 'spares:' .. string.sub(holder, 2), p)
    else
      local o = get_vm(holder)
      if o and o.p == p then
        local ours = (f < o.f) or (f == o.f and uuid < holder)
        if ours then
          local np = alloc(start, avoid)
          if np then
            take_port(np, holder)
            o.p, o.f = np, now
            put_vm(holder, o)
            mail(o.o, { k = 'moved', u = holder, from = p, to = np, e = dec(o.e) })
            report('displaced', holder, p, np)
          else
            ours = false
          end
        end
        if not ours then
          local np = alloc(start, avoid)
          if not np then
            report('noport', uuid)
            return
          end
          report('moved', uuid, p, np)
          p, f, moved = np, now, true
        end
      end
    end
  end
  if r and r.p ~= p and redis.call('HGET', P .. 'ports', r.p) == uuid then
    free_port(r.p)
  end
  take_port(p, uuid)
  redis.call('SREM', P .. 'spares:' .. node, p)
  put_vm(uuid, { n = v.n, p = p, o = node, e = e, c = v.c, s = v.s, f = f })
  redis.call('SADD', P .. 'held:' .. node, uuid)
  if not moved then
    report('ok', uuid)
  end
end

for _, v in ipairs(vms) do
  one(v)
end
redis.call('PUBLISH', P .. 'events', 'reassert ' .. node)
return out
