-- Starter policies: the shared alert shape (docs/policies.md). Load this file first:
--   dofile("/etc/trackalert/policies/alert.lua")
-- Every starter policy reports through StarterAlert.send(), so they all send one JSON shape:
--   {"policy": ..., "login": ..., "remote": ..., "t": ..., "message": ..., "evidence": {...}}
-- to the custom webhook named by StarterAlert.webhook (register it with addCustomWebHook in the
-- config), and log it as well. With no webhook name set, the alert is only logged.

StarterAlert = StarterAlert or { webhook = "" }

local function encode_string(s)
  s = s:gsub('[%c"\\]', function(c)
    local named = { ['"'] = '\\"', ['\\'] = '\\\\', ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t' }
    return named[c] or string.format("\\u%04x", c:byte())
  end)
  return '"' .. s .. '"'
end

local function is_array(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  for i = 1, n do if t[i] == nil then return false end end
  return n > 0
end

-- A small JSON encoder: objects get sorted keys, so an alert's text is deterministic.
local function encode(value)
  local kind = type(value)
  if kind == "nil" then return "null" end
  if kind == "boolean" then return tostring(value) end
  if kind == "number" then
    if value ~= value or value == math.huge or value == -math.huge then return "null" end
    if value == math.floor(value) and math.abs(value) < 1e15 then return string.format("%d", value) end
    return string.format("%.14g", value)
  end
  if kind == "string" then return encode_string(value) end
  if kind == "table" then
    local parts = {}
    if is_array(value) then
      for _, v in ipairs(value) do parts[#parts + 1] = encode(v) end
      return "[" .. table.concat(parts, ",") .. "]"
    end
    local keys = {}
    for k in pairs(value) do keys[#keys + 1] = tostring(k) end
    table.sort(keys)
    for _, k in ipairs(keys) do
      local v = value[k]
      if v == nil then v = value[tonumber(k)] end
      parts[#parts + 1] = encode_string(k) .. ":" .. encode(v)
    end
    return "{" .. table.concat(parts, ",") .. "}"
  end
  return encode_string(tostring(value))
end
StarterAlert.encode = encode

-- "DE×412, FR×3" from topValues() output.
function StarterAlert.summary(top)
  local parts = {}
  for _, v in ipairs(top) do parts[#parts + 1] = tostring(v.value) .. "×" .. tostring(v.count) end
  if #parts == 0 then return "none" end
  return table.concat(parts, ", ")
end

-- Copies `defaults`, overridden by the operator's `options`; an unknown option is an error
-- (a typo must not silently leave a threshold at its default).
function StarterAlert.options(policy, defaults, options)
  local merged = {}
  for k, v in pairs(defaults) do merged[k] = v end
  for k, v in pairs(options or {}) do
    if defaults[k] == nil then error(policy .. ": unknown option '" .. tostring(k) .. "'", 3) end
    merged[k] = v
  end
  return merged
end

-- Send one alert: policy name, the login and/or remote concerned (nil to leave out), the time t
-- of the report that triggered it, a one-line message and the evidence table.
function StarterAlert.send(policy, lt, login, remote, message, evidence)
  local alert = { policy = policy, login = login, remote = remote, t = lt.t,
                  message = message, evidence = evidence or {} }
  local body = encode(alert)
  warnLog("Policy alert", { policy = policy, message = message })
  if StarterAlert.webhook ~= "" then
    runCustomWebHook(StarterAlert.webhook, body)
  end
  return body
end
