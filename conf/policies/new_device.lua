-- Starter policy: a successful login from a device family this account has not used.
--   local newDevice = dofile(".../new_device.lua")
--   newDevice.configure{window = "180d", min_history = 10}
-- The family is the first device attribute present among `keys` (browser for http, IMAP
-- client for imap, app for mobileapi); attributes are derived from device_id at ingest.
local policy = { name = "new_device" }
local opts = { window = "180d", min_history = 10, top = 5,
               keys = { "browser.family", "imapc.family", "app.name" } }

function policy.configure(options)
  opts = StarterAlert.options(policy.name, opts, options)
end

local function family(lt)
  for _, key in ipairs(opts.keys) do
    local value = lt.device_attrs[key]
    if value ~= nil and value ~= "" and value ~= "Other" then return key, value end
  end
end

function policy.report(lt)
  if not lt.success then return end
  local key, value = family(lt)
  if key == nil then return end
  local mine = { login = lt.login, success = true, window = opts.window }
  local history = countReports(mine)
  if history < opts.min_history then return end
  mine["device_attrs." .. key] = value
  if countReports(mine) > 0 then return end
  mine["device_attrs." .. key] = nil
  local previous = topValues("device_attrs." .. key, mine, opts.top)
  StarterAlert.send(policy.name, lt, lt.login, lt.remote:tostring(),
    string.format("first success with %s %s in %s; previous %s",
                  key, value, opts.window, StarterAlert.summary(previous)),
    { attribute = key, value = value, window = opts.window, successes_in_window = history,
      previous_values = previous })
end

return policy
