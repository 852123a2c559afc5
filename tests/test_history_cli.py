"""`trackalert export` and `trackalert import` on real subprocesses: options, what they print,
exit statuses (docs/history.md), and the config's log and GeoIP enrichment."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
GEOIP = DATA / "geoip"
T0 = 1_795_255_564.0


def run(*args: str, stdin: str | None = None, cwd: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trackalert", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd, input=stdin,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


def report_line(i: int, t: float, **fields) -> str:
    return json.dumps({"t": t, "login": f"user{i}", "remote": "192.0.2.1", **fields})


def imported(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT seq, received, login, country, city, asn FROM events "
                          "ORDER BY seq").fetchall()


def test_help_lists_the_subcommands_and_each_has_its_own() -> None:
    top = run("--help")
    assert top.returncode == 0
    assert "export" in top.stdout and "import" in top.stdout and "--daemon" in top.stdout
    sub = run("import", "--help")
    assert sub.returncode == 0 and "--skip-bad" in sub.stdout and "--sort" in sub.stdout


def test_import_from_stdin_then_export_to_stdout_with_filters(tmp_path: Path) -> None:
    log = tmp_path / "log.db"
    lines = [report_line(i, T0 + 3600 * i) for i in range(5)]
    result = run("import", "--log", str(log), "-", stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("-: 5 event(s) imported (seq 1-5), 0 duplicate deliveries skipped, "
                             "0 bad line(s) skipped, 0 renumbered; already in received order\n")
    # ISO date/time (UTC unless it says otherwise) and epoch both work; --to is exclusive
    exported = run("export", "--log", str(log), "--from", "2026-11-21T11:06:04",
                   "--to", str(T0 + 4 * 3600), "--login", "user1", "--login", "user3")
    assert exported.returncode == 0, exported.stderr
    assert [json.loads(line)["report"]["login"] for line in exported.stdout.splitlines()] == [
        "user1", "user3"]
    assert "2 event(s)" in exported.stderr


def test_export_of_a_missing_file_or_of_a_file_that_is_not_a_log(tmp_path: Path) -> None:
    missing = run("export", "--log", str(tmp_path / "nope.db"))
    assert missing.returncode == 1 and "cannot open the event log" in missing.stderr
    assert not (tmp_path / "nope.db").exists(), "export opens read-only: it creates nothing"
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    result = run("export", "--log", str(other), "--out", str(tmp_path / "out.ndjson"))
    assert result.returncode == 1 and "is not a trackalert event log" in result.stderr
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite at all" * 100)
    result = run("export", "--log", str(garbage))
    assert result.returncode == 1 and "is not a trackalert event log" in result.stderr


def test_wforce_reports_are_enriched_with_the_configs_geoip_into_the_configs_log(
        tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    config = tmp_path / "conf" / "trackalert.conf"
    config.write_text(f"""
setEventLog("sqlite:///history.db")
newGeoIP2DB("City", "{GEOIP / 'GeoIP2-City-Test.mmdb'}")
newGeoIP2DB("ASN", "{GEOIP / 'GeoLite2-ASN-Test.mmdb'}")
setEnrichment({{city="City", asn="ASN"}})
""")
    captures = json.loads((DATA / "wforce-webhook-captures.json").read_text())
    bodies = [c["body"] for c in captures if '"t":' in c["body"]]
    london = {"t": float(json.loads(bodies[-1])["t"]) + 1, "login": "eve",
              "remote": "81.2.69.142", "type": "wforce_report"}
    hit = json.dumps({"_index": "logstash-2026.11.21", "_id": "x", "_source": london})
    (tmp_path / "in.ndjson").write_text("\n".join(bodies + [hit]) + "\n")
    result = run("import", "-C", str(config), str(tmp_path / "in.ndjson"))
    assert result.returncode == 0, result.stderr
    rows = imported(tmp_path / "conf" / "history.db")  # the config's relative setEventLog
    assert len(rows) == len(bodies) + 1
    assert [row[1] for row in rows[:-1]] == [json.loads(b)["t"] for b in bodies]
    assert rows[-1][1:] == (london["t"], "eve", "GB", "London", None)


def test_a_bad_line_exits_2_naming_it_and_skip_bad_counts_it(tmp_path: Path) -> None:
    log = tmp_path / "log.db"
    path = tmp_path / "in.ndjson"
    path.write_text("\n".join([report_line(0, T0), report_line(1, T0 + 1, success="yes"),
                               report_line(2, T0 + 2)]) + "\n")
    refused = run("import", "--log", str(log), str(path))
    assert refused.returncode == 2
    assert f"{path}:2: field 'success' must be a boolean, got a string" in refused.stderr
    assert f"nothing of {path} was imported" in refused.stderr
    assert imported(log) == []
    skipped = run("import", "--log", str(log), "--skip-bad", str(path))
    assert skipped.returncode == 0, skipped.stderr
    assert "2 event(s) imported (seq 1-2)" in skipped.stdout
    assert "1 bad line(s) skipped" in skipped.stdout
    assert f"{path}:2:" in skipped.stderr


def test_order_is_refused_or_sorted_and_later_files_are_not_half_imported(tmp_path: Path) -> None:
    log = tmp_path / "log.db"
    first, unsorted = tmp_path / "first.ndjson", tmp_path / "unsorted.ndjson"
    first.write_text(report_line(0, T0) + "\n")
    unsorted.write_text("\n".join([report_line(1, T0 + 9), report_line(2, T0 + 5)]) + "\n")
    refused = run("import", "--log", str(log), str(first), str(unsorted))
    assert refused.returncode == 2
    assert "1 event(s) imported" in refused.stdout  # the first file, whole
    assert "(lines 2)" in refused.stderr and "use --sort" in refused.stderr
    assert [row[2] for row in imported(log)] == ["user0"]
    sorted_ = run("import", "--log", str(log), "--sort", str(unsorted))
    assert sorted_.returncode == 0, sorted_.stderr
    assert "sorted by received (1 line(s) were out of order)" in sorted_.stdout
    assert [row[2] for row in imported(log)] == ["user0", "user2", "user1"]
    later = run("import", "--log", str(log), str(first))
    assert later.returncode == 2 and "received would step back" in later.stderr


def test_an_import_killed_half_way_leaves_the_log_as_it_was(tmp_path: Path) -> None:
    """kill -9 while the import's transaction is open (its journal on disk, the helper indexes
    dropped): the next open rolls it back, leaving the log empty, whole and indexed; the same
    import then goes through."""
    log = tmp_path / "log.db"
    first = tmp_path / "first.ndjson"
    first.write_text(report_line(0, T0) + "\n")
    assert run("import", "--log", str(log), str(first)).returncode == 0
    indexes = index_names(log)
    path = tmp_path / "big.ndjson"
    path.write_text("".join(report_line(i, T0 + 1 + i / 1000, device_id="x" * 200) + "\n"
                            for i in range(300_000)))
    journal = Path(str(log) + "-journal")
    process = subprocess.Popen([sys.executable, "-m", "trackalert", "import", "--log", str(log),
                                str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(3000):  # bounded: until the transaction has written its journal
            if journal.exists() or process.poll() is not None:
                break
            time.sleep(0.01)
        assert journal.exists() and process.poll() is None, "the import ended before the kill"
        process.kill()
    finally:
        process.wait(timeout=60)
        process.stdout.close()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    early = tmp_path / "early.ndjson"
    early.write_text(report_line(9, T0 - 5) + "\n")
    again = run("import", "--log", str(log), str(early))  # opens the log as the daemon does
    assert again.returncode == 2 and "received would step back" in again.stderr
    assert [row[2] for row in imported(log)] == ["user0"]
    assert index_names(log) == indexes and not journal.exists()
    done = run("import", "--log", str(log), str(path))
    assert done.returncode == 0, done.stderr
    assert "300000 event(s) imported (seq 2-300001)" in done.stdout
    with contextlib.closing(sqlite3.connect(log)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def index_names(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [row[0] for row in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' ORDER BY name")]
