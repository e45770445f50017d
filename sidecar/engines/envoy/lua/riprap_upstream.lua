-- riprap's upstream Lua filter: Envoy's router runs it once per attempt (its upstream HTTP
-- filters), where riprap.lua sees only the whole call. It reads the matched route's
-- metadata `tries` (routes.py), present on routes that may resend a call:
--   codes        the statuses the retry is on ({} when only failures are retried)
--   retries      how many resends Envoy may make (retries plus hedge copies)
--   hedge        true when copies of the call may be in flight at once
--   backoff      {kind = "exponential"|"constant", base_ms, max_ms, jitter} (nil: at once)
--   latency_key  the window of attempt latencies (the service, or SERVICE/SHARD)
--   waits        true: this filter waits between attempts; false on routes with a per-try
--                timer (`per-try`, or a hedge), which Envoy runs from the start of an
--                attempt, through any wait: there Envoy waits (fully jittered backoff, and a
--                Retry-After in whole seconds that this filter passes as x-riprap-retry-after)
--   budget       {ratio, floor, window_ms}: the retry budget (policies/budget.py), kept
--                under latency_key: a resend is allowed while, counting it, the resends in
--                the window stay within max(ratio * calls in the window, floor)
-- and the call's `deadline` (epoch ms) that riprap.lua puts in the dynamic metadata.
--
-- For each attempt it
--   * sends the time left before the deadline as x-riprap-deadline-ms;
--   * waits before a retry as policies/backoff.py says (its jitter, or the upstream's
--     Retry-After when longer), by a request to Envoy's own listener that the `riprap.delay`
--     fault filter holds that long (Envoy's own backoff is always fully jittered and only
--     takes a Retry-After in whole seconds);
--   * decides whether an answer is retried, as policies/stages/retry.py: a status the retry
--     is on, unless its Retry-After ends past the deadline (the upstream's answer is passed
--     on) or the time left after the wait is shorter than the median latency of the last
--     attempts (then a 504 `timeout` at once, for the fallback chain); and, while a hedge
--     copy is still in flight, a 5xx waits for it (the first good answer wins).
-- Envoy resends an answer that carries x-riprap-retry (routes.py: `retriable-headers`);
-- the route removes that header from the answer the client gets.
--
-- Per call state is in the stream's dynamic metadata (shared by its attempts); the latency
-- windows are per Envoy worker (a Lua state each).

local SELF = "_riprap_self"
local NS = "riprap.tries"
local CALL_NS = "envoy.filters.http.lua"
local RETRY = "x-riprap-retry"
local RETRY_AFTER = "x-riprap-retry-after"
local WINDOW = 256

local windows = {}  -- latency_key -> {ring, i}
pcall(function() math.randomseed(os.time() + math.floor(os.clock() * 1000000)) end)
local meta_cache, meta_cache_count = {}, 0

-- Envoy hands a metadata number that is not a whole number to Lua as a string.
local function num(v)
  if v == nil then return nil end
  return tonumber(v)
end

-- The route's `tries`, converted once per route `id`. handle:metadata() copies the route's
-- whole metadata on every call, so the route's name (routes.py names a route by its `id`)
-- finds the table first; a sharded service's routes are read from their metadata (after
-- riprap.lua's clearRouteCache the name may still be the shard-pick route's).
local function tries_meta(handle)
  local m = meta_cache[handle:streamInfo():routeName()]
  if m ~= nil and not m.sharded then
    if m.none then return nil end
    return m
  end
  local md = handle:metadata()
  local id = md:get("id")
  if id == nil then return nil end
  m = meta_cache[id]
  if m == nil then
    local t = md:get("tries")
    m = {none = t == nil, sharded = md:get("shard") ~= nil}
    if t ~= nil then
      m.codes = {}
      for _, c in pairs(t["codes"] or {}) do m.codes[tonumber(c)] = true end
      m.retries = num(t["retries"]) or 0
      m.hedge = t["hedge"] == true
      m.latency_key = t["latency_key"] or ""
      m.waits = t["waits"] == true
      local bs = md:get("breaker")
      if bs ~= nil then
        m.breaker = {kind = bs["kind"], failures = num(bs["failures"]) or 1, rate = num(bs["rate"]) or 1,
                     window = num(bs["window"]) or 1, min_calls = num(bs["min_calls"]) or 1,
                     probes = num(bs["probes"]) or 1}
      end
      local bu = t["budget"]
      if bu ~= nil then
        m.budget = {ratio = num(bu["ratio"]) or 0, floor = num(bu["floor"]) or 0,
                    width = (num(bu["window_ms"]) or 10000) / 10}
      end
      local b = t["backoff"]
      if b ~= nil then
        m.backoff = {kind = b["kind"], base = num(b["base_ms"]) or 0, max = num(b["max_ms"]) or 0,
                     jitter = b["jitter"] or "full"}
      end
    end
    if meta_cache_count > 4096 then meta_cache, meta_cache_count = {}, 0 end
    meta_cache[id] = m
    meta_cache_count = meta_cache_count + 1
  end
  if m.none then return nil end
  return m
end

-- What Envoy's own (fully jittered) backoff waits on average before retry n, in ms: on
-- routes where Envoy waits (`waits` false), for the deadline rule.
local function envoy_backoff_ms(b, n)
  if b == nil then return 0 end
  local top = b.kind == "exponential" and math.max(b.max, b.base) or b.base
  return math.min(top, b.base * 2 ^ math.min(n - 1, 60)) / 2
end

-- policies/backoff.py: the wait before retry number n (1 = the first), in ms.
local function backoff_ms(b, n, previous)
  if b == nil then return 0 end
  local base = b.base
  local top = b.kind == "exponential" and math.max(b.max, base) or base
  if b.jitter == "decorrelated" then
    local hi = (previous or base) * 3
    if hi < base then hi = base end
    return math.min(top, base + math.random() * (hi - base))
  end
  local d = base
  if b.kind == "exponential" then d = math.min(top, base * 2 ^ math.min(n - 1, 60)) end
  if b.jitter == "full" then return math.random() * d end
  if b.jitter == "equal" then return d / 2 + math.random() * d / 2 end
  return d
end

local MONTHS = {jan = 1, feb = 2, mar = 3, apr = 4, may = 5, jun = 6, jul = 7, aug = 8, sep = 9, oct = 10,
                nov = 11, dec = 12}

-- Days from 1970-01-01 to a civil date (proleptic Gregorian).
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- An HTTP-date (IMF-fixdate, RFC 850 or asctime) as epoch seconds, or nil.
local function http_date(s)
  local d, mon, y, hh, mm, ss = string.match(s, "^%a+, (%d+) (%a+) (%d+) (%d+):(%d+):(%d+)")
  if d == nil then
    d, mon, y, hh, mm, ss = string.match(s, "^%a+, (%d+)-(%a+)-(%d+) (%d+):(%d+):(%d+)")
    if y ~= nil and #y == 2 then y = tostring(1900 + tonumber(y) + (tonumber(y) < 70 and 100 or 0)) end
  end
  if d == nil then
    mon, d, hh, mm, ss, y = string.match(s, "^%a+ (%a+) +(%d+) (%d+):(%d+):(%d+) (%d+)")
  end
  if d == nil then return nil end
  local m = MONTHS[string.lower(string.sub(mon, 1, 3))]
  if m == nil then return nil end
  local days = days_from_civil(tonumber(y), m, tonumber(d))
  return days * 86400 + tonumber(hh) * 3600 + tonumber(mm) * 60 + tonumber(ss)
end

-- Retry-After as ms from now (policies/retry.py parse_retry_after), or nil.
local function retry_after_ms(value, now_ms)
  if value == nil then return nil end
  value = string.gsub(value, "^%s*(.-)%s*$", "%1")
  local secs = string.match(value, "^%d+%.?%d*$") and tonumber(value) or nil
  if secs ~= nil then return secs * 1000 end
  local at = http_date(value)
  if at == nil then return nil end
  return math.max(0, at * 1000 - now_ms)
end

-- ---- the retry budget (policies/budget.py): 10 buckets of window/10 each ------------------
local budgets = {}  -- latency_key -> {calls = {}, retries = {}, slot, n_calls, n_retries, refused}

local function budget_of(key, spec, now)
  local b = budgets[key]
  if b == nil or b.width ~= spec.width then
    b = {calls = {}, retries = {}, slot = math.floor(now / spec.width), n_calls = 0, n_retries = 0,
         refused = 0, width = spec.width}
    for i = 0, 9 do b.calls[i], b.retries[i] = 0, 0 end
    budgets[key] = b
  end
  return b
end

local function budget_roll(b, now)
  local slot = math.floor(now / b.width)
  if slot > b.slot then
    if slot - b.slot >= 10 then
      for i = 0, 9 do b.calls[i], b.retries[i] = 0, 0 end
      b.n_calls, b.n_retries = 0, 0
    else
      for s = b.slot + 1, slot do
        local i = s % 10
        b.n_calls = b.n_calls - b.calls[i]
        b.n_retries = b.n_retries - b.retries[i]
        b.calls[i], b.retries[i] = 0, 0
      end
    end
    b.slot = slot
  end
  return b.slot % 10
end

local function budget_call(b, now)
  local i = budget_roll(b, now)
  b.calls[i] = b.calls[i] + 1
  b.n_calls = b.n_calls + 1
end

-- Spend one resend; false (and counted as refused) when the budget has none left.
local function budget_spend(b, spec, now, force)
  local i = budget_roll(b, now)
  local limit = math.max(spec.ratio * b.n_calls, spec.floor)
  if not force and b.n_retries + 1 > limit + 1e-9 then
    b.refused = b.refused + 1
    return false
  end
  b.retries[i] = b.retries[i] + 1
  b.n_retries = b.n_retries + 1
  return true
end

-- The budget's window (of cluster `key`) as riprap.lua's /counters reports it (`/state`'s calls and retries in
-- the window): "SLOT WIDTH_MS c0..c9 r0..r9", rolled to the time of reading over there.
local function budget_note(dmd, key, b)
  dmd:set(NS, "budget_key", key)
  dmd:set(NS, "budget", b.slot .. " " .. b.width .. " " .. table.concat(b.calls, " ", 0, 9) .. " "
          .. table.concat(b.retries, " ", 0, 9))
end

local function window_of(key)
  local w = windows[key]
  if w == nil then
    w = {ring = {}, i = 0}
    windows[key] = w
  end
  return w
end

local function record(w, ms)
  if ms < 0 then ms = 0 end
  w.i = (w.i % WINDOW) + 1
  w.ring[w.i] = ms
end

local function median(w)
  local n = #w.ring
  if n == 0 then return nil end
  local sorted = {}
  for k = 1, n do sorted[k] = w.ring[k] end
  table.sort(sorted)
  return sorted[math.max(1, math.ceil(0.5 * n - 1e-9))]
end

-- policies/retry.py retry_fits: after the wait, time for a typical attempt?
local function fits(left, wait, med)
  local remaining = left - wait
  if remaining <= 0 then return false end
  return med == nil or remaining >= med
end

local function sleep(handle, ms)
  ms = math.floor(ms)
  if ms < 1 then return end
  pcall(handle.httpCall, handle, SELF,
        {[":method"] = "GET", [":path"] = "/sleep", [":authority"] = "_riprap",
         ["x-envoy-fault-delay-request"] = tostring(ms)}, "",
        {timeout_ms = ms + 1000, trace_sampled = false})  -- a wait, not a call: no span
end

-- The answer becomes riprap's 504 `timeout`: too little time is left for another attempt.
local function answer_timeout(handle)
  handle:streamInfo():dynamicMetadata():set(NS, "rewrote", true)  -- riprap.lua: this attempt answered
  local body = handle:body(true)
  local headers = handle:headers()  -- the headers seen before body() are out of scope now
  headers:replace(":status", "504")
  headers:replace("content-type", "application/json")
  headers:replace("x-riprap-reason", "timeout")
  headers:remove("content-length")
  headers:remove("retry-after")
  local text = '{"error": "too little time left for a retry", "reason": "timeout"}'
  if body ~= nil then body:setBytes(text) end
end

-- Would the breaker (riprap.lua's, as the call found it: `snapshot`) be open after this
-- call's attempts so far (`outcomes`)? As policies/breaker.py records each attempt.
local function breaker_opened(spec, snapshot, outcomes)
  local state, consecutive, ring = string.match(snapshot or "", "^([%a-]+)|(%d+)|([FS]*)$")
  if state == nil or state == "open" then return false end
  consecutive = tonumber(consecutive)
  local ok_probes = 0
  for k = 1, #outcomes do
    local ok = string.sub(outcomes, k, k) == "S"
    if state == "half-open" then
      if not ok then return true end  -- a failed probe opens it again
      ok_probes = ok_probes + 1
      if ok_probes >= spec.probes then state, consecutive, ring = "closed", 0, "" end
    elseif spec.kind == "rate" then
      ring = string.sub(ring .. (ok and "S" or "F"), -spec.window)
      local _, failures = string.gsub(ring, "F", "")
      local min_calls = math.max(1, math.min(spec.min_calls, spec.window))
      if failures > 0 and #ring >= min_calls and failures >= spec.rate * #ring - 1e-9 then return true end
    elseif ok then
      consecutive = 0
    else
      consecutive = consecutive + 1
      if consecutive >= spec.failures then return true end
    end
  end
  return false
end

function envoy_on_request(handle)
  local m = tries_meta(handle)
  if m == nil then return end
  local dmd = handle:streamInfo():dynamicMetadata()
  local st = dmd:get(NS) or {}
  local call = dmd:get(CALL_NS) or {}
  local deadline = num(call["deadline"])
  local n = (num(st["n"]) or 0) + 1
  local inflight = num(st["inflight"]) or 0
  if m.budget ~= nil then
    local b = budget_of(m.latency_key, m.budget, handle:timestamp())
    if n == 1 then
      budget_call(b, handle:timestamp())
    elseif num(st["spent"]) ~= n then
      -- a resend Envoy started by itself (connect failure, reset, a hedge copy): it counts
      budget_spend(b, m.budget, handle:timestamp(), true)
    end
    budget_note(dmd, m.latency_key, b)
  end
  if n > 1 and not m.hedge and (num(st["answers"]) or 0) < n - 1 then
    -- the attempt before this one had no answer (connect failure, reset, per-try timeout)
    dmd:set(NS, "outcomes", (st["outcomes"] or "") .. "F")
    dmd:set(NS, "answers", n - 1)
  end
  if n > 1 and m.breaker ~= nil then
    local outcomes = dmd:get(NS) or {}
    if breaker_opened(m.breaker, call["breaker"], outcomes["outcomes"] or "") then
      -- the call's own attempts opened the breaker: this one fails fast, as riprap's does
      dmd:set(NS, "unsent", true)  -- riprap.lua: not one of the call's attempts
      handle:respond({[":status"] = "503", ["content-type"] = "application/json",
                      ["x-riprap-reason"] = "breaker-open"},
                     '{"error": "breaker open", "reason": "breaker-open"}')
      return
    end
  end
  if n > 1 and m.hedge and inflight > 0 then  -- a hedge copy: riprap.lua counts them
    dmd:set(NS, "hedges", (num(st["hedges"]) or 0) + 1)
  elseif n > 1 then  -- a retry (a hedge copy goes at once)
    local wait = num(st["wait_ms"]) or -1
    if wait < 0 then  -- no answer came (its answer's wait and deadline were decided then)
      wait = m.waits and backoff_ms(m.backoff, n - 1, num(st["prev_ms"])) or 0
      if deadline ~= nil and not fits(deadline - handle:timestamp(), wait, median(window_of(m.latency_key))) then
        -- too little time left for a typical attempt: 504 at once (policies/stages/retry.py)
        dmd:set(NS, "unsent", true)
        handle:respond({[":status"] = "504", ["content-type"] = "application/json", ["x-riprap-reason"] = "timeout"},
                       '{"error": "too little time left for a retry", "reason": "timeout"}')
        return
      end
    end
    if deadline ~= nil then wait = math.min(wait, deadline - handle:timestamp()) end
    if m.waits and wait >= 1 then
      sleep(handle, wait)
      dmd = handle:streamInfo():dynamicMetadata()  -- what was read before the wait is out of scope
      dmd:set(NS, "prev_ms", wait)
    end
  end
  local now = handle:timestamp()
  dmd:set(NS, "n", n)
  dmd:set(NS, "inflight", inflight + 1)
  dmd:set(NS, "t_last", now)
  dmd:set(NS, "wait_ms", -1)
  if deadline ~= nil then
    handle:headers():replace("x-riprap-deadline-ms", tostring(math.max(0, math.floor(deadline - now))))
  end
end

function envoy_on_response(handle)
  local m = tries_meta(handle)
  if m == nil then return end
  local headers = handle:headers()
  local status = tonumber(headers:get(":status")) or 0
  local dmd = handle:streamInfo():dynamicMetadata()
  local st = dmd:get(NS) or {}
  local now = handle:timestamp()
  local inflight = math.max(0, (num(st["inflight"]) or 1) - 1)
  dmd:set(NS, "inflight", inflight)
  local w = window_of(m.latency_key)
  record(w, now - (num(st["t_last"]) or now))
  -- each answer, in order, for riprap.lua's breaker (which counts attempts)
  dmd:set(NS, "outcomes", (st["outcomes"] or "") .. (status >= 500 and "F" or "S"))
  dmd:set(NS, "answers", (num(st["answers"]) or 0) + 1)
  local hedged = m.hedge and inflight > 0
  if not m.codes[status] then
    if hedged and status >= 500 then headers:replace(RETRY, "1") end  -- wait for the copy in flight
    return
  end
  local n = num(st["n"]) or 1
  if n > m.retries then return end  -- the retries are used up: this answer is the call's
  if hedged then
    headers:replace(RETRY, "1")
    return
  end
  local wait = m.waits and backoff_ms(m.backoff, n, num(st["prev_ms"])) or envoy_backoff_ms(m.backoff, n)
  local ra = retry_after_ms(headers:get("retry-after"), now)
  if ra ~= nil and not m.waits then ra = math.ceil(ra / 1000) * 1000 end  -- Envoy waits whole seconds
  local call = dmd:get(CALL_NS) or {}
  local deadline = num(call["deadline"])
  if deadline ~= nil then
    local left = deadline - now
    local med = median(w)
    if ra ~= nil and ra > wait and not fits(left, ra, med) then
      return  -- the upstream asked for more time than is left: its own answer is passed on
    end
    if ra ~= nil and ra > wait then wait = ra end
    if not fits(left, wait, med) then
      answer_timeout(handle)
      return
    end
  elseif ra ~= nil and ra > wait then
    wait = ra
  end
  if m.budget ~= nil then
    local b = budget_of(m.latency_key, m.budget, now)
    local spent = budget_spend(b, m.budget, now, false)
    budget_note(dmd, m.latency_key, b)
    if not spent then
      dmd:set(NS, "refused", 1)  -- riprap.lua counts it for /state and /metrics
      return  -- the budget is spent: this answer is the call's
    end
    dmd:set(NS, "spent", n + 1)
  end
  dmd:set(NS, "wait_ms", wait)
  if not m.waits and ra ~= nil and ra >= wait and ra > 0 then
    headers:replace(RETRY_AFTER, tostring(math.floor(ra / 1000)))  -- Envoy's rate-limited backoff
  end
  headers:replace(RETRY, "1")
end
