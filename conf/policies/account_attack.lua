-- Starter policy: one account under attack, failing from many addresses (or networks).
--   local attack = dofile(".../account_attack.lua")
--   attack.configure{window = "1h", max_remotes = 10, prefix = 24}
-- Alerts once, when the distinct addresses (with `prefix` > 0: distinct /prefix networks)
-- failing on the account in `window` reach `max_remotes`.
local policy = { name = "account_attack" }
local opts = { window = "1h", max_remotes = 10, prefix = 0 }

function policy.configure(options)
  opts = StarterAlert.options(policy.name, opts, options)
end

function policy.report(lt)
  if lt.success then return end
  local field, mine, label = "remote", lt.remote:tostring(), "addresses"
  local scope = { login = lt.login, success = false, window = opts.window }
  if opts.prefix > 0 then
    field = "remote/" .. opts.prefix
    mine = newNetmaskFromCA(lt.remote, opts.prefix):toStringNetwork()
    label = "/" .. opts.prefix .. " networks"
  end
  local before = countDistinct(field, scope)
  if before + 1 ~= opts.max_remotes then return end
  if field == "remote" then scope.remote = mine else scope.netmask = mine end
  local new_source = countReports(scope) == 0
  scope.remote, scope.netmask = nil, nil
  if not new_source then return end
  StarterAlert.send(policy.name, lt, lt.login, mine,
    string.format("%s failed from %d distinct %s in %s", lt.login, before + 1, label, opts.window),
    { distinct_sources = before + 1, source_kind = field, window = opts.window,
      threshold = opts.max_remotes, top_sources = StarterAlert.top(field, scope, 5) })
end

return policy
