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

function policy.report(lt)
  if lt.success then return end
  local remote = lt.remote:tostring()
  local scope = { remote = remote, success = false, window = opts.window }
  local hit, before = crosses(scope, lt, opts.max_logins)
  if hit then
    StarterAlert.send(policy.name, lt, nil, remote,
      string.format("%s failed on %d distinct logins in %s", remote, before + 1, opts.window),
      { scope = remote, distinct_logins = before + 1, window = opts.window,
        threshold = opts.max_logins, top_logins = topValues("login", scope, 5) })
  end
  if opts.prefix > 0 then
    local network = newNetmaskFromCA(lt.remote, opts.prefix):toStringNetwork()
    scope = { netmask = network, success = false, window = opts.window }
    hit, before = crosses(scope, lt, opts.max_logins_network)
    if hit then
      StarterAlert.send(policy.name, lt, nil, network,
        string.format("%s failed on %d distinct logins in %s", network, before + 1, opts.window),
        { scope = network, distinct_logins = before + 1, window = opts.window,
          threshold = opts.max_logins_network, top_remotes = topValues("remote", scope, 5) })
    end
  end
end

return policy
