-- Starter policies: the shared alert shape (docs/policies.md). Load this file first:
--   dofile("/etc/trackalert/policies/alert.lua")
-- Every starter policy reports through StarterAlert.send(), so they all send one JSON shape:
--   {"policy": ..., "login": ..., "remote": ..., "t": ..., "message": ..., "evidence": {...}}
-- to the custom webhook named by StarterAlert.webhook (register it with addCustomWebHook in the
-- config), and log it as well. With no webhook name set, the alert is only logged.

StarterAlert = StarterAlert or { webhook = "" }

-- The alert's JSON text: jsonEncode (sorted keys, so an alert's text is deterministic). Kept under
-- this name for configs that called it before jsonEncode existed.
StarterAlert.encode = jsonEncode

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
  local body = jsonEncode(alert)
  warnLog("Policy alert", { policy = policy, message = message })
  if StarterAlert.webhook ~= "" then
    runCustomWebHook(StarterAlert.webhook, body)
  end
  return body
end
