-- Every Lua idiom of conf/ and the starter policies, each checked against what the report said.
-- The tests put the expected values in the report's attrs (remote, user, family, browser,
-- success, net, in_group, country, city) and the group's masks in IDIOM_MASKS before loading
-- this file. Used in-process (tests/test_lua_values.py) and in the real daemon
-- (tests/test_lua_stress.py); a wrong value is counted and logged, a Lua error is the runner's.
Idioms = { calls = 0, mismatches = 0 }
local group = newNetmaskGroup()
for _, mask in ipairs(IDIOM_MASKS) do group:addMask(mask) end
local db = getGeoIP2DB("City")

local function check(what, ok, lt, got)
  Idioms.calls = Idioms.calls + 1
  incCustomStat("idiom_calls")
  if not ok then
    Idioms.mismatches = Idioms.mismatches + 1
    incCustomStat("idiom_mismatch")
    errorLog("idiom mismatch", { what = what, login = lt.login, got = tostring(got) })
  end
end

local function ends_with(text, tail)
  return type(text) == "string" and text:sub(-#tail) == tail
end

function Idioms.report(lt)
  local want = lt.attrs
  local remote = lt.remote:tostring()
  check("tostring", remote == want.remote, lt, remote)
  check("login", lt.login == want.user .. "|" .. want.remote, lt, lt.login)
  check("family", lt.remote:isIPv4() == (want.family == "4")
                  and lt.remote:isIPv6() == (want.family == "6"), lt, want.family)
  check("mapped", lt.remote:isMappedIPv4() == false, lt, lt.remote:isMappedIPv4())
  check("device", lt.device_attrs["browser.family"] == want.browser, lt, lt.device_attrs["browser.family"])
  check("success", tostring(lt.success) == want.success, lt, lt.success)
  local net = newNetmaskFromCA(lt.remote, lt.remote:isIPv4() and 24 or 64):toStringNetwork()
  check("network", net == want.net, lt, net)
  check("netmask", newNetmask(want.net):match(lt.remote), lt, want.net)
  check("group", tostring(group:match(lt.remote)) == want.in_group, lt, group:match(lt.remote))
  check("newCA", newCA(want.remote):tostring() == want.remote, lt, want.remote)
  local country = db:lookupCountry(lt.remote)
  check("country", country == want.country, lt, country)
  local city = db:lookupCity(lt.remote).city
  check("city", city == want.city, lt, city)
  local previous = recentReports({ remote = lt.remote, window = "1d" }, 1)[1]
  check("recent", previous == nil or previous.remote == want.remote, lt, previous and previous.remote)
  local same = true
  for _, top in ipairs(topValues("login", { remote = lt.remote, window = "1d" }, 3)) do
    same = same and ends_with(top.value, "|" .. want.remote)
  end
  check("top", same, lt, "topValues")
  check("count", countReports({ login = lt.login }) == 0, lt, "countReports")
  infoLog("idiom report", { login = lt.login, remote = remote, success = tostring(lt.success) })
end
