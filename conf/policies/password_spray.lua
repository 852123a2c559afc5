-- Starter policy: password spraying, one address (or one network) failing on many accounts.
--   local spray = dofile(".../password_spray.lua")
--   spray.configure{window = "1h", max_logins = 20, prefix = 24}
-- Alerts once, when the number of distinct accounts failing from the address (or, with
-- `prefix`, its /prefix network; 0 turns that check off) in `window` reaches `max_logins`.
local policy = { name = "password_spray" }
local opts = { window = "1h", max_logins = 20, prefix = 24, max_logins_network = 50 }

function policy.configure(options)
  opts = StarterAlert.options(policy.name, opts, options)
end

-- true when lt's login is the one that makes `scope` reach `threshold` distinct logins
local function crosses(scope, lt, threshold)
  local before = countDistinct("login", scope)
  if before + 1 ~= threshold then return false, before end
  scope.login = lt.login
  local new_login = countReports(scope) == 0
  scope.login = nil
  return new_login, before
end

-- One check for either scope: an address, or its network. `top` names the evidence list
-- (the logins tried from one address; the addresses used from one network).
local function check(lt, label, scope, threshold, top)
  local hit, before = crosses(scope, lt, threshold)
  if not hit then return end
  StarterAlert.send(policy.name, lt, nil, label,
    string.format("%s failed on %d distinct logins in %s", label, before + 1, opts.window),
    { scope = label, distinct_logins = before + 1, window = opts.window,
      threshold = threshold, ["top_" .. top .. "s"] = StarterAlert.top(top, scope, 5) })
end

function policy.report(lt)
  if lt.success then return end
  local remote = lt.remote:tostring()
  check(lt, remote, { remote = remote, success = false, window = opts.window },
        opts.max_logins, "login")
  if opts.prefix > 0 then
    local network = newNetmaskFromCA(lt.remote, opts.prefix):toStringNetwork()
    check(lt, network, { netmask = network, success = false, window = opts.window },
          opts.max_logins_network, "remote")
  end
end

return policy
