-- Starter policy: a successful login from a device family this account has not used.
--   local newDevice = dofile(".../new_device.lua")
--   newDevice.configure{window = "180d", min_history = 10}
-- A device is known when any of its families (the attributes of `keys` it has: browser for
-- http, IMAP client for imap, app for mobileapi) was seen on a success of the account; the
-- alert names what the account did use, under every key it has history for. Attributes are
-- derived from device_id at ingest.
local policy = { name = "new_device" }
local opts = { window = "180d", min_history = 10, top = 5,
               keys = { "browser.family", "imapc.family", "app.name" } }

function policy.configure(options)
  opts = StarterAlert.options(policy.name, opts, options)
end

-- The device families of lt: each key of `keys` it has a real value for, in `keys` order.
local function families(lt)
  local found = {}
  for _, key in ipairs(opts.keys) do
    local value = lt.device_attrs[key]
    if value ~= nil and value ~= "" and value ~= "Other" then
      found[#found + 1] = { key = key, value = value }
    end
  end
  return found
end

-- True when the account succeeded in `mine` with any of lt's families.
local function known(mine, present)
  for _, f in ipairs(present) do
    mine["device_attrs." .. f.key] = f.value
    local seen = countReports(mine) > 0
    mine["device_attrs." .. f.key] = nil
    if seen then return true end
  end
  return false
end

-- The families the account used, for every key it has history for ({[key] = top values}),
-- and the same as text: "imapc.family Thunderbird×108; browser.family Chrome×3".
local function used(mine)
  local by_key, parts = {}, {}
  for _, key in ipairs(opts.keys) do
    local top = StarterAlert.top("device_attrs." .. key, mine, opts.top)
    if #top > 0 then
      by_key[key] = top
      parts[#parts + 1] = key .. " " .. StarterAlert.summary(top)
    end
  end
  return by_key, #parts > 0 and table.concat(parts, "; ") or "none"
end

function policy.report(lt)
  if not lt.success then return end
  local present = families(lt)
  if #present == 0 then return end
  local mine = { login = lt.login, success = true, window = opts.window }
  local history = countReports(mine)
  if history < opts.min_history then return end
  if known(mine, present) then return end
  local first = present[1]
  local by_key, summary = used(mine)
  StarterAlert.send(policy.name, lt, lt.login, lt.remote:tostring(),
    string.format("first success with %s %s in %s; previous %s",
                  first.key, first.value, opts.window, summary),
    { attribute = first.key, value = first.value, window = opts.window, successes_in_window = history,
      previous_values = by_key[first.key] or jsonArray(), previous_devices = by_key })
end

return policy
