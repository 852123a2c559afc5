"""The starter policies (conf/policies) in a real daemon, fed a generated stream of benign and
attack reports; alerts arrive at a real HTTP receiver through the custom webhook.

One stream exercises all policies at once (as an operator would run them); each test then checks
one policy: it alerted on its attack, exactly once, with the documented alert shape, and never
on the benign users.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from trackalert.testing import DaemonProcess, basic_auth, listener_config, wait_for

REPO = Path(__file__).resolve().parent.parent
POLICIES = REPO / "conf" / "policies"
CITY = Path(__file__).parent / "data" / "geoip" / "GeoIP2-City-Test.mmdb"
AUTH = basic_auth()
DAY = 86400.0
T0 = 1_760_000_000.0
CHROME_MAC = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/120.0.0.0 Safari/537.36")
FIREFOX_WIN = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:121.0) Gecko/20100101 Firefox/121.0"
THUNDERBIRD = '"name" "Thunderbird" "version" "115.3.1" "os" "Linux"'
MAIL_APP = "acme.ios.MailApp/3.2 (OS: 17.1; device: iPhone)"
ALERT_KEYS = {"policy", "t", "message", "evidence"}


# Every starter policy, as an operator would load them, sending to the webhook `alerts`.
POLICY_LOAD = f"""
local dir = "{POLICIES}/"
dofile(dir .. "alert.lua")
StarterAlert.webhook = "alerts"
local policies = {{}}
for _, name in ipairs({{"new_country", "new_device", "impossible_travel", "password_spray",
                       "account_attack", "pwhash_spray"}}) do
  policies[#policies + 1] = dofile(dir .. name .. ".lua")
end
policies[1].configure{{min_history = 10}}
policies[4].configure{{max_logins = 20, prefix = 24, max_logins_network = 50}}
policies[5].configure{{max_remotes = 10}}
policies[6].configure{{max_logins = 10}}
"""
# The documented way to run them together: each policy in its own crash boundary.
COMBINE = "setReport(StarterAlert.combine(policies))\n"
POLICY_SETUP = POLICY_LOAD + COMBINE

# A policy that fails on every report, first in the list: the six after it must not notice.
BROKEN = """table.insert(policies, 1, {name = "broken", report = function(lt)
  error("broken policy on " .. lt.login)
end})
"""


def config(receiver_port: int) -> str:
    return listener_config() + f"""
setNumLuaStates(3)
newGeoIP2DB("City", "{CITY}")
setEnrichment({{city="City"}})
addCustomWebHook("alerts", {{url="http://127.0.0.1:{receiver_port}/alerts"}})
{POLICY_LOAD}{BROKEN}{COMBINE}-- the helpers from a custom function: as of now, over the whole log
setCustomEndpoint("failures", function(args)
  local top = topValues("login", {{success=false, netmask=args.attrs.net}}, 1)
  return true, {{logins = tostring(countDistinct("login", {{success=false}})),
                 reports = tostring(countReports({{success=false, netmask=args.attrs.net}})),
                 top = top[1] and top[1].value or ""}}
end)
"""


def report(login: str, remote: str, t: float, success: bool, pwhash: str = "",
           ua: str = CHROME_MAC, protocol: str = "https") -> dict[str, Any]:
    return {"login": login, "remote": remote, "t": t, "success": success, "pwhash": pwhash,
            "protocol": protocol, "device_id": ua}


def stream() -> list[dict[str, Any]]:
    """Benign users with habits, then each attack; `t` is wforce's time of each login."""
    out: list[dict[str, Any]] = []
    # 30 benign users, each at home (London or Linköping), 12 days of logins and one typo
    for u in range(30):
        home = f"81.2.69.{160 + u}" if u % 2 else f"89.160.20.{130 + u}"
        for day in range(12):
            out.append(report(f"user{u}", home, T0 + day * DAY + u * 60, True, f"good{u}"))
            if day == 5:
                out.append(report(f"user{u}", home, T0 + day * DAY + u * 60 + 5, False, f"typo{u}"))
    # a benign traveller between London and Linköping every two days (1,400 km in 48 h)
    for day in range(0, 28, 2):
        remote = "81.2.69.150" if day % 4 else "89.160.20.120"
        out.append(report("traveller", remote, T0 + day * DAY, True, "tgood"))
    # a new account: too little history to judge a second country
    for day in range(3):
        out.append(report("newbie", "81.2.69.151", T0 + day * DAY, True))
    out.append(report("newbie", "89.160.20.121", T0 + 4 * DAY, True))
    # benign users commuting London <-> Boxford (80 km): never impossible travel
    for hour in range(12):
        remote = "81.2.69.152" if hour % 2 else "2.125.160.217"
        out.append(report("commuter", remote, T0 + hour * 3600, True))

    # attack: alice's account used from China after 12 successes from London
    for day in range(12):
        out.append(report("alice", "81.2.69.153", T0 + day * DAY, True))
    out.append(report("alice", "175.16.199.5", T0 + 42 * DAY, True))
    # attack: bob's account used from a never-seen browser
    for day in range(12):
        out.append(report("bob", "81.2.69.154", T0 + day * DAY, True))
    out.append(report("bob", "81.2.69.154", T0 + 13 * DAY, True, ua=FIREFOX_WIN))
    # attack: carol in London, then in Melbourne two hours later
    for day in range(12):
        out.append(report("carol", "81.2.69.155", T0 + day * DAY, True))
    out.append(report("carol", "214.0.1.5", T0 + 11 * DAY + 7200, True))
    # ... and carol herself back in London 8.4 h later: the return to her habit, not a journey
    out.append(report("carol", "81.2.69.155", T0 + 11 * DAY + 7200 + 30240, True))
    # benign: heidi's habit is London, but her newest 16 successes are all from Linköping (a
    # project there); back in London an hour after the last one, 1,400 km at 1,400 km/h, her
    # habit is found only beyond her newest 16 (more than recentReports keeps in memory per
    # login: countNear counts the newest 200 where they are stored)
    for day in range(3):
        out.append(report("heidi", "81.2.69.157", T0 + day * DAY, True))
    for half in range(18):
        out.append(report("heidi", "89.160.20.122", T0 + 3 * DAY + half * DAY / 2, True))
    out.append(report("heidi", "81.2.69.157", T0 + 3 * DAY + 17 * DAY / 2 + 3600, True))
    # attack: frank only ever read his mail over IMAP, then someone logs in to his webmail
    for i in range(108):
        out.append(report("frank", "81.2.69.156", T0 + i * 2 * 3600, True, ua=THUNDERBIRD,
                          protocol="imap"))
    out.append(report("frank", "81.2.69.156", T0 + 10 * DAY, True))
    # benign: grace's mail app, then the same app seen through its web view (wforce sent both
    # families): known by its app name, whatever the browser family says
    for day in range(12):
        out.append(report("grace", "81.2.69.157", T0 + day * DAY, True, ua=MAIL_APP,
                          protocol="mobileapi"))
    out.append({**report("grace", "81.2.69.157", T0 + 12 * DAY, True, ua=""),
                "device_attrs": {"browser.family": "Mobile Safari UI/WKWebView", "app.name": "MailApp"}})
    # attack: one address sprays 25 accounts (a different password each time)
    for i in range(25):
        out.append(report(f"spray{i}", "67.43.156.10", T0 + 20 * DAY + i, False, f"s{i}"))
    # attack: a /24 sprays 60 accounts, each address only once
    for i in range(60):
        out.append(report(f"netspray{i}", f"2.2.3.{i + 1}", T0 + 21 * DAY + i, False, f"n{i}"))
    # attack: dave's account fails from 12 addresses
    for i in range(12):
        out.append(report("dave", f"175.16.199.{100 + i}", T0 + 22 * DAY + i, False, f"d{i}"))
    # attack: one leaked wrong password tried on 15 accounts from a handful of addresses
    for i in range(15):
        out.append(report(f"victim{i}", f"216.160.83.{56 + i % 8}", T0 + 23 * DAY + i, False,
                          "deadbeef"))
    return out


async def run_scenario(directory: Path) -> tuple[list[dict[str, Any]], list[dict[str, str]], str, str]:
    received: list[dict[str, Any]] = []
    headers: list[dict[str, str]] = []

    seen: set[str] = set()

    async def hook(request: web.Request) -> web.Response:
        # Delivery is at least once: a retry after a timeout repeats its X-Wforce-Delivery id,
        # so the receiver keeps the first copy only, as a real receiver should.
        body = await request.read()
        delivery = request.headers.get("X-Wforce-Delivery", "")
        if delivery not in seen:
            seen.add(delivery)
            received.append(json.loads(body))
            headers.append(dict(request.headers))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/alerts", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    reports = stream()
    try:
        with DaemonProcess(directory, config(port)) as daemon:
            async with aiohttp.ClientSession() as session:
                for body in reports:  # one at a time: log order is the stream's order
                    async with session.post(daemon.url("/command/report"), json=body,
                                            headers=AUTH) as resp:
                        assert resp.status == 200, await resp.text()
            db = directory / "trackalert-events.db"

            def all_ran() -> bool:
                with sqlite3.connect(db) as conn:
                    row = conn.execute("SELECT seq FROM cursors WHERE name = 'report'").fetchone()
                return bool(row) and row[0] >= len(reports)

            assert await wait_for(all_ran, timeout=60), daemon.output()[-3000:]
            logged = daemon.output().count("Policy alert")
            assert await wait_for(lambda: len(received) >= logged, timeout=30), daemon.output()[-3000:]
            async with aiohttp.ClientSession() as session:
                for _ in range(300):  # bounded: until the outbox has delivered everything
                    async with session.get(daemon.url("/metrics"), headers=AUTH) as resp:
                        metrics = await resp.text()
                        if "\ntrackalert_webhook_outbox_depth 0.0" in metrics:
                            break
                    await asyncio.sleep(0.1)
                async with session.post(daemon.url("/command/failures"), headers=AUTH,
                                        json={"attrs": {"net": "175.16.199.0/24"}}) as resp:
                    assert resp.status == 200, await resp.text()
                    answer = await resp.json()
            output = daemon.output()
            received.append({"policy": "(endpoint)", **answer["r_attrs"]})
    finally:
        await runner.cleanup()
    return received, headers, output, metrics


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], list[dict], str, str]:
    return asyncio.run(run_scenario(tmp_path_factory.mktemp("policies")))


def alerts(scenario, policy: str) -> list[dict[str, Any]]:
    received = scenario[0]
    return [a for a in received if a["policy"] == policy]


def test_helpers_answer_in_custom_functions(scenario) -> None:
    reports = stream()
    failed = [r for r in reports if not r["success"]]
    [answer] = alerts(scenario, "(endpoint)")
    in_net = [r for r in failed if r["remote"].startswith("175.16.199.")]
    assert answer["logins"] == str(len({r["login"] for r in failed}))
    assert answer["reports"] == str(len(in_net)) == "12"
    assert answer["top"] == "dave"


def test_every_alert_has_the_documented_shape(scenario) -> None:
    received, headers, output, _ = scenario
    received = [a for a in received if a["policy"] != "(endpoint)"]
    assert received, output[-3000:]
    for alert in received:
        assert ALERT_KEYS <= set(alert) <= ALERT_KEYS | {"login", "remote"}, alert
        assert "login" in alert or "remote" in alert
        assert isinstance(alert["message"], str) and "\n" not in alert["message"]
        assert isinstance(alert["evidence"], dict) and alert["evidence"]
    assert {h.get("X-Wforce-Event") for h in headers} == {"alerts"}
    # the webhook carries exactly what the log line announced, once each
    assert len(received) == output.count("Policy alert")


def test_new_country(scenario) -> None:
    found = alerts(scenario, "new_country")
    assert sorted(a["login"] for a in found) == ["alice", "carol"]
    alice = next(a for a in found if a["login"] == "alice")
    assert alice["t"] == T0 + 42 * DAY and alice["remote"] == "175.16.199.5"
    assert alice["message"] == "first success from CN in 180d; previous countries GB×12"
    assert alice["evidence"]["previous_countries"] == [{"value": "GB", "count": 12}]
    assert alice["evidence"]["successes_in_window"] == 12


def test_new_device(scenario) -> None:
    found = alerts(scenario, "new_device")
    assert sorted(a["login"] for a in found) == ["bob", "frank"]  # not grace: her app is known
    bob = next(a for a in found if a["login"] == "bob")
    assert bob["evidence"]["value"] == "Firefox"
    assert bob["evidence"]["previous_values"] == [{"value": "Chrome", "count": 12}]
    assert "first success with browser.family Firefox" in bob["message"]


def test_new_device_names_what_the_account_used_under_every_key(scenario) -> None:
    """frank's 108 IMAP logins are his history, not "previous none"; his first webmail login is
    still a new device. previous_values (his browsers) is the empty array `[]`, not `{}`."""
    [frank] = [a for a in alerts(scenario, "new_device") if a["login"] == "frank"]
    assert frank["message"] == ("first success with browser.family Chrome in 180d; "
                                "previous imapc.family Thunderbird×108")
    assert frank["evidence"]["previous_values"] == []
    assert frank["evidence"]["previous_devices"] == {
        "imapc.family": [{"value": "Thunderbird", "count": 108}]}
    assert frank["evidence"]["successes_in_window"] == 108


def test_a_failing_policy_does_not_stop_the_others(scenario) -> None:
    """The policy first in the list fails on every report: each failure is logged with its
    name and counted, and every other policy's alerts still arrive (the tests above)."""
    _, _, output, metrics = scenario
    reports = len(stream())
    assert output.count("Policy failed: ") == output.count('policy="broken"') == reports
    assert "broken policy on frank" in output
    assert f'trackalert_custom_stats_total{{metric="policy_errors:broken"}} {reports}.0' in metrics
    assert 'trackalert_custom_stats_total{metric="policy_errors:new_country"} 0.0' in metrics
    # every report ran, and no error escaped the boundary to the runner's
    assert f'trackalert_lua_calls_total{{kind="report"}} {reports}.0' in metrics
    assert 'trackalert_lua_errors_total{function="report"}' not in metrics
    assert {a["policy"] for a in scenario[0]} >= {"new_country", "new_device", "impossible_travel",
                                                 "password_spray", "account_attack", "pwhash_spray"}


def test_impossible_travel(scenario) -> None:
    """One alert for carol's attacker in Melbourne, none for her own return to London 8.4 h
    later (London is her habit), none for heidi's return to hers (older than her newest 16)."""
    found = alerts(scenario, "impossible_travel")
    assert [a["login"] for a in found] == ["carol"]
    evidence = found[0]["evidence"]
    assert 16_000 < evidence["distance_km"] < 17_500 and evidence["hours"] == 2
    assert evidence["speed_kmh"] > 1000
    assert (evidence["previous"]["country"], evidence["current"]["country"]) == ("GB", "AU")
    assert re.match(r"GB to AU: \d+ km in 2\.0 h", found[0]["message"])


def test_password_spray(scenario) -> None:
    found = alerts(scenario, "password_spray")
    assert sorted(a["remote"] for a in found) == ["2.2.3.0/24", "67.43.156.10"]
    single = next(a for a in found if a["remote"] == "67.43.156.10")
    assert single["evidence"]["distinct_logins"] == 20 and single["t"] == T0 + 20 * DAY + 19
    network = next(a for a in found if a["remote"] == "2.2.3.0/24")
    assert network["evidence"]["distinct_logins"] == 50
    assert all("login" not in a for a in found)


def test_account_attack(scenario) -> None:
    found = alerts(scenario, "account_attack")
    assert [a["login"] for a in found] == ["dave"]
    assert found[0]["evidence"]["distinct_sources"] == 10
    assert found[0]["remote"] == "175.16.199.109"


def test_pwhash_spray(scenario) -> None:
    found = alerts(scenario, "pwhash_spray")
    assert len(found) == 1
    assert found[0]["evidence"]["pwhash"] == "deadbeef"
    assert found[0]["evidence"]["distinct_logins"] == 10
    assert found[0]["t"] == T0 + 23 * DAY + 9


def test_thresholds_are_settable_and_a_misspelt_option_is_an_error() -> None:
    from trackalert.lua.host import Host
    from trackalert.lua.state import LuaError, LuaState, StateKind

    state = LuaState(StateKind.WORKER, Host())
    state.execute(f'dofile("{POLICIES}/alert.lua")\np = dofile("{POLICIES}/new_country.lua")')
    state.execute("p.configure{min_history = 3, window = '30d'}")
    with pytest.raises(LuaError, match="new_country: unknown option 'min_histroy'"):
        state.execute("p.configure{min_histroy = 3}")


def test_alert_json_encoder_escapes_and_sorts() -> None:
    from trackalert.lua.host import Host
    from trackalert.lua.state import LuaState, StateKind

    state = LuaState(StateKind.WORKER, Host())
    state.execute(f'dofile("{POLICIES}/alert.lua")')
    (text,) = state.execute(
        'return StarterAlert.encode({b = {1, 2.5, true}, a = "q\\"\\n\\1", c = {}, d = {x = false}})'
    )
    assert json.loads(text) == {"a": 'q"\n\x01', "b": [1, 2.5, True], "c": {}, "d": {"x": False}}
    assert text.startswith('{"a":')


# ------------------------------------------------------------------ a replay of a stored log


COPIES = 5  # the stream, five times over (other logins, 60 days apart): ~3,500 stored events
ALERTS_PER_COPY = 9  # one per attack in the stream


# The scenario's policies, with the alerts kept in Lua instead of sent.
REPLAY_SETUP = POLICY_SETUP + """
ALERTS = {}
local send = StarterAlert.send
StarterAlert.webhook = ""
function StarterAlert.send(...)
  ALERTS[#ALERTS + 1] = send(...)
end
"""


async def store_copies(path: Path) -> int:
    from trackalert.clock import VirtualClock
    from trackalert.devices import DeviceParser
    from trackalert.enrich import Enricher
    from trackalert.eventlog.sqlite import SQLiteEventLog
    from trackalert.geoip import GeoIPRegistry
    from trackalert.report import report_from_dict

    geoip = GeoIPRegistry()
    geoip.open("City", str(CITY))
    enricher = Enricher(geoip, {"city": "City"}, DeviceParser())
    clock = VirtualClock(start=T0)
    log = SQLiteEventLog(path, clock)
    await log.open()
    count = 0
    for copy in range(COPIES):
        for body in stream():
            body = {**body, "login": f"{body['login']}~{copy}", "t": body["t"] + copy * 60 * DAY}
            await clock.advance(max(0.0, body["t"] - clock.time()))
            await log.append(enricher.enrich(report_from_dict(body, clock.time())))
            count += 1
    await log.close()
    return count


async def replay(stored: Path, directory: Path, projection: bool = True) -> tuple[list[str], float]:
    """Run the starter policies over a copy of the stored log with the daemon's policy runner
    (one Lua state): the alerts in order, and the Lua errors counted."""
    import shutil

    from trackalert.clock import VirtualClock
    from trackalert.eventlog.sqlite import SQLiteEventLog
    from trackalert.lua.host import Host
    from trackalert.lua.pool import LuaPool
    from trackalert.lua.runner import PolicyRunner
    from trackalert.lua.state import LuaState, StateKind

    directory.mkdir()
    shutil.copyfile(stored, directory / "events.db")
    clock = VirtualClock(start=T0 + 400 * DAY)
    log = SQLiteEventLog(directory / "events.db", clock)
    await log.open()
    host = Host(clock=clock, eventlog=log)
    host.geoip.open("City", str(CITY))
    state = LuaState(StateKind.WORKER, host)
    state.execute(REPLAY_SETUP)
    pool = LuaPool([state], clock)
    runner = PolicyRunner(log, pool, host, projection=projection)
    await runner.start()
    head = await log.last_seq()
    assert await wait_for(lambda: runner.done >= head, timeout=120)
    await runner.stop()
    pool.close()
    await log.close()
    (alerts,) = state.execute("return ALERTS")
    errors = re.findall(r"^trackalert_lua_errors_total\{[^}]*\} (\S+)$", host.metrics.render().decode(), re.M)
    return [alerts[i] for i in range(1, len(alerts) + 1)], sum(map(float, errors))


async def test_a_replay_of_a_stored_log_gives_the_same_alerts_every_time(tmp_path: Path) -> None:
    """The starter policies over thousands of stored events: no Lua error, every attack of every
    copy alerted, and byte-identical alerts on every run (lupa's mix-ups made them vary)."""
    stored = tmp_path / "stored.db"
    events = await store_copies(stored)
    runs = [await replay(stored, tmp_path / f"run{i}") for i in range(3)]
    for alerts, errors in runs:
        assert errors == 0
        assert len(alerts) == ALERTS_PER_COPY * COPIES, alerts
    assert runs[0][0] == runs[1][0] == runs[2][0]
    print(f"{events} events, {len(runs[0][0])} alerts, identical in {len(runs)} runs")
