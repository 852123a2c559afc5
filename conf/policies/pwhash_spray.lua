-- Starter policy: the same wrong password (pwhash) tried against many accounts.
--   local reused = dofile(".../pwhash_spray.lua")
--   reused.configure{window = "1d", max_logins = 10}
-- wforce sends a truncated hash of the password, never the password. Alerts once, when the
-- distinct accounts failing with one pwhash in `window` reach `max_logins`.
local policy = { name = "pwhash_spray" }
local opts = { window = "1d", max_logins = 10 }

function policy.configure(options)
  opts = StarterAlert.options(policy.name, opts, options)
end

function policy.report(lt)
  if lt.success or lt.pwhash == "" then return end
  local scope = { pwhash = lt.pwhash, success = false, window = opts.window }
  local before = countDistinct("login", scope)
  if before + 1 ~= opts.max_logins then return end
  scope.login = lt.login
  local new_login = countReports(scope) == 0
  scope.login = nil
  if not new_login then return end
  StarterAlert.send(policy.name, lt, nil, lt.remote:tostring(),
    string.format("one wrong password hash failed on %d distinct logins in %s", before + 1, opts.window),
    { pwhash = lt.pwhash, distinct_logins = before + 1, window = opts.window,
      threshold = opts.max_logins, top_remotes = StarterAlert.top("remote", scope, 5),
      top_logins = StarterAlert.top("login", scope, 5) })
end

return policy
