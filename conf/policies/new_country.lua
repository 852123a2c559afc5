-- Starter policy: a successful login from a country this account has not logged in from.
--   local newCountry = dofile(".../new_country.lua")
--   newCountry.configure{window = "180d", min_history = 10}
--   ... and call newCountry.report(lt) from your report function.
-- Needs enrichment (setEnrichment with a City or Country DB) so that lt.country is set.
local policy = { name = "new_country" }
local opts = { window = "180d", min_history = 10, top = 5 }

function policy.configure(options)
  opts = StarterAlert.options(policy.name, opts, options)
end

function policy.report(lt)
  if not lt.success or lt.country == nil or lt.country == "" then return end
  local mine = { login = lt.login, success = true, window = opts.window }
  local history = countReports(mine)
  if history < opts.min_history then return end  -- too new an account to know its habits
  mine.country = lt.country
  if countReports(mine) > 0 then return end
  mine.country = nil
  local previous = StarterAlert.top("country", mine, opts.top)
  StarterAlert.send(policy.name, lt, lt.login, lt.remote:tostring(),
    string.format("first success from %s in %s; previous countries %s",
                  lt.country, opts.window, StarterAlert.summary(previous)),
    { country = lt.country, window = opts.window, successes_in_window = history,
      previous_countries = previous })
end

return policy
