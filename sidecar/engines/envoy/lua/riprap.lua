-- riprap's Lua filter: what Envoy has no knob for. It reads the matched route's metadata
-- (under "envoy.filters.http.lua"), written by sidecar/engines/envoy/routes.py:
--   service     the service name (every riprap route has it)
--   timeout_ms  the route's timeout, to cap with an incoming x-riprap-deadline-ms
--   strip       "/NAME" when the route was reached by its path prefix
--   shard       {by, key, names, default, strip, timeouts}: pick a shard by rendezvous hash
--   fallbacks   the chain for a failed call (5xx), in order:
--               {kind="stale", max_age_ms} | {kind="service", host, timeout_ms} |
--               {kind="static", status, body, content_type}
--   breaker     the breaker spec (routes.py breaker_meta), `breaker_key` its scope
--   riprap_state  "breakers" / "counters": answer this worker's breakers, or its counters of
--               fallback answers, stale copies and hedges, as JSON (Host `_riprap`)
--   hedged      the route hedges: count the copies riprap_upstream.lua sent (Envoy counts them as retries)
--   hedge       {p, min_ms, initial_ms, warmup} for `hedge at pNN`, `latency_key` its scope
--   body_limit  the largest request body kept to resend to a fallback service
--   unknown_host  the catch-all virtual host (a Host the plan does not name): a forward-proxy
--               call is marked with x-riprap-forward-proxy, which routes it to a 403 (a mark
--               the client sent itself is dropped first)
-- `blake2b` (lua/blake2b.lua) is prepended to this file by the compiler.
--
-- State is per Envoy worker (a Lua state each): the breakers, the stale copies (bounded
-- per service as riprap's StaleCache: 1024 entries, 16 MiB, 1 MiB each) and, while a call with a
-- stale or service fallback is in flight, what its fallback needs from the request.

local SELF = "_riprap_self"
local FORWARD_PROXY = "x-riprap-forward-proxy"
local STALE_MAX_ENTRIES, STALE_MAX_BYTES, STALE_MAX_ENTRY = 1024, 16 * 1048576, 1048576
local HOP = {["connection"] = true, ["keep-alive"] = true, ["transfer-encoding"] = true, ["te"] = true,
             ["upgrade"] = true, ["proxy-connection"] = true, ["content-length"] = true, ["trailer"] = true}

local stale = {}          -- key -> {status, headers, body, at, size, seq, service}
local stale_vary = {}      -- service .. " " .. path -> the names its answer's Vary lists
local stale_vary_count = 0
local calls = {}          -- call id -> {method, path, headers, body, cacheable}
local answered = {}       -- service -> {static = n, stale = n, service = n}: calls a fallback answered
local hedges = {}         -- service -> hedged copies sent (Envoy counts them as retries)
local limited = {}        -- service -> calls answered 429 `rate-limited` (its `limit`)
local refused = {}        -- service -> retries its retry budget refused (lua/riprap_upstream.lua)
local windows_seen = {}   -- cluster -> its retry budget's window, as the call that last touched it saw it
-- service -> {entries, bytes, hits, misses, order}: its part of `stale`, bounded per service
-- as riprap's StaleCache; `order` is {key, seq}, oldest store first (an entry stored again
-- is newer: its older item is skipped, and dropped when the list is compacted)
local stale_of = {}
local calls_count, next_call = 0, 0

local function trim(s)
  return (string.gsub(s, "^%s*(.-)%s*$", "%1"))
end

local function unquote_plus(s)
  s = string.gsub(s, "+", " ")
  return (string.gsub(s, "%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

-- The shard key of a request, as policies/sharding.py's extract_key (empty is none).
local function shard_key(headers, spec)
  local by, name = spec["by"], spec["key"]
  local value = nil
  if by == "header" then
    value = headers:get(string.lower(name))
  elseif by == "query" then
    local path = headers:get(":path") or ""
    local q = string.match(path, "%?(.*)$")
    if q ~= nil then
      for part in string.gmatch(q, "[^&]+") do
        local k, v = string.match(part, "^([^=]*)=?(.*)$")
        if k ~= nil and unquote_plus(k) == name then
          value = unquote_plus(v)
          break
        end
      end
    end
  elseif by == "cookie" then
    local cookie = headers:get("cookie")
    if cookie ~= nil then
      for part in string.gmatch(cookie, "[^;]+") do
        local k, sep, v = string.match(part, "^([^=]*)(=?)(.*)$")
        if sep == "=" and trim(k) == name then
          v = trim(v)
          if #v >= 2 and string.sub(v, 1, 1) == '"' and string.sub(v, -1) == '"' then
            v = string.sub(v, 2, -2)
          end
          value = v
          break
        end
      end
    end
  elseif by == "path-segment" then
    local path = string.match(headers:get(":path") or "", "^[^?]*")
    local strip = spec["strip"]
    if strip ~= nil and string.sub(path, 1, #strip) == strip then
      path = string.sub(path, #strip + 1)
    end
    local n = tonumber(name)
    local i = 0
    for seg in string.gmatch(path, "[^/]+") do
      i = i + 1
      if i == n then value = seg break end
    end
  end
  if value == "" then value = nil end
  return value
end

local function respond_bad_key(handle, service)
  handle:respond(
    {[":status"] = "400", ["content-type"] = "application/json",
     ["x-riprap-reason"] = "no-shard-key"},
    '{"error": "no shard key", "reason": "no-shard-key", "service": "' .. service .. '"}')
end


-- ---- the breaker (policies/breaker.py, per call): closed -> open -> half-open ----------
-- spec (route metadata `breaker`): {kind, failures, rate, window, min_calls, open_ms,
-- max_open_ms, probes, slow_ms}; key (`breaker_key`): the service or SERVICE/SHARD.

local breakers = {}

local function breaker_of(key, spec)
  local b = breakers[key]
  if b == nil or b.spec_id ~= spec["id"] then
    b = {spec_id = spec["id"], state = "closed", consecutive = 0, ring = {}, ring_i = 0, ring_n = 0,
         ring_failures = 0, open_for = spec["open_ms"], open_until = 0, half_since = 0,
         probes_out = 0, probe_ok = 0, opened = 0, half_opened = 0, closed = 0}
    breakers[key] = b
  end
  return b
end

local function b_trip(b, now)
  b.open_until = now + b.open_for
  b.opened = b.opened + 1
  b.state = "open"
end

local function b_close(b, spec)
  b.open_for = spec["open_ms"]
  b.consecutive = 0
  b.ring, b.ring_i, b.ring_n, b.ring_failures = {}, 0, 0, 0
  b.state = "closed"
  b.closed = b.closed + 1
end

local function b_allow(b, spec, now)
  if b.state == "closed" then return true end
  if b.state == "open" then
    if now < b.open_until then return false end
    b.state, b.half_since, b.probes_out, b.probe_ok = "half-open", now, 0, 0
    b.half_opened = b.half_opened + 1
  elseif b.probes_out >= spec["probes"] then
    if now - b.half_since < math.max(b.open_for, 1) then return false end
    b.half_since = now  -- probe outcomes never came back: hand the slots out again
    b.probes_out = b.probe_ok
  end
  b.probes_out = b.probes_out + 1
  return true
end

local function b_record(b, spec, now, ok, duration)
  if ok and spec["slow_ms"] ~= nil and duration > spec["slow_ms"] then ok = false end
  if b.state == "closed" then
    if spec["kind"] == "rate" then
      local window = spec["window"]
      local i = b.ring_i
      if b.ring_n == window then
        if b.ring[i] then b.ring_failures = b.ring_failures - 1 end
      else
        b.ring_n = b.ring_n + 1
      end
      b.ring[i] = not ok
      if not ok then b.ring_failures = b.ring_failures + 1 end
      b.ring_i = (i + 1) % window
      local min_calls = math.max(1, math.min(spec["min_calls"], window))
      if b.ring_failures > 0 and b.ring_n >= min_calls and b.ring_failures >= spec["rate"] * b.ring_n - 1e-9 then
        b_trip(b, now)
      end
    elseif ok then
      b.consecutive = 0
    else
      b.consecutive = b.consecutive + 1
      if b.consecutive >= spec["failures"] then b_trip(b, now) end
    end
  elseif b.state == "half-open" then
    if b.probe_ok >= b.probes_out then return end  -- a late outcome from before the trip
    if not ok then
      b.open_for = math.min(b.open_for * 2, math.max(spec["max_open_ms"], spec["open_ms"]))
      b_trip(b, now)
    else
      b.probe_ok = b.probe_ok + 1
      if b.probe_ok >= spec["probes"] then b_close(b, spec) end
    end
  end
end

-- The breaker as a call found it, for lua/riprap_upstream.lua, which asks it again before
-- each further attempt of the call: "STATE|CONSECUTIVE|WINDOW" (the window oldest first,
-- F a failure, S a success).
local function b_snapshot(b, spec)
  local ring = {}
  if spec["kind"] == "rate" then
    local window = spec["window"]
    for k = 0, b.ring_n - 1 do
      ring[#ring + 1] = b.ring[(b.ring_i - b.ring_n + k) % window] and "F" or "S"
    end
  end
  return b.state .. "|" .. b.consecutive .. "|" .. table.concat(ring)
end

local function b_state(b, now)
  if b.state == "open" and now >= b.open_until then return "half-open" end
  return b.state
end

-- GET /breakers with Host `_riprap` (routes.py): this worker's breakers, as JSON.
local function breakers_json(now)
  local parts = {}
  for key, b in pairs(breakers) do
    local retry_in = 0
    if b.state == "open" and now < b.open_until then retry_in = (b.open_until - now) / 1000 end
    parts[#parts + 1] = string.format(
      '"%s":{"state":"%s","open_for":%.3f,"retry_in":%.3f,"opened":%d,"half_opened":%d,"closed":%d,'
      .. '"failures":%d,"calls":%d}',
      key, b_state(b, now), b.open_for / 1000, retry_in, b.opened, b.half_opened, b.closed,
      b.ring_n > 0 and b.ring_failures or b.consecutive, b.ring_n)
  end
  return "{" .. table.concat(parts, ",") .. "}"
end
local function take_call(dm)
  if dm == nil or dm["call"] == nil then return nil end
  local id = dm["call"]
  local call = calls[id]
  if call ~= nil then
    calls[id] = nil
    calls_count = calls_count - 1
  end
  return call
end

local function lower_list(value)
  local out = {}
  for item in string.gmatch(string.lower(value or ""), "[^,%s]+") do out[#out + 1] = item end
  return out
end

local function vary_key(call, vary)
  local parts = {}
  for _, name in ipairs(vary) do parts[#parts + 1] = name .. "=" .. (call.headers[name] or "") end
  return table.concat(parts, "\n")
end

local function stale_stats(service)
  local st = stale_of[service]
  if st == nil then
    st = {entries = 0, bytes = 0, hits = 0, misses = 0, order = {}}
    stale_of[service] = st
  end
  return st
end

local function count_fallback(service, kind)
  local a = answered[service]
  if a == nil then
    a = {}
    answered[service] = a
  end
  a[kind] = (a[kind] or 0) + 1
end

-- GET /counters with Host `_riprap` (routes.py): this worker's fallback answers, stale
-- copies, hedges and calls over the limit per service, as JSON (riprap's /metrics and
-- /state read it).
-- A budget window (lua/riprap_upstream.lua's budget_note) rolled to `now`: "calls,retries".
local function window_now(note, now)
  local v = {}
  for x in string.gmatch(note, "%S+") do v[#v + 1] = tonumber(x) or 0 end
  if #v < 22 then return "0,0" end
  local slot, width = v[1], v[2]
  local cur = math.floor(now / width)
  local calls, retries = 0, 0
  for i = 0, 9 do
    -- bucket i holds the latest slot s <= `slot` with s % 10 == i; kept while s > cur - 10
    local s = slot - ((slot - i) % 10)
    if s > cur - 10 then calls, retries = calls + v[3 + i], retries + v[13 + i] end
  end
  return calls .. "," .. retries
end

local function counters_json(now)
  local parts = {}
  for service, a in pairs(answered) do
    local kinds = {}
    for kind, n in pairs(a) do kinds[#kinds + 1] = string.format('"%s":%d', kind, n) end
    parts[#parts + 1] = string.format('"%s":{%s}', service, table.concat(kinds, ","))
  end
  local caches = {}
  for service, st in pairs(stale_of) do
    caches[#caches + 1] = string.format(
      '"%s":{"entries":%d,"bytes":%d,"max_entries":%d,"max_bytes":%d,"hits":%d,"misses":%d}',
      service, st.entries, st.bytes, STALE_MAX_ENTRIES, STALE_MAX_BYTES, st.hits, st.misses)
  end
  local sent = {}
  for service, n in pairs(hedges) do sent[#sent + 1] = string.format('"%s":%d', service, n) end
  local over = {}
  for service, n in pairs(limited) do over[#over + 1] = string.format('"%s":%d', service, n) end
  local budget = {}
  for service, n in pairs(refused) do budget[#budget + 1] = string.format('"%s":%d', service, n) end
  local seen = {}
  for key, note in pairs(windows_seen) do
    seen[#seen + 1] = string.format('"%s":[%s]', key, window_now(note, now))
  end
  return '{"answered":{' .. table.concat(parts, ",") .. '},"stale":{' .. table.concat(caches, ",")
         .. '},"hedges":{' .. table.concat(sent, ",") .. '},"limited":{' .. table.concat(over, ",")
         .. '},"refused":{' .. table.concat(budget, ",") .. '},"window":{' .. table.concat(seen, ",") .. "}}"
end

local function stale_evict(st)
  local order = st.order
  while #order > 0 and (st.entries > STALE_MAX_ENTRIES or st.bytes > STALE_MAX_BYTES) do
    local item = table.remove(order, 1)
    local key = item[1]
    local e = stale[key]
    if e ~= nil and e.seq == item[2] then
      stale[key] = nil
      st.entries, st.bytes = st.entries - 1, st.bytes - e.size
    end
  end
  if #order > 2 * st.entries + 64 then  -- the same keys stored again and again: compact
    local live = {}
    for _, item in ipairs(order) do
      local e = stale[item[1]]
      if e ~= nil and e.seq == item[2] then live[#live + 1] = item end
    end
    st.order = live
  end
end

-- A 2xx GET answer that a shared cache could store (RFC 9111, as policies/headers.py):
-- copied as it streams through, kept as the last good answer for its key.
local function keep_stale(handle, service, call)
  local headers = handle:headers()
  local status = tonumber(headers:get(":status")) or 0
  if call.method ~= "GET" or status < 200 or status > 299 or status == 206 then return end
  local cc = string.lower(headers:get("cache-control") or "")
  if headers:get("set-cookie") ~= nil or string.find(cc, "private", 1, true)
      or string.find(cc, "no-store", 1, true) then return end
  if call.auth and not string.find(cc, "public", 1, true) then return end
  local vary = lower_list(headers:get("vary"))
  for _, v in ipairs(vary) do if v == "*" then return end end
  local kept = {}
  for k, v in pairs(headers) do
    if string.sub(k, 1, 1) ~= ":" and not HOP[k] and string.sub(k, 1, 9) ~= "x-riprap-" then
      kept[#kept + 1] = {k, v}
    end
  end
  local key = service .. " " .. call.path .. "\n" .. vary_key(call, vary)
  local parts, size = {}, #key
  for chunk in handle:bodyChunks() do
    size = size + chunk:length()
    if size > STALE_MAX_ENTRY then return end
    parts[#parts + 1] = chunk:getBytes(0, chunk:length())
  end
  next_call = next_call + 1
  local old = stale[key]
  local st = stale_stats(service)
  if old ~= nil then
    st.entries, st.bytes = st.entries - 1, st.bytes - old.size
  end
  stale[key] = {status = status, headers = kept, body = table.concat(parts), at = handle:timestamp(),
                size = size, seq = next_call, service = service}
  st.entries, st.bytes = st.entries + 1, st.bytes + size
  st.order[#st.order + 1] = {key, next_call}
  -- the Vary names are needed to find the entry again
  local base = service .. " " .. call.path
  if stale_vary[base] == nil then
    if stale_vary_count >= 2 * STALE_MAX_ENTRIES then stale_vary, stale_vary_count = {}, 0 end
    stale_vary_count = stale_vary_count + 1
  end
  stale_vary[base] = vary
  stale_evict(st)
end

local function find_stale(handle, service, call, max_age_ms)
  if call == nil or not call.cacheable then return nil end
  local base = service .. " " .. call.path
  local vary = stale_vary[base]
  local e = vary ~= nil and stale[base .. "\n" .. vary_key(call, vary)] or nil
  local st = stale_stats(service)
  if e == nil or handle:timestamp() - e.at >= max_age_ms then
    st.misses = st.misses + 1
    return nil
  end
  st.hits = st.hits + 1
  return e
end

-- The answer's headers with every one removed but :status and x-riprap-attempts (the
-- start of an answer riprap writes in place of the upstream's).
local function cleared_answer_headers(handle)
  local headers = handle:headers()
  local names = {}
  for k, _ in pairs(headers) do
    if k ~= ":status" and k ~= "x-riprap-attempts" then names[#names + 1] = k end
  end
  for _, k in ipairs(names) do headers:remove(k) end
  return headers
end

-- Replace the failed answer: status, headers (all of them) and body.
local function answer_with(handle, ans, reason, head)
  handle:body(true)
  local headers = cleared_answer_headers(handle)
  headers:replace(":status", tostring(ans.status))
  for _, kv in ipairs(ans.headers) do headers:add(kv[1], kv[2]) end
  headers:replace("x-riprap-fallback", ans.kind)
  headers:replace("x-riprap-reason", reason)
  handle:body(true):setBytes(head and "" or ans.body)
end

local function try_service(handle, fb, call, responding)
  if call == nil then return false end
  local req = {[":method"] = call.method, [":path"] = call.path, [":authority"] = fb["host"]}
  for k, v in pairs(call.headers) do
    if k ~= "host" then req[k] = v end
  end
  if responding then handle:body(true) end  -- the failed answer's body, before waiting
  local ok, rh, rb = pcall(handle.httpCall, handle, SELF, req, call.body, fb["timeout_ms"] or 15000)
  if not ok or rh == nil then return false end
  local status = tonumber(rh[":status"]) or 599
  if status >= 500 then return false end
  if rh["x-riprap-reason"] ~= nil and rh["x-riprap-fallback"] == nil then return false end  -- a refusal
  return true, status, rh, rb or ""
end


-- ---- hedge at pNN: the observed percentile as Envoy's per-try (hedge) timeout --------
-- spec (route metadata `hedge`): {p, min_ms, initial_ms, warmup}; key: `breaker_key`'s
-- sibling `latency_key`. The last 256 latencies of whole calls; the percentile is taken
-- again every 16 calls (nearest rank, as policies/latency.py).

local latencies = {}

local function latency_of(key)
  local w = latencies[key]
  if w == nil then
    w = {ring = {}, i = 0, total = 0, delay = nil}
    latencies[key] = w
  end
  return w
end

local function hedge_delay(w, spec)
  if w.total < spec["warmup"] then return math.max(spec["min_ms"], spec["initial_ms"]) end  -- never below min
  if w.delay == nil or w.total % 16 == 0 then
    local sorted = {}
    for _, v in ipairs(w.ring) do sorted[#sorted + 1] = v end
    table.sort(sorted)
    local rank = math.max(1, math.ceil(spec["p"] * #sorted - 1e-9))
    w.delay = sorted[rank]
  end
  return math.max(spec["min_ms"], w.delay)
end

local function record_latency(w, ms)
  if ms < 0 then ms = 0 end
  w.i = (w.i % 256) + 1
  w.ring[w.i] = ms
  w.total = w.total + 1
end

-- ---- route metadata, converted once per route version ----------------------------------

local KEYS = {"service", "timeout_ms", "strip", "shard", "fallbacks", "breaker", "breaker_key", "hedge",
              "latency_key", "body_limit", "riprap_state", "retry_after", "limited", "units", "unknown_host", "resend",
              "hedged", "head_bound", "budgeted"}
local route_cache, route_cache_count = {}, 0

-- Envoy hands a metadata number that is not a whole number (0.5, and 100.0 too) to Lua as
-- a string: the numbers of these specs are made numbers again, once per route.
local NUMERIC = {breaker = {"rate", "open_ms", "max_open_ms", "slow_ms", "failures", "window", "min_calls",
                            "probes"},
                 hedge = {"p", "min_ms", "initial_ms", "warmup"}}

local function numbers_of(spec, keys)
  if type(spec) ~= "table" then return spec end
  for _, k in ipairs(keys) do
    if spec[k] ~= nil then spec[k] = tonumber(spec[k]) end
  end
  return spec
end

-- The matched route's riprap metadata as a Lua table, or nil. Envoy converts metadata on
-- every get(); the routes' `id` (a hash of the rest) lets that happen once per route.
-- handle:metadata() itself copies the route's whole metadata on every call, so the route's
-- name (routes.py names a route by its `id`) finds the table first; a sharded route is read
-- from its metadata, and so is the route chosen again (`exact`) after clearRouteCache.
local function route_meta(handle, exact)
  local named = not exact and route_cache[handle:streamInfo():routeName()] or nil
  if named ~= nil and named.shard == nil then return named end
  local md = handle:metadata()
  local id = md:get("id")
  if id == nil then return nil end
  local m = route_cache[id]
  if m == nil then
    m = {}
    for _, k in ipairs(KEYS) do m[k] = md:get(k) end
    for k, keys in pairs(NUMERIC) do m[k] = numbers_of(m[k], keys) end
    if m.fallbacks == nil then m.fallbacks = {} end
    for _, u in pairs(m.units or {}) do  -- a sharded service's shards (routes.py shard_unit_meta)
      for _, variant in ipairs({"safe", "other"}) do
        local um = u[variant]
        for k, keys in pairs(NUMERIC) do um[k] = numbers_of(um[k], keys) end
        if um.fallbacks == nil then um.fallbacks = {} end
      end
    end
    if route_cache_count > 4096 then route_cache, route_cache_count = {}, 0 end
    route_cache[id] = m
    route_cache_count = route_cache_count + 1
  end
  return m
end

-- ---- the call flow ------------------------------------------------------------------

local function has_kind(fallbacks, kind)
  for _, fb in ipairs(fallbacks) do
    if fb["kind"] == kind then return true end
  end
  return false
end

local function needs_call_state(fallbacks)
  return has_kind(fallbacks, "stale") or has_kind(fallbacks, "service")
end

local function stash(handle, key, value)
  handle:streamInfo():dynamicMetadata():set("envoy.filters.http.lua", key, value)
end

-- What a fallback needs from the request: method, path as sent upstream, headers.
local function make_call(headers, md)
  local method = headers:get(":method") or "GET"
  local path = headers:get(":path") or "/"
  local strip = md.strip
  if strip ~= nil and string.sub(path, 1, #strip) == strip then
    path = string.sub(path, #strip + 1)
    if path == "" or string.sub(path, 1, 1) == "?" then path = "/" .. path end
  end
  local copy = {}
  for k, v in pairs(headers) do
    if string.sub(k, 1, 1) ~= ":" and not HOP[k] and string.sub(k, 1, 9) ~= "x-riprap-" then copy[k] = v end
  end
  return {method = method, path = path, headers = copy, body = "",
          cacheable = (method == "GET" or method == "HEAD") and copy["cookie"] == nil,
          auth = copy["authorization"] ~= nil}
end

-- The request body, when it has a Content-Length within the bound (resent by a fallback).
local function read_body(handle, headers, md)
  local length = tonumber(headers:get("content-length") or "0") or 0
  if length <= 0 or length > (md.body_limit or 1048576) then return "" end
  local body = handle:body()
  return body:getBytes(0, body:length())
end

-- Kept until the call's answer, for its stale or service fallback.
local function remember_call(handle, headers, md, fallbacks)
  local call = make_call(headers, md)
  if calls_count > 10000 then calls, calls_count = {}, 0 end  -- calls that never answered
  next_call = next_call + 1
  local id = tostring(next_call)
  calls[id] = call
  calls_count = calls_count + 1
  stash(handle, "call", id)
  if has_kind(fallbacks, "service") then call.body = read_body(handle, headers, md) end  -- last: it waits
end

-- The first link of the chain that answers: {status, headers, body, kind, attempts} or nil.
local function chain_answer(handle, service, call, fallbacks, responding)
  for _, fb in ipairs(fallbacks) do
    local kind = fb["kind"]
    if kind == "stale" then
      local e = find_stale(handle, service, call, fb["max_age_ms"])
      if e ~= nil then return {status = e.status, headers = e.headers, body = e.body, kind = "stale"} end
    elseif kind == "service" then
      local ok, st, rh, rb = try_service(handle, fb, call, responding)
      if ok then
        local list = {}
        for k, v in pairs(rh) do
          if string.sub(k, 1, 1) ~= ":" and not HOP[k] and string.sub(k, 1, 9) ~= "x-riprap-" then
            list[#list + 1] = {k, v}
          end
        end
        return {status = st, headers = list, body = rb, kind = "service",
                attempts = tonumber(rh["x-riprap-attempts"] or "0") or 0}
      end
    elseif kind == "static" then
      return {status = fb["status"], headers = {{"content-type", fb["content_type"]}}, body = fb["body"],
              kind = "static"}
    end
  end
  return nil
end

local function refuse_open(handle, headers, md, service, fallbacks)
  local call = make_call(headers, md)
  if has_kind(fallbacks, "service") then call.body = read_body(handle, headers, md) end
  local ans = chain_answer(handle, service, call, fallbacks, false)
  if ans == nil then
    handle:respond({[":status"] = "503", ["content-type"] = "application/json",
                    ["x-riprap-reason"] = "breaker-open"},
                   '{"error": "breaker open", "reason": "breaker-open", "service": "' .. service .. '"}')
    return
  end
  count_fallback(service, ans.kind)
  local out = {[":status"] = tostring(ans.status)}
  for _, kv in ipairs(ans.headers) do out[kv[1]] = kv[2] end
  out["x-riprap-fallback"] = ans.kind
  out["x-riprap-reason"] = "breaker-open"
  handle:respond(out, call.method == "HEAD" and "" or ans.body)
end

-- A path whose `..` segments climb above the endpoint's own prefix is refused (the path
-- is forwarded byte for byte, so nothing else would stop it).
local function climbs(path, strip)
  if not string.find(path, "..", 1, true) then return false end  -- most calls: no copy made
  path = string.match(path, "^[^?]*")
  if not string.find(path, "..", 1, true) then return false end
  if strip ~= nil and string.sub(path, 1, #strip) == strip then path = string.sub(path, #strip + 1) end
  local depth = 0
  for seg in string.gmatch(path, "[^/]+") do
    if seg == ".." then
      depth = depth - 1
      if depth < 0 then return true end
    elseif seg ~= "." then
      depth = depth + 1
    end
  end
  return false
end

-- Was the request line absolute-form (a forward-proxy call, the app uses HTTP_PROXY)? Envoy's
-- HTTP/1 codec takes :authority and :scheme from an absolute URL, setting :scheme before
-- :path and :method; for an origin-form line the connection manager adds :scheme after them.
-- (HTTP/2 has no absolute form.) Envoy keeps pseudo-headers in the order they were set.
local function absolute_form(handle, headers)
  local protocol = handle:streamInfo():protocol()
  if protocol ~= "HTTP/1.1" and protocol ~= "HTTP/1.0" then return false end
  local first = nil
  for k, _ in pairs(headers) do  -- the whole map: an unfinished iteration locks it
    if first == nil and (k == ":scheme" or k == ":method") then first = k end
  end
  return first == ":scheme"
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local rerouted = false
  if headers:get(FORWARD_PROXY) ~= nil then
    -- the client's own header, not riprap's mark; routed again before the first look at the
    -- route (Lua is handed the metadata of the route it first looked at)
    headers:remove(FORWARD_PROXY)
    handle:clearRouteCache()
    rerouted = true
  end
  local md = route_meta(handle, rerouted)
  if md == nil then return end
  if md.riprap_state == "breakers" then
    handle:respond({[":status"] = "200", ["content-type"] = "application/json"}, breakers_json(handle:timestamp()))
    return
  elseif md.riprap_state == "counters" then
    handle:respond({[":status"] = "200", ["content-type"] = "application/json"}, counters_json(handle:timestamp()))
    return
  end
  if md.unknown_host and absolute_form(handle, headers) then
    headers:replace(FORWARD_PROXY, "1")  -- never forwarded: routes.py's 403 route answers
    handle:clearRouteCache()
    return
  end
  local service = md.service
  if service == nil then return end
  if climbs(headers:get(":path") or "/", md.strip) then
    handle:respond({[":status"] = "400", ["content-type"] = "application/json", ["x-riprap-reason"] = "bad-request"},
                   '{"error": "the path climbs above the service", "reason": "bad-request", "service": "'
                   .. service .. '"}')
    return
  end
  local timeout_ms = md.timeout_ms
  local shard = md.shard
  if shard ~= nil then
    local key = shard_key(headers, shard)
    local pick
    if key == nil then
      pick = shard["default"]
      if pick == nil then
        respond_bad_key(handle, service)
        return
      end
    else
      pick = blake2b.pick(shard["names"], key)
    end
    headers:replace("x-riprap-shard", pick)
    local t = shard["timeouts"]
    if t ~= nil and t[pick] ~= nil then timeout_ms = t[pick] end
    handle:clearRouteCache()
    -- the shard's own route is chosen now, but Lua keeps being handed the first route's
    -- metadata: that route carries each shard's
    local u = md.units ~= nil and md.units[pick] or nil
    if u ~= nil then
      local methods = u["methods"]
      local safe = methods == nil or methods[headers:get(":method") or "GET"] ~= nil
                   or headers:get("idempotency-key") ~= nil
      md = safe and u["safe"] or u["other"]
    end
  end
  local capped = false
  local incoming = headers:get("x-riprap-deadline-ms")
  if incoming ~= nil then
    local n = tonumber(incoming)
    if n ~= nil and n >= 1 and (timeout_ms == nil or n < timeout_ms) then
      headers:replace("x-envoy-upstream-rq-timeout-ms", tostring(math.floor(n)))
      capped = true
      timeout_ms = math.floor(n)
    end
  end
  if md.resend and timeout_ms ~= nil then
    -- each attempt (lua/riprap_upstream.lua) reads the call's deadline here
    stash(handle, "deadline", handle:timestamp() + timeout_ms)
  end
  local fallbacks = md.fallbacks
  local hspec = md.hedge
  local bspec = md.breaker
  local now = nil
  if hspec ~= nil then
    now = handle:timestamp()
    local delay = hedge_delay(latency_of(md.latency_key), hspec)
    headers:replace("x-envoy-upstream-rq-per-try-timeout-ms", tostring(math.max(1, math.floor(delay))))
  end
  if bspec ~= nil then
    local b = breaker_of(md.breaker_key, bspec)
    if b.state ~= "closed" or bspec["slow_ms"] ~= nil then now = now or handle:timestamp() end
    if not b_allow(b, bspec, now) then
      refuse_open(handle, headers, md, service, fallbacks)
      return
    end
    if capped then stash(handle, "capped", true) end
    if md.resend then stash(handle, "breaker", b_snapshot(b, bspec)) end  -- for each attempt's check
    if bspec["slow_ms"] == nil and hspec == nil then now = nil end
  end
  if now ~= nil then stash(handle, "start", now) end  -- only what the answer needs: timing
  if needs_call_state(fallbacks) then
    remember_call(handle, headers, md, fallbacks)
  end
end

-- riprap's own refusals, decided before the call could reach the upstream: no breaker
-- outcome (a refused call in half-open is not a failed probe). With no healthy endpoint
-- nothing was sent either (as policies/stages/breaker.py: no attempt failed): a probe
-- while the health checks still say down does not reopen the breaker for twice as long.
local NOT_UPSTREAM = {["breaker-open"] = true, ["overloaded"] = true, ["rate-limited"] = true,
                      ["bad-request"] = true, ["no-shard-key"] = true, ["unknown-service"] = true,
                      ["no-healthy-endpoint"] = true}

-- The headers an upstream's `Connection` names are hop-by-hop too (Envoy drops the
-- Connection header of an answer, not the headers it lists).
local KEEP_NAMED = {["close"] = true, ["upgrade"] = true, ["content-length"] = true,
                    ["transfer-encoding"] = true, ["content-type"] = true}
local function drop_connection_named(headers)
  local named = headers:get("connection")
  if named == nil then return end
  local drop = {}
  for name in string.gmatch(string.lower(named), "[^,%s]+") do
    if not KEEP_NAMED[name] and string.sub(name, 1, 1) ~= ":" and string.sub(name, 1, 9) ~= "x-riprap-" then
      drop[#drop + 1] = name
    end
  end
  for _, name in ipairs(drop) do headers:remove(name) end
end

-- riprap's bounds on an answer head (section 9 Limits: 64 KiB, 256 headers), where the
-- route has `head_bound`: its cluster's codec lets bigger heads through, since Envoy would
-- retry one over the codec's own bounds like a reset.
local MAX_HEAD_BYTES, MAX_HEADERS = 65536, 256
local function head_over_bounds(headers)
  local count, size = 0, 2
  for k, v in pairs(headers) do
    if string.sub(k, 1, 1) ~= ":" then count = count + 1 end
    size = size + #k + #v + 4
  end
  return count > MAX_HEADERS or size > MAX_HEAD_BYTES
end

local function fail_upstream(handle, service)
  handle:body(true)  -- the answer's body, dropped (the headers are fetched again after it)
  local headers = cleared_answer_headers(handle)
  headers:replace(":status", "502")
  headers:replace("content-type", "application/json")
  headers:replace("x-riprap-reason", "upstream-failed")
  handle:body(true):setBytes('{"error": "upstream failed: its answer head is over the bounds", '
                             .. '"reason": "upstream-failed", "service": "' .. service .. '"}')
end

function envoy_on_response(handle)
  local md = route_meta(handle)
  if md == nil or md.service == nil then return end
  local service = md.service
  local headers = handle:headers()
  if md.head_bound and head_over_bounds(headers) then
    fail_upstream(handle, service)
    headers = handle:headers()
  end
  drop_connection_named(headers)
  local attempts = headers:get("x-riprap-attempts")
  if attempts == nil or attempts == "" or attempts == "-" then
    attempts = "0"
    headers:replace("x-riprap-attempts", attempts)
  end
  if md.limited and headers:get("x-riprap-reason") == "rate-limited" then
    limited[service] = (limited[service] or 0) + 1
    if md.retry_after ~= nil then
      headers:replace("retry-after", md.retry_after)  -- a bucket slower than 1/s: whole seconds to a token
    end
  end
  local fallbacks = md.fallbacks
  local bspec = md.breaker
  local hspec = md.hedge
  local tries = md.resend and handle:streamInfo():dynamicMetadata():get("riprap.tries") or nil
  -- an attempt lua/riprap_upstream.lua refused (breaker opened by the call's own attempts,
  -- too little time left): it never went out, so it is not one of the call's attempts
  local unsent = tries ~= nil and tries["unsent"] == true
  if unsent then
    attempts = tostring(math.max(0, (tonumber(attempts) or 1) - 1))
    headers:replace("x-riprap-attempts", attempts)
  end
  if md.budgeted then
    local tries = handle:streamInfo():dynamicMetadata():get("riprap.tries")
    if tries ~= nil and tries["refused"] ~= nil then refused[service] = (refused[service] or 0) + 1 end
    if tries ~= nil and tries["budget"] ~= nil then windows_seen[tries["budget_key"] or service] = tries["budget"] end
  end
  if md.hedged then
    -- the hedge copies of this call (lua/riprap_upstream.lua counts them per call)
    local tries = handle:streamInfo():dynamicMetadata():get("riprap.tries")
    local sent = tries ~= nil and tonumber(tries["hedges"]) or nil
    if sent ~= nil and sent > 0 then hedges[service] = (hedges[service] or 0) + sent end
  end
  if bspec == nil and hspec == nil and #fallbacks == 0 then return end
  local status = tonumber(headers:get(":status")) or 0
  local reason = headers:get("x-riprap-reason")
  local dm = nil
  if hspec ~= nil or needs_call_state(fallbacks)
      or (bspec ~= nil and (bspec["slow_ms"] ~= nil or reason == "timeout")) then
    dm = handle:streamInfo():dynamicMetadata():get("envoy.filters.http.lua") or {}
  end
  local now = nil
  if hspec ~= nil and dm["start"] ~= nil and reason == nil then
    now = handle:timestamp()
    record_latency(latency_of(md.latency_key), now - dm["start"])
  end
  if bspec ~= nil then
    local b = breakers[md.breaker_key]
    -- overloaded is decided before the breaker; a call cut by its caller's shorter
    -- deadline is not the upstream's failure
    if b ~= nil and (unsent or not NOT_UPSTREAM[reason or ""]) then
      -- the attempts before the last, as lua/riprap_upstream.lua saw them ("F" failed, "S"
      -- answered below 500): the breaker counts attempts, as policies/breaker.py does
      if tries ~= nil then
        local outcomes = tries["outcomes"] or ""
        local last_answered = reason == nil or tries["rewrote"] == true
        local earlier = last_answered and #outcomes - 1 or #outcomes
        if earlier > 0 then now = now or handle:timestamp() end
        for k = 1, earlier do
          b_record(b, bspec, now, string.sub(outcomes, k, k) == "S", 0)
        end
      end
      if unsent then
        -- the last attempt never went out: nothing more to count
      elseif reason == "timeout" and dm["capped"] then
        -- cut by its caller's shorter deadline: not the upstream's failure
      elseif dm == nil and b.state == "closed" and bspec["kind"] ~= "rate" and status < 500 then
        b.consecutive = 0  -- b_record's own answer here, without a clock read (the common call)
      else
        now = now or handle:timestamp()
        local start = (dm ~= nil and dm["start"]) or now
        b_record(b, bspec, now, status < 500, now - start)
      end
    end
  end
  local call = nil
  if needs_call_state(fallbacks) then call = take_call(dm) end
  if status < 500 then
    if call ~= nil and call.cacheable and has_kind(fallbacks, "stale") then keep_stale(handle, service, call) end
    return
  end
  if #fallbacks == 0 then return end
  if reason == nil then reason = "upstream-5xx" end
  local ans = chain_answer(handle, service, call, fallbacks, true)
  if ans ~= nil then
    count_fallback(service, ans.kind)
    answer_with(handle, ans, reason, call ~= nil and call.method == "HEAD")
    if ans.attempts ~= nil then
      handle:headers():replace("x-riprap-attempts", tostring((tonumber(attempts) or 0) + ans.attempts))
    end
  end
end
