"""The replay engine over a simulated month: background functions fire at their virtual times,
no helper ever sees a later event, and the outputs do not depend on the machine's speed.

Logs are real SQLite event logs in the daemon's schema (`trackalert.replay.source.load_events`
writes events with their own seq and `received`); the replay runs through its command line.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from dateutil import tz

from trackalert.eventlog.base import Event
from trackalert.replay.cli import main
from trackalert.replay.source import load_events
from trackalert.report import Report

DAY = 86400.0
#: Not on a whole minute: no event is received exactly when a cron run is due.
START = 1_767_225_600.0 + 1234.5  # 2026-01-01 00:20:34.5 UTC
STEP = 37 * 60.0  # an event every 37 minutes: 1,168 over 30 days


def month_of_events(days: int = 30, step: float = STEP, start: float = START) -> list[Event]:
    """A month of reports: 9 logins from 5 addresses, every third one failed."""
    events = []
    for i in range(int(days * DAY / step)):
        received = start + i * step
        report = Report(login=f"user{i % 9}", remote=f"192.0.2.{i % 5 + 1}", t=received - 0.25,
                        success=i % 3 != 0, pwhash=f"{i % 4:04x}", protocol="imap")
        events.append(Event(i + 1, received, report))
    return events


def build_log(path: Path, events: list[Event]) -> Path:
    load_events(events, str(path))
    return path


def replay(tmp_path: Path, config: str, log: Path, *args: str, name: str = "policy.conf") -> tuple[int, list[dict], dict]:
    """Run trackalert-replay; its exit status, alerts and summary."""
    conf = tmp_path / name
    conf.write_text(config, encoding="utf-8")
    out, summary = tmp_path / f"{name}.alerts.ndjson", tmp_path / f"{name}.summary.json"
    status = main(["--config", str(conf), "--log", str(log), "--out", str(out),
                   "--summary-json", str(summary), "-q", *args])
    alerts = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return status, alerts, json.loads(summary.read_text()) if summary.exists() else {}


# A report policy and two background functions, each telling what the helpers show it.
SEEING = """
addCustomWebHook("seen", {url="http://192.0.2.1/never"})
setReport(function(lt)
  local before = recentReports({}, 1)[1]
  runCustomWebHook("seen", jsonEncode({policy="report", count=countReports({}),
    last_seq=before and before.seq or 0, last=lastSeen({}) or 0,
    fails=countReports({login=lt.login, success=false, window="1d"})}))
end)
local function sees(name)
  return function()
    local newest = recentReports({}, 1)[1]
    runCustomWebHook("seen", jsonEncode({policy=name, count=countReports({}),
      last_seq=newest and newest.seq or 0, last=lastSeen({}) or 0,
      day=countReports({window="1d"})}))
  end
end
setBackground("nightly", sees("nightly"))
cronScheduleBackgroundFunc("0 3 * * *", "nightly")
setBackground("sixhourly", sees("sixhourly"))
intervalScheduleBackgroundFunc("06:00:00", "sixhourly")
"""


def expected_cron_times(start: float, end: float) -> list[float]:
    """03:00 local time of each day in (start, end], the zone the scheduler uses."""
    zone = tz.tzlocal()
    day = datetime.datetime.fromtimestamp(start, zone).date()
    times = []
    for n in range(40):
        moment = datetime.datetime.combine(day + datetime.timedelta(days=n), datetime.time(3), zone)
        if start < moment.timestamp() <= end:
            times.append(moment.timestamp())
    return times


def test_background_functions_run_at_their_virtual_times_seeing_only_the_past(tmp_path: Path) -> None:
    events = month_of_events()
    log = build_log(tmp_path / "month.db", events)
    end = START + 30 * DAY
    status, alerts, summary = replay(tmp_path, SEEING, log, "--to", str(end))
    assert status == 0, summary
    assert summary["events"] == len(events) == 1167
    nightly = [a for a in alerts if a["policy"] == "nightly"]
    sixhourly = [a for a in alerts if a["policy"] == "sixhourly"]
    # cron 0 3 * * * over 30 days: 30 runs, each at 03:00; the interval every 6 h from the start
    assert [a["time"] for a in nightly] == expected_cron_times(START, end)
    assert len(nightly) == 30
    assert [a["time"] for a in sixhourly] == [START + 6 * 3600 * n for n in range(1, 121)]
    for alert in nightly + sixhourly:
        before = [e for e in events if e.received < alert["time"]]
        body = alert["body"]
        # exactly the events received before its virtual time, never one after
        assert body["count"] == len(before) and body["last_seq"] == before[-1].seq
        assert body["last"] == before[-1].received and alert["seq"] == before[-1].seq
        assert body["day"] == sum(1 for e in before if e.received >= alert["time"] - DAY)
        assert alert["login"] == alert["remote"] == ""


def test_no_helper_in_report_sees_its_event_or_a_later_one(tmp_path: Path) -> None:
    events = month_of_events()
    log = build_log(tmp_path / "month.db", events)
    status, alerts, _ = replay(tmp_path, SEEING, log)
    assert status == 0
    reports = [a for a in alerts if a["policy"] == "report"]
    assert [a["seq"] for a in reports] == [e.seq for e in events]
    for alert, event in zip(reports, events):
        before = events[:event.seq - 1]
        body = alert["body"]
        assert body["count"] == len(before) and body["last_seq"] == event.seq - 1
        assert body["last"] == (before[-1].received if before else 0)
        assert body["fails"] == sum(1 for e in before if e.report.login == event.report.login
                                    and not e.report.success and e.received >= event.received - DAY)
        assert alert["time"] == event.received
        assert (alert["login"], alert["remote"]) == (event.report.login, event.report.remote)


def test_from_to_and_login_select_events_but_not_the_history_helpers_see(tmp_path: Path) -> None:
    events = month_of_events()
    log = build_log(tmp_path / "month.db", events)
    start, end = START + 10 * DAY, START + 12 * DAY
    status, alerts, summary = replay(tmp_path, SEEING.split("local function sees")[0], log,
                                     "--from", str(start), "--to", str(end), "--login", "user4")
    chosen = [e for e in events if start <= e.received < end and e.report.login == "user4"]
    assert status == 0 and summary["events"] == len(chosen) > 0
    assert [a["seq"] for a in alerts] == [e.seq for e in chosen]
    # the helpers still count every event before each one, of every login, before --from too
    assert [a["body"]["count"] for a in alerts] == [e.seq - 1 for e in chosen]
    assert (summary["from"], summary["to"]) == (start, end)


# Windowed distinct counts (the projection, built by a thread while the replay runs) and the
# same questions through SQL (recentReports): the answers must not depend on which path or on
# when the projection's shapes came on.
WINDOWED = """
addCustomWebHook("a", {url="http://192.0.2.1/never"})
setReport(function(lt)
  local logins = countDistinct("login", {remote=lt.remote, success=false, window="3d"})
  local remotes = countDistinct("remote", {login=lt.login, window="7d"})
  local seen = #recentReports({login=lt.login, window="2d"}, 3)
  if logins >= 2 or remotes >= 3 then
    runCustomWebHook("a", jsonEncode({policy="w", logins=logins, remotes=remotes, seen=seen}))
  end
end)
"""


def test_outputs_are_byte_identical_whatever_the_speed(tmp_path: Path) -> None:
    """Three runs: one alone, two at once in subprocesses (each slowed by the other): the
    alerts and the summary (minus its timing fields) are the same bytes."""
    log = build_log(tmp_path / "month.db", month_of_events(step=600.0))
    conf = tmp_path / "w.conf"
    conf.write_text(WINDOWED, encoding="utf-8")
    runs = []
    for n in range(3):
        runs.append((tmp_path / f"out{n}.ndjson", tmp_path / f"summary{n}.json"))
    assert main(["--config", str(conf), "--log", str(log), "-q", "--out", str(runs[0][0]),
                 "--summary-json", str(runs[0][1])]) == 0
    procs = [subprocess.Popen([sys.executable, "-m", "trackalert.replay.cli", "--config", str(conf),
                               "--log", str(log), "-q", "--out", str(out), "--summary-json", str(s)])
             for out, s in runs[1:]]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    alerts = {out.read_bytes() for out, _ in runs}
    assert len(alerts) == 1 and alerts.pop().count(b"\n") > 100
    summaries = []
    for _, path in runs:
        summary: dict[str, Any] = json.loads(path.read_text())
        assert summary["run_seconds"] > 0 and summary["events_per_second"] > 0
        del summary["run_seconds"], summary["events_per_second"]
        summaries.append(json.dumps(summary))
    assert len(set(summaries)) == 1


def test_a_background_run_does_not_see_the_events_received_at_its_own_time(tmp_path: Path) -> None:
    """Events received exactly when a run is due come after it (their reports run after it):
    the run sees the events received before its time only, as the report helpers do."""
    cron = expected_cron_times(START, START + 3 * DAY)
    events = [e for e in month_of_events(days=3, step=3600.0)]
    received = sorted([e.received for e in events] + cron + cron)  # two events at each run time
    events = [Event(n + 1, when, events[n % len(events)].report) for n, when in enumerate(received)]
    log = build_log(tmp_path / "ties.db", events)
    status, alerts, _ = replay(tmp_path, SEEING, log, "--to", str(START + 3 * DAY))
    assert status == 0
    nightly = [a for a in alerts if a["policy"] == "nightly"]
    assert [a["time"] for a in nightly] == cron
    for alert in nightly:
        before = [e for e in events if e.received < alert["time"]]
        assert alert["body"]["count"] == len(before) and alert["seq"] == before[-1].seq
        assert alert["body"]["last_seq"] == before[-1].seq
