"""Alerts end to end, on both backends: a real daemon runs the starter password-spray policy over
concurrent reports, delivers its alerts to a real receiver on loopback, records each one with its
outcome, answers countAlerts/recentAlerts as of each report, and `trackalert alerts` lists them.
On SQLite, a replay of the same log answers the same questions from its captured alerts."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from elastic_server import elastic_base, elastic_url  # noqa: F401  (fixtures)
from test_lua_values import metric
from trackalert.eventlog import open_alerts
from trackalert.eventlog.alerts import AlertFilter
from trackalert.eventlog.filters import AsOf
from trackalert.testing import DaemonProcess, WebhookReceiver, basic_auth, listener_config, wait_for

REPO = Path(__file__).resolve().parent.parent
POLICIES = REPO / "conf" / "policies"
AUTH = basic_auth()
REMOTES = [f"198.51.100.{i}" for i in range(1, 11)]
LOGINS_PER_REMOTE = 7


def config(url: str, port: int) -> str:
    """The starter spray policy, a follow-up that tells once per address using countAlerts, and a
    trace of what countAlerts/recentAlerts answered for each report."""
    return listener_config() + f"""
setEventLog("{url}")
setNumLuaStates(2)
addCustomWebHook("alerts", {{url="http://127.0.0.1:{port}/alerts"}})
dofile("{POLICIES}/alert.lua")
StarterAlert.webhook = "alerts"
local spray = dofile("{POLICIES}/password_spray.lua")
spray.configure{{window = "1h", max_logins = 5, prefix = 0}}
local followup = {{name = "followup"}}
function followup.report(lt)
  local r = lt.remote:tostring()
  if countAlerts({{policy="password_spray", remote=r}}) > 0
     and countAlerts({{policy="followup", remote=r, window="1d"}}) == 0 then
    StarterAlert.send("followup", lt, nil, r, "still failing after the spray alert", {{}})
  end
end
local trace = {{name = "trace"}}
function trace.report(lt)
  local r = lt.remote:tostring()
  local policies = {{}}
  for _, a in ipairs(recentAlerts({{remote=r, window="1d"}}, 5)) do policies[#policies + 1] = a.policy end
  table.sort(policies)
  local f = io.open("seen.txt", "a")
  f:write(r, " ", countAlerts({{policy="password_spray", remote=r}}), " ",
          table.concat(policies, ",") == "" and "-" or table.concat(policies, ","), "\\n")
  f:close()
end
setReport(StarterAlert.combine{{spray, followup, trace}})
"""


def seen(directory: Path) -> list[list[str]]:
    path = directory / "seen.txt"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


async def send_spray(process: DaemonProcess) -> list[int]:
    """Every remote fails on 7 logins of its own, all interleaved, 8 clients at once."""
    pairs = [(r, f"user{i}@{r}") for r in REMOTES for i in range(LOGINS_PER_REMOTE)]
    random.Random(5).shuffle(pairs)
    queue = iter(pairs)
    statuses: list[int] = []

    async def client(session: aiohttp.ClientSession) -> None:
        for remote, login in queue:
            body = json.dumps({"login": login, "remote": remote, "success": False, "pwhash": "ab"})
            async with session.post(process.url("/command/report"), data=body, headers=AUTH) as resp:
                statuses.append(resp.status)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(8)))
    return statuses


def trackalert(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trackalert", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(params=["sqlite", "elasticsearch"])
def log_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/events.db"
    return request.getfixturevalue("elastic_url")


async def test_starter_alerts_are_recorded_delivered_asked_and_listed(
        tmp_path: Path, log_url: str) -> None:
    receiver = await WebhookReceiver().start()
    try:
        with DaemonProcess(tmp_path, config(log_url, receiver.port)) as process:
            total = len(REMOTES) * LOGINS_PER_REMOTE
            assert await send_spray(process) == [200] * total
            assert await wait_for(lambda: len(seen(tmp_path)) == total, timeout=60)
            assert await wait_for(lambda: len(receiver.bodies) == 2 * len(REMOTES), timeout=30)
            store = open_alerts(log_url)
            try:
                delivered = AlertFilter(outcome="delivered")
                assert await wait_for(lambda: store.count(delivered, AsOf()) == 20, timeout=30)
                stored = store.recent(AlertFilter(), 100, AsOf())
            finally:
                store.close()
            async with aiohttp.ClientSession() as session:
                async with session.get(process.url("/metrics"), headers=AUTH) as resp:
                    scraped = await resp.text()
    finally:
        await receiver.stop()
    # the spray's countDistinct is answered by the window projection on both backends (on
    # Elasticsearch from its narrow read, es_fields.py) once its shape is built
    assert metric(scraped, "trackalert_projection_answers_total",
                  'helper="countDistinct",source="projection"') > 0, scraped

    # As of each report: its remote's first five reports saw no alert (the fifth sent the spray
    # alert, and a report does not see its own), the sixth saw the spray alert and sent the
    # follow-up, the seventh saw both; so exactly one follow-up per remote.
    by_remote: dict[str, list[tuple[str, str]]] = {}
    for remote, count, policies in seen(tmp_path):
        by_remote.setdefault(remote, []).append((count, policies))
    expected = [("0", "-")] * 5 + [("1", "password_spray"), ("1", "followup,password_spray")]
    assert by_remote == {remote: expected for remote in REMOTES}

    assert sorted((b["policy"], b["remote"]) for b in receiver.json_bodies()) == sorted(
        (p, r) for r in REMOTES for p in ("password_spray", "followup"))
    assert sorted(a.delivery_id for a in stored) == sorted(h["X-Wforce-Delivery"] for h in receiver.headers)
    for alert in stored:
        assert alert.hook == "alerts" and alert.outcome == "delivered" and alert.attempts == 1
        assert alert.seq is not None and alert.settled is not None and alert.settled >= alert.created
        assert alert.decoded_body()["policy"] == alert.policy and alert.login is None

    listed = trackalert("alerts", "--url", log_url, "--policy", "password_spray", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(r["remote"] for r in rows) == sorted(REMOTES)
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows), "oldest first"
    assert {(r["outcome"], r["hook"], r["body"]["policy"]) for r in rows} == {
        ("delivered", "alerts", "password_spray")}
    table = trackalert("alerts", "--url", log_url)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["Time", "(UTC)", "Policy", "Login"] and len(lines) == 21
    assert sum("followup" in line and "delivered" in line for line in lines) == 10
    later = trackalert("alerts", "--url", log_url, "--from", "2100-01-01")
    assert later.returncode == 0 and len(later.stdout.splitlines()) == 1
    bad = trackalert("alerts", "--url", log_url, "--outcome", "sent")
    assert bad.returncode == 1 and "'outcome' must be one of" in bad.stderr

    if log_url.startswith("sqlite"):
        await replay_gives_the_same_answers(tmp_path, stored)


async def replay_gives_the_same_answers(tmp_path: Path, stored: list) -> None:
    """The replay captures instead of sending, and its countAlerts/recentAlerts answer from what
    it captured: the same trace, the same alerts (a replay answering from nothing would send no
    follow-up; one answering from the log's stored alerts would see them too early)."""
    daemon_trace = seen(tmp_path)
    out = tmp_path / "replayed.ndjson"
    result = subprocess.run(
        [sys.executable, "-m", "trackalert.replay.cli", "--config", str(tmp_path / "trackalert.conf"),
         "--log", str(tmp_path / "events.db"), "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert seen(tmp_path)[len(daemon_trace):] == daemon_trace
    replayed = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((a["seq"], a["body"]["policy"]) for a in replayed) == sorted(
        (a.seq, a.policy) for a in stored)
