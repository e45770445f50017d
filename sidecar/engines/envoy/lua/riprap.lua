-- riprap's Lua filter: what Envoy has no knob for. It reads the matched route's metadata
-- (under "envoy.filters.http.lua"), written by sidecar/engines/envoy/routes.py:
--   service     the service name (every riprap route has it)
--   timeout_ms  the route's timeout, to cap with an incoming x-riprap-deadline-ms
--   shard       {by, key, names, default, strip, timeouts}: pick a shard by rendezvous hash
--   fallback    {status, body, content_type}: the static answer for a failed call (5xx)
--   breaker     true: "no healthy upstream" is the approximated breaker being open
-- `blake2b` (lua/blake2b.lua) is prepended to this file by the compiler.

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
     ["x-riprap-reason"] = "no-shard-key", ["x-riprap-attempts"] = "0"},
    '{"error": "no shard key", "reason": "no-shard-key", "service": "' .. service .. '"}')
end

function envoy_on_request(handle)
  local md = handle:metadata()
  local service = md:get("service")
  if service == nil then return end
  local headers = handle:headers()
  local timeout_ms = md:get("timeout_ms")
  local shard = md:get("shard")
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
  else
    headers:remove("x-riprap-shard")
  end
  local incoming = headers:get("x-riprap-deadline-ms")
  if incoming ~= nil then
    local n = tonumber(incoming)
    if n ~= nil and n >= 1 and (timeout_ms == nil or n < timeout_ms) then
      headers:replace("x-envoy-upstream-rq-timeout-ms", tostring(math.floor(n)))
    end
  end
end

function envoy_on_response(handle)
  local md = handle:metadata()
  if md:get("service") == nil then return end
  local headers = handle:headers()
  local attempts = headers:get("x-riprap-attempts")
  if attempts == nil or attempts == "" or attempts == "-" then
    headers:replace("x-riprap-attempts", "0")
  end
  local status = tonumber(headers:get(":status")) or 0
  if status < 500 then return end
  local reason = headers:get("x-riprap-reason")
  if reason == "no-healthy-endpoint" and md:get("breaker") then
    reason = "breaker-open"
    headers:replace("x-riprap-reason", reason)
  end
  local fb = md:get("fallback")
  if fb == nil then return end
  if reason == nil then reason = "upstream-5xx" end
  -- headers first: the header map may not be touched once body() has waited
  headers:replace(":status", tostring(fb["status"]))
  headers:replace("content-type", fb["content_type"])
  headers:replace("x-riprap-fallback", "static")
  headers:replace("x-riprap-reason", reason)
  headers:remove("x-riprap-chaos")
  headers:remove("retry-after")
  handle:body(true):setBytes(fb["body"])
end
