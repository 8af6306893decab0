-- Shared by every registry script (prepended to each one).
--
-- ARGV[1] is the key prefix, `vspc:{CLUSTER}:`. Every key a script touches
-- is built from it: they all share the hash tag {CLUSTER}, so on a Redis
-- Cluster they live in one slot and a script may touch any of them.
--
-- A VM's record is one field of the hash P..'vms' (uuid -> JSON):
--   n name, p port, o owner node, e epoch (a decimal string: it is larger
--   than cjson's 14 significant digits), c 1 connected / 0 not,
--   s milliseconds (Redis time) since when it has been disconnected (0 while
--   connected), f milliseconds since when it has held its port.
-- The port index P..'ports' maps port -> uuid, or -> '@NODE' for a spare
-- port NODE keeps for a Redis outage. P..'free' holds freed ports (score =
-- port); every free port below P..'next' is in it, so the lowest free port
-- is min(lowest of P..'free', P..'next').

local P = ARGV[1]

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Integers up to 2^53 as decimal strings (tostring keeps 14 digits only).
local function dec(n)
  return string.format('%d', n)
end

local function get_vm(uuid)
  local j = redis.call('HGET', P .. 'vms', uuid)
  if not j then
    return nil
  end
  local r = cjson.decode(j)
  r.e = tonumber(r.e)
  return r
end

local function put_vm(uuid, r)
  local w = { n = r.n, p = r.p, o = r.o, e = dec(r.e), c = r.c, s = r.s, f = r.f }
  redis.call('HSET', P .. 'vms', uuid, cjson.encode(w))
end

-- The next epoch: larger than every epoch handed out before, and never
-- below Redis's clock in microseconds, so epochs keep growing across a
-- Redis restarted empty (and compare with the provisional epochs nodes
-- give VMs during an outage, taken from their clocks the same way).
local function new_epoch(at_least)
  local cur = tonumber(redis.call('GET', P .. 'epoch') or '0') or 0
  local e = math.max(cur + 1, now_us(), at_least or 0)
  redis.call('SET', P .. 'epoch', dec(e))
  return e
end

local function bump_epoch(seen)
  local cur = tonumber(redis.call('GET', P .. 'epoch') or '0') or 0
  if seen > cur then
    redis.call('SET', P .. 'epoch', dec(seen))
  end
end

local function take_port(p, holder)
  redis.call('HSET', P .. 'ports', p, holder)
  redis.call('ZREM', P .. 'free', p)
end

local function free_port(p)
  redis.call('HDEL', P .. 'ports', p)
  redis.call('ZADD', P .. 'free', p, p)
end

-- The lowest free port from `start` up, or nil when every one is taken.
-- Ports in `avoid` (a table port -> true; may be nil) are passed over and
-- stay free: a re-assertion keeps the ports of its own batch for their VMs.
local function alloc(start, avoid)
  local skipped = {}
  local found = nil
  while true do
    local n = tonumber(redis.call('GET', P .. 'next') or '0') or 0
    if n < start then
      n = start
    end
    local low = redis.call('ZRANGE', P .. 'free', 0, 0)
    local p = nil
    if low[1] and tonumber(low[1]) < n then
      p = tonumber(low[1])
      redis.call('ZREM', P .. 'free', p)
      if p < start then
        p = nil
      end
    else
      if n > 65535 then
        break
      end
      p = n
      redis.call('SET', P .. 'next', n + 1)
    end
    if p and redis.call('HEXISTS', P .. 'ports', p) == 0 then
      if avoid and avoid[p] then
        table.insert(skipped, p)
      else
        found = p
        break
      end
    end
  end
  for _, q in ipairs(skipped) do
    redis.call('ZADD', P .. 'free', q, q)
  end
  return found
end

-- The highest free port (for a node's spares), or nil.
local function alloc_top(start)
  local t = tonumber(redis.call('GET', P .. 'top') or '65535') or 65535
  local n = tonumber(redis.call('GET', P .. 'next') or '0') or 0
  if n < start then
    n = start
  end
  while t >= n do
    local p = t
    t = t - 1
    redis.call('SET', P .. 'top', t)
    if redis.call('HEXISTS', P .. 'ports', p) == 0 then
      redis.call('ZREM', P .. 'free', p)
      return p
    end
  end
  return nil
end

-- A durable notice for a node (pub/sub is only a hint): drained by its
-- heartbeat.
local function mail(node, notice)
  local k = P .. 'mail:' .. node
  redis.call('RPUSH', k, cjson.encode(notice))
  redis.call('LTRIM', k, -100000, -1)
  redis.call('PEXPIRE', k, 86400000)
  redis.call('PUBLISH', P .. 'events', 'mail ' .. node)
end

-- Return a node's unused spare ports to the pool.
local function drop_spares(node)
  local k = P .. 'spares:' .. node
  for _, p in ipairs(redis.call('SMEMBERS', k)) do
    if redis.call('HGET', P .. 'ports', p) == '@' .. node then
      free_port(tonumber(p))
    end
  end
  redis.call('DEL', k)
end
