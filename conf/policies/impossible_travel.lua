-- Starter policy: two successful logins of one account further apart than anyone can travel
-- in the time between them.
--   local travel = dofile(".../impossible_travel.lua")
--   travel.configure{max_speed_kmh = 1000, min_distance_km = 500}
-- Needs enrichment with a City DB (lt.latitude/lt.longitude). Distances shorter than
-- min_distance_km are ignored: GeoIP locations are only approximate. A login from a place the
-- account uses regularly (`habitual` successes within min_distance_km of it in `habit_window`)
-- is never impossible: after an attacker's far-away login, the user's next login from home is
-- the return to a habit, not a second journey.
local policy = { name = "impossible_travel" }
local opts = { max_speed_kmh = 1000, min_distance_km = 500, window = "7d",
               habit_window = "30d", habitual = 3 }
local HABIT_SAMPLE = 200  -- the newest successes looked at to judge a place habitual
-- The fields read of the previous successes: only they cross into Lua (recentReports' third
-- argument).
local TRIP = { "t", "remote", "country", "city", "latitude", "longitude" }

function policy.configure(options)
  opts = StarterAlert.options(policy.name, opts, options)
end

local function km(lat1, lon1, lat2, lon2)  -- great-circle distance (haversine)
  local r = math.pi / 180
  local a = math.sin((lat2 - lat1) * r / 2) ^ 2
          + math.cos(lat1 * r) * math.cos(lat2 * r) * math.sin((lon2 - lon1) * r / 2) ^ 2
  return 2 * 6371 * math.asin(math.min(1, math.sqrt(a)))
end

-- True when at least `habitual` of the account's newest HABIT_SAMPLE successes in habit_window
-- were located within min_distance_km of lt's place (countNear measures them where they are
-- stored, with the haversine formula of km() above, and stops at `habitual` found, instead of
-- crossing 200 rows into Lua).
local function habitual(lt)
  if opts.habitual <= 0 then return false end
  local near = countNear({ login = lt.login, success = true, window = opts.habit_window },
                         HABIT_SAMPLE, lt.latitude, lt.longitude, opts.min_distance_km,
                         opts.habitual)
  return near >= opts.habitual
end

function policy.report(lt)
  if not lt.success or lt.latitude == nil then return end
  local previous = recentReports({ login = lt.login, success = true, window = opts.window }, 5,
                                 TRIP)
  for _, prev in ipairs(previous) do
    if prev.latitude ~= nil then
      local distance = km(prev.latitude, prev.longitude, lt.latitude, lt.longitude)
      if distance < opts.min_distance_km then return end
      local hours = math.max(lt.t - prev.t, 1) / 3600
      local speed = distance / hours
      if speed > opts.max_speed_kmh and not habitual(lt) then
        StarterAlert.send(policy.name, lt, lt.login, lt.remote:tostring(),
          string.format("%s to %s: %.0f km in %.1f h (%.0f km/h, limit %d km/h)",
                        prev.country ~= "" and prev.country or prev.remote,
                        lt.country ~= "" and lt.country or lt.remote:tostring(),
                        distance, hours, speed, opts.max_speed_kmh),
          { distance_km = math.floor(distance + 0.5), hours = hours, speed_kmh = math.floor(speed + 0.5),
            max_speed_kmh = opts.max_speed_kmh,
            previous = { remote = prev.remote, country = prev.country, city = prev.city, t = prev.t },
            current = { remote = lt.remote:tostring(), country = lt.country, city = lt.city, t = lt.t } })
      end
      return
    end
  end
end

return policy
