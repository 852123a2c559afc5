"""The policy-testing harness: `trackalert-replay --expect` and trackalert.testing's helpers pass
on the expected alerts and fail with a readable diff otherwise; the worked example shipped in
conf/policies/tests/ runs here so that it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_replay_engine import month_of_events
from trackalert.replay.cli import BAD_INPUT, OK, POLICY_ERROR, UNEXPECTED
from trackalert.testing import ReplayFailed, assert_alerts, replay_alerts

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "conf" / "policies" / "tests"
CONFIG, HISTORY, EXPECTED = EXAMPLE / "starter.conf", EXAMPLE / "history.ndjson", EXAMPLE / "expected.ndjson"

FAILS = """addCustomWebHook("alerts", {url="http://192.0.2.1/never"})
setReport(function(lt)
  if not lt.success then runCustomWebHook("alerts", jsonEncode({policy="fail", login=lt.login})) end
end)
"""


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trackalert.replay.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_the_shipped_example_passes_as_an_operator_runs_it() -> None:
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE)],
                            capture_output=True, text=True, timeout=300, cwd=EXAMPLE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout


def test_expect_passes_on_the_expected_alerts_and_fails_with_the_diff_otherwise(tmp_path: Path) -> None:
    result = run_cli("--config", str(CONFIG), "--log", str(HISTORY), "--expect", str(EXPECTED))
    assert result.returncode == OK, result.stderr
    assert "expect: 2 expected alerts, all matched, none unexpected" in result.stdout
    wrong = tmp_path / "wrong.ndjson"
    lines = EXPECTED.read_text().splitlines()
    spray = next(n for n, line in enumerate(lines, 1) if '"password_spray"' in line)
    wrong.write_text("\n".join(line.replace('"distinct_logins": 20', '"distinct_logins": 19')
                               for line in lines) + "\n" + '{"seq": 30, "policy": "account_attack"}\n')
    result = run_cli("--config", str(CONFIG), "--log", str(HISTORY), "--expect", str(wrong), "-q")
    assert result.returncode == UNEXPECTED == 3
    assert result.stderr.splitlines() == [
        "trackalert-replay: the alerts are not the expected ones",
        "3 expected alerts, 2 actual: 1 missing, 0 unexpected, 1 different",
        f'missing:    {wrong}:{len(lines) + 1}  {{"seq":30,"policy":"account_attack"}}',
        f"different:  {wrong}:{spray}  seq 42 hook alerts",
        "    body.evidence.distinct_logins: expected 19, got 20"]


def test_a_bad_expected_file_is_bad_input_before_the_replay(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ndjson"
    bad.write_text('{"seq": 21}\n{"sequence": 3}\n')
    result = run_cli("--config", str(CONFIG), "--log", str(HISTORY), "--expect", str(bad))
    assert result.returncode == BAD_INPUT
    assert f"trackalert-replay: {bad}:2: unknown field 'sequence'" in result.stderr
    assert "starter.conf:" not in result.stdout  # no summary: the replay never ran


def test_a_policy_error_is_reported_as_such_not_as_a_mismatch(tmp_path: Path) -> None:
    conf = tmp_path / "broken.conf"
    conf.write_text(FAILS.replace("jsonEncode", "jsonEncodeTypo"))
    result = run_cli("--config", str(conf), "--log", str(HISTORY), "--expect", str(EXPECTED))
    assert result.returncode == POLICY_ERROR, result.stderr
    assert "broken.conf:3:" in result.stderr and "not the expected ones" not in result.stderr


def test_the_helpers_take_events_and_raise_the_diff(tmp_path: Path) -> None:
    conf = tmp_path / "fails.conf"
    conf.write_text(FAILS)
    events = month_of_events(days=1)
    failed = [e for e in events if not e.report.success]
    alerts = replay_alerts(conf, events)
    assert [(a["seq"], a["login"], a["body"]) for a in alerts] == [
        (e.seq, e.report.login, {"policy": "fail", "login": e.report.login}) for e in failed]
    assert assert_alerts(conf, events, [{"seq": e.seq, "policy": "fail"} for e in failed]) == alerts
    with pytest.raises(AssertionError) as raised:
        assert_alerts(conf, events, [{"seq": e.seq, "login": "nobody"} for e in failed[:1]])
    text = str(raised.value)
    assert text.splitlines()[0] == (f"1 expected alerts, {len(failed)} actual: 0 missing, "
                                    f"{len(failed) - 1} unexpected, 1 different")
    assert f'    login: expected "nobody", got "{failed[0].report.login}"' in text
    assert not isinstance(raised.value, ReplayFailed)


def test_a_replay_that_cannot_run_raises_replay_failed_with_its_message(tmp_path: Path) -> None:
    conf = tmp_path / "broken.conf"
    conf.write_text("setReport(function(lt)\n  if then end\nend)\n")
    with pytest.raises(ReplayFailed, match=r"exited with 1:\n.*broken.conf:2:"):
        replay_alerts(conf, HISTORY)
    with pytest.raises(ReplayFailed, match=r"exited with 2:\n.*missing.db: no such file"):
        replay_alerts(CONFIG, tmp_path / "missing.db")


def test_the_example_history_is_an_export_that_imports_and_exports_unchanged(tmp_path: Path) -> None:
    log, again = tmp_path / "events.db", tmp_path / "again.ndjson"
    for command in (["import", "--log", str(log), str(HISTORY)],
                    ["export", "--log", str(log), "--out", str(again)]):
        result = subprocess.run([sys.executable, "-m", "trackalert", *command], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    assert again.read_bytes() == HISTORY.read_bytes()
    assert json.loads(HISTORY.read_text().splitlines()[20])["report"]["login"] == "alice"
