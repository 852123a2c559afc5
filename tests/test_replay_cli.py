"""trackalert-replay's command line: bad input and policy errors give a clear message and the
documented exit status, calls a replay cannot honour are noted once, --compare shows exactly
what a changed threshold changes, and the log file is never written."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from test_replay_engine import DAY, START, build_log, month_of_events, replay
from trackalert.replay.cli import BAD_INPUT, OK, POLICY_ERROR
from trackalert.replay.source import LogSource, Selection, load_events

ALERT_KEYS = ["seq", "time", "hook", "login", "remote", "policy", "body"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trackalert.replay.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


@pytest.fixture(scope="module")
def month(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_log(tmp_path_factory.mktemp("month") / "month.db", month_of_events())


def test_a_file_that_is_not_a_log_is_bad_input(tmp_path: Path, month: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a log\n")
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    conf = tmp_path / "p.conf"
    conf.write_text("setReport(function(lt) end)\n")
    for source, message in ((text, "is not a trackalert event log (not an SQLite file)"),
                            (other, "is an SQLite file but not a trackalert event log (no events table)"),
                            (tmp_path / "missing.db", "no such file")):
        result = run_cli("--config", str(conf), "--log", str(source))
        assert result.returncode == BAD_INPUT == 2, result.stderr
        assert f"trackalert-replay: {source}" in result.stderr and message in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "missing.db").exists()
    result = run_cli("--config", str(tmp_path / "nope.conf"), "--log", str(month))
    assert result.returncode == BAD_INPUT and "nope.conf: no such config file" in result.stderr
    result = run_cli("--config", str(conf), "--log", str(month), "--from", "yesterday")
    assert result.returncode == BAD_INPUT and "neither epoch seconds nor an ISO date" in result.stderr


def test_a_truncated_ndjson_export_is_bad_input(tmp_path: Path) -> None:
    export = tmp_path / "export.ndjson"
    export.write_text('{"seq": 1, "received": 1767225600.0, "delivery_id": null, "rep')
    conf = tmp_path / "p.conf"
    conf.write_text("setReport(function(lt) end)\n")
    result = run_cli("--config", str(conf), "--log", str(export))
    assert result.returncode == BAD_INPUT, result.stderr
    assert f"trackalert-replay: {export}" in result.stderr and "Traceback" not in result.stderr


ERRORS = """addCustomWebHook("alerts", {url="http://192.0.2.1/never"})
setReport(function(lt)
  if lt.login == "user4" then runCustomWebHook("alert", "typo") end
  runCustomWebHook("alerts", lt.login)
  if lt.login == "user7" then local t = nil; return t.x end
end)
"""


def test_an_unknown_hook_and_a_failing_policy_are_policy_errors_naming_file_and_line(
        tmp_path: Path, month: Path) -> None:
    conf = tmp_path / "errors.conf"
    conf.write_text(ERRORS)
    out, summary_path = tmp_path / "a.ndjson", tmp_path / "s.json"
    result = run_cli("--config", str(conf), "--log", str(month), "--out", str(out),
                     "--summary-json", str(summary_path))
    assert result.returncode == POLICY_ERROR == 1
    # user4's first report is event 5: the replay stops right after it, saying where
    assert ("trackalert-replay: policy error at event 5: errors.conf:3: runCustomWebHook(): no "
            "custom webhook named 'alert'") in result.stderr
    summary = json.loads(summary_path.read_text())
    assert summary["events"] == 5 and summary["lua_errors"] == 1
    assert [a["body"] for a in map(json.loads, out.read_text().splitlines())] == [
        "user0", "user1", "user2", "user3", "user4"]

    result = run_cli("--config", str(conf), "--log", str(month), "--summary-json", str(summary_path),
                     "--keep-going")
    assert result.returncode == OK, result.stderr
    summary = json.loads(summary_path.read_text())
    events = month_of_events()
    assert summary["events"] == len(events)
    assert summary["lua_errors"] == sum(1 for e in events if e.report.login in ("user4", "user7"))
    assert len(summary["errors"]) == 20
    assert summary["errors"][1]["seq"] == 8
    assert summary["errors"][1]["message"].startswith("errors.conf:5: attempt to index local 't'")
    assert "Lua errors: 259" in result.stdout


def test_a_config_that_does_not_load_is_a_policy_error(tmp_path: Path, month: Path) -> None:
    conf = tmp_path / "broken.conf"
    conf.write_text("setReport(function(lt)\n  if then end\nend)\n")
    result = run_cli("--config", str(conf), "--log", str(month))
    assert result.returncode == POLICY_ERROR
    assert "Syntax error in configuration: broken.conf:2:" in result.stderr


PRODUCTION = """addListener("127.0.0.1:8085", false, "", "", {})
addListener("[::1]:8085", false, "", "", {})
setWebserverPassword("secret")
controlSocket("127.0.0.1:4004")
setKey("TO+Lmto0AP8A57aA9wDDzpAt4G5FC5wELqnzkdoYDJU=")
setNumLuaStates(8)
setNumWebProcesses(2)
setEventLog("sqlite:///elsewhere.db")
setEventLogRetention("30d")
addCustomWebHook("alerts", {url="http://192.0.2.1/alerts", secret="s"})
addCustomStat("failed")
setCustomEndpoint("whoami", function(args) return true, {} end)
setReport(function(lt)
  if not lt.success then incCustomStat("failed") infoLog("failed", {login=lt.login}) end
end)
"""


def test_a_production_config_replays_unchanged_with_one_note_per_ignored_call(
        tmp_path: Path, month: Path) -> None:
    conf = tmp_path / "trackalert.conf"
    conf.write_text(PRODUCTION)
    lua_log = tmp_path / "lua.ndjson"
    before = {p.name for p in tmp_path.iterdir()}
    result = run_cli("--config", str(conf), "--log", str(month), "--lua-log", str(lua_log))
    assert result.returncode == OK, result.stderr
    notes = [line for line in result.stderr.splitlines() if "note:" in line]
    assert [n.split("note: ")[1].split("()")[0] for n in notes] == [
        "addListener", "setWebserverPassword", "controlSocket", "setKey", "setNumLuaStates",
        "setNumWebProcesses", "setEventLog", "setEventLogRetention", "setCustomEndpoint"]
    assert "addListener() is ignored: a replay serves no REST API" in notes[0]
    failed = sum(1 for e in month_of_events() if not e.report.success)
    assert f"custom stats: failed {failed:,}" in result.stdout
    assert f"log lines: info {failed:,}" in result.stdout
    lines = [json.loads(line) for line in lua_log.read_text().splitlines()]
    assert len(lines) == failed and lines[0] == {
        "seq": 1, "time": START, "level": "info", "message": 'failed: login="user0" '}
    # no outbox, no event log of its own, nothing but what was asked for
    assert {p.name for p in tmp_path.iterdir()} - before == {"lua.ndjson"}


THRESHOLD = """addCustomWebHook("alerts", {url="http://192.0.2.1/alerts"})
setReport(function(lt)
  if lt.success then return end
  local n = countReports({login=lt.login, success=false, window="12h"})
  if n >= LIMIT then
    runCustomWebHook("alerts", jsonEncode({policy="fails", login=lt.login, n=n}))
  end
  if n >= 1 then runCustomWebHook("alerts", jsonEncode({policy="again", login=lt.login})) end
end)
"""


def test_compare_shows_exactly_what_a_changed_threshold_changes(tmp_path: Path) -> None:
    # failures grouped so that logins reach 1..6 failures within 12 h
    events = month_of_events(days=10, step=400.0)
    log = build_log(tmp_path / "log.db", events)
    new, base = tmp_path / "new.conf", tmp_path / "base.conf"
    new.write_text(THRESHOLD.replace("LIMIT", "3"))
    base.write_text(THRESHOLD.replace("LIMIT", "5"))
    compare = tmp_path / "compare.json"
    result = run_cli("--config", str(new), "--log", str(log), "--compare", str(base),
                     "--compare-json", str(compare))
    assert result.returncode == OK, result.stderr
    earlier = {}
    for e in events:
        if not e.report.success:
            earlier[e.seq] = sum(1 for p in events if p.seq < e.seq and p.report.login == e.report.login
                                 and not p.report.success and p.received >= e.received - 43200)
    added = [seq for seq, n in earlier.items() if n in (3, 4)]
    kept = [seq for seq, n in earlier.items() if n >= 5]
    again = [seq for seq, n in earlier.items() if n >= 1]
    assert added and kept
    diff = json.loads(compare.read_text())
    assert [a["seq"] for a in diff["added"]] == added and diff["removed"] == []
    assert all(list(a) == ALERT_KEYS and a["policy"] == "fails" for a in diff["added"])
    assert diff["unchanged"] == len(kept) + len(again)
    assert diff["per_policy"] == {
        "again": {"added": 0, "removed": 0, "unchanged": len(again)},
        "fails": {"added": len(added), "removed": 0, "unchanged": len(kept)}}
    assert f"compare: {len(added)} added, 0 removed, {len(kept) + len(again):,} unchanged" in result.stdout
    # the other way round, the same alerts are removed
    result = run_cli("--config", str(base), "--log", str(log), "--compare", str(new),
                     "--compare-json", str(compare))
    reverse = json.loads(compare.read_text())
    assert reverse["removed"] == diff["added"] and reverse["added"] == []


def test_the_log_file_is_never_written(tmp_path: Path, month: Path) -> None:
    log = tmp_path / "copy.db"
    log.write_bytes(month.read_bytes())
    digest = hashlib.sha256(log.read_bytes()).hexdigest()
    os.chmod(log, 0o444)
    status, alerts, summary = replay(tmp_path, PRODUCTION, log)
    assert status == OK and summary["events"] == len(month_of_events())
    assert hashlib.sha256(log.read_bytes()).hexdigest() == digest
    assert not os.path.exists(str(log) + "-journal")


def test_events_loaded_from_an_export_replay_as_the_original(tmp_path: Path, month: Path) -> None:
    """How an NDJSON export plugs in: its events are loaded into a temporary log, answered by
    the same SQL; the replay of the loaded copy is the replay of the original, byte for byte."""
    from test_replay_engine import SEEING

    source = LogSource(str(month))
    copy = tmp_path / "loaded.db"
    try:
        assert load_events((e for batch in source.batches(Selection()) for e in batch), str(copy)) \
            == source.snapshot
    finally:
        source.close()
    runs = []
    for log in (month, copy):
        status, alerts, summary = replay(tmp_path, SEEING, log, "--to", str(START + 30 * DAY))
        del summary["run_seconds"], summary["events_per_second"]
        runs.append((status, alerts, summary))
    assert runs[0] == runs[1] and runs[0][0] == OK and len(runs[0][1]) > 1000


def test_the_same_alert_twice_for_one_event_is_recorded_once_as_the_outbox_stores_it(
        tmp_path: Path, month: Path) -> None:
    config = """addCustomWebHook("a", {url="http://192.0.2.1/never"})
setReport(function(lt)
  runCustomWebHook("a", lt.login)
  runCustomWebHook("a", lt.login)
  runCustomWebHook("a", lt.login .. "!")
end)
"""
    status, alerts, summary = replay(tmp_path, config, month)
    events = month_of_events()
    assert status == OK and summary["alerts"] == 2 * len(events)
    assert [a["body"] for a in alerts[:4]] == ["user0", "user0!", "user1", "user1!"]


def test_a_progress_bar_on_a_terminal_only(tmp_path: Path, month: Path) -> None:
    import pexpect

    conf = tmp_path / "p.conf"
    conf.write_text("setReport(function(lt) end)\n")
    child = pexpect.spawn(sys.executable, ["-m", "trackalert.replay.cli", "--config", str(conf),
                                           "--log", str(month)], timeout=120, encoding="utf-8",
                          dimensions=(24, 120))
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == OK
    assert "100%" in child.before and "1.17k/1.17k" in child.before and "events/s" in child.before
    piped = run_cli("--config", str(conf), "--log", str(month))
    assert piped.returncode == OK and piped.stderr == ""
    assert "p.conf: 1,167 events" in piped.stdout and "%|" not in piped.stdout + piped.stderr


def test_a_replay_stopped_by_an_error_runs_no_background_function_after_it(
        tmp_path: Path, month: Path) -> None:
    config = """addCustomWebHook("a", {url="http://192.0.2.1/never"})
setReport(function(lt) if lt.login == "user4" and lt.t > 1767600000 then error("late") end end)
setBackground("b", function() runCustomWebHook("a", jsonEncode({policy="b"})) end)
intervalScheduleBackgroundFunc("01:00:00", "b")
"""
    status, alerts, summary = replay(tmp_path, config, month, "--to", str(START + 30 * DAY))
    [late] = [e for e in month_of_events() if e.report.login == "user4" and e.report.t > 1767600000][:1]
    assert status == POLICY_ERROR and summary["events"] == late.seq
    assert alerts and all(a["time"] <= late.received for a in alerts)
    assert len(alerts) == int((late.received - START) // 3600)


def history(*args: str) -> None:
    """`trackalert export|import ...`, which must succeed."""
    result = subprocess.run([sys.executable, "-m", "trackalert", *args], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_an_export_and_its_reimport_replay_as_the_original_log(tmp_path: Path, month: Path) -> None:
    from test_replay_engine import SEEING

    export, reimported = tmp_path / "export.ndjson", tmp_path / "reimported.db"
    history("export", "--log", str(month), "--out", str(export))
    history("import", "--log", str(reimported), str(export))
    runs = []
    for log in (month, export, reimported):
        status, alerts, summary = replay(tmp_path, SEEING, log, "--to", str(START + 30 * DAY))
        del summary["run_seconds"], summary["events_per_second"]
        runs.append((status, alerts, summary))
    assert runs[0][0] == OK and len(runs[0][1]) > 1000
    assert runs[1] == runs[0], "the export replays differently from its log"
    assert runs[2] == runs[0], "export -> import replays differently from the original log"
    assert [p.name for p in tmp_path.glob("trackalert-replay-*")] == []


def test_an_export_is_recognised_after_any_number_of_blank_lines(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "conf" / "policies" / "tests"
    padded = tmp_path / "padded.ndjson"
    padded.write_text("\n" * 40 + (example / "history.ndjson").read_text())
    outs = []
    for source in (example / "history.ndjson", padded):
        out = tmp_path / "alerts.ndjson"
        result = run_cli("--config", str(example / "starter.conf"), "--log", str(source), "--out", str(out))
        assert result.returncode == OK, result.stderr
        outs.append(out.read_text())
    assert outs[0] == outs[1] and len(outs[0].splitlines()) == 2


def test_plain_wforce_lines_say_to_import_them_first(tmp_path: Path) -> None:
    plain = tmp_path / "wforce.ndjson"
    plain.write_text(json.dumps({"login": "alice", "remote": "192.0.2.1", "pwhash": "ab",
                                 "success": True, "t": START, "protocol": "imap"}) + "\n")
    conf = tmp_path / "p.conf"
    conf.write_text("setReport(function(lt) end)\n")
    result = run_cli("--config", str(conf), "--log", str(plain))
    assert result.returncode == BAD_INPUT, result.stderr
    assert result.stderr == (f"trackalert-replay: {plain}:1: a wforce report, not an export line "
                             "(import it into a log first)\n")


def loading(scratch: Path) -> bool:
    """Whether a temporary log's WAL in `scratch` holds more than 256 KiB (a file may vanish)."""
    for wal in scratch.glob("trackalert-replay-*-wal"):
        try:
            if wal.stat().st_size > 256 * 1024:
                return True
        except FileNotFoundError:
            continue
    return False


def test_an_export_interrupted_while_it_loads_leaves_no_temporary_log(tmp_path: Path) -> None:
    import signal
    import time

    line = json.loads(Path(__file__).resolve().parent.parent.joinpath(
        "conf", "policies", "tests", "history.ndjson").read_text().splitlines()[0])
    export = tmp_path / "big.ndjson"
    with export.open("w") as out:
        for seq in range(1, 200_001):
            line["seq"], line["received"] = seq, START + seq
            out.write(json.dumps(line, separators=(",", ":")) + "\n")
    conf = tmp_path / "p.conf"
    conf.write_text("setReport(function(lt) end)\n")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    child = subprocess.Popen([sys.executable, "-m", "trackalert.replay.cli", "--config", str(conf),
                              "--log", str(export), "-q"], env={**os.environ, "TMPDIR": str(scratch)},
                             stderr=subprocess.PIPE, text=True)
    try:
        # the events are being loaded once the temporary log's WAL grows (not while the file is
        # created: an interrupt in those few ms lands in asyncio.run's own SIGINT handling)
        for _ in range(3000):
            if loading(scratch) or child.poll() is not None:
                break
            time.sleep(0.01)
        assert child.poll() is None, "the load ended before it could be interrupted"
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, stderr
    assert "trackalert-replay: interrupted" in stderr
    assert list(scratch.iterdir()) == []
