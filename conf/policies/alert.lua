-- Starter policies: the shared alert shape and the way to combine them (docs/policies.md).
-- Load this file first:
--   dofile("/etc/trackalert/policies/alert.lua")
-- Every starter policy reports through StarterAlert.send(), so they all send one JSON shape:
--   {"policy": ..., "login": ..., "remote": ..., "t": ..., "message": ..., "evidence": {...}}
-- to the custom webhook named by StarterAlert.webhook (register it with addCustomWebHook in the
-- config), and log it as well. With no webhook name set, the alert is only logged.
-- StarterAlert.combine{...} runs several policies on each report, each in its own crash boundary.

StarterAlert = StarterAlert or { webhook = "" }

-- The alert's JSON text: jsonEncode (sorted keys, so an alert's text is deterministic). Kept under
-- this name for configs that called it before jsonEncode existed.
StarterAlert.encode = jsonEncode

-- topValues() as evidence: an array even when empty (`[]`, not `{}`).
function StarterAlert.top(field, filter, n)
  return jsonArray(topValues(field, filter, n))
end

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

-- The custom stat counting a policy's errors (`policy_errors:<name>`).
function StarterAlert.error_stat(name)
  return "policy_errors:" .. name
end

local traceback = debug.traceback

-- A policy's error is logged with its name and traceback and counted; the next policy still runs.
local function guarded(policy, lt)
  local ok, err = xpcall(policy.report, traceback, lt)
  if ok then return end
  errorLog("Policy failed", { policy = policy.name, error = tostring(err) })
  incCustomStat(StarterAlert.error_stat(policy.name))
end

-- One report function running `policies` (starter policies, or your own `{name = "...",
-- report = function(lt) ... end}`) in order, each under its own crash boundary: an error in one
-- aborts that policy for that report only. Call it while the config loads (it declares the
-- `policy_errors:<name>` custom stats, which only the config state can do):
--   setReport(StarterAlert.combine{newCountry, spray, {name = "mine", report = myCheck}})
function StarterAlert.combine(policies)
  local list = {}
  for i, policy in ipairs(policies) do
    if type(policy) ~= "table" or type(policy.name) ~= "string" or type(policy.report) ~= "function" then
      error("StarterAlert.combine: entry " .. i .. " is not a policy {name = ..., report = function(lt)}", 2)
    end
    addCustomStat(StarterAlert.error_stat(policy.name))
    list[i] = policy
  end
  return function(lt)
    for i = 1, #list do guarded(list[i], lt) end
  end
end
