"""The SQLite event log: the shared contract plus what only SQLite has (files, migrations, crashes).

Everything runs against real SQLite files in tmp_path; the crash test kills a real child process.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import AsyncIterator

import pytest
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from eventlog_contract import EventLogContract, MakeLog, eventually, full_report, report
from trackalert import migrations
from trackalert.clock import Clock, VirtualClock
from trackalert.eventlog import (
    Appended,
    EventLogClosed,
    SchemaVersionError,
    SUPPORTED_SCHEMES,
    open_event_log,
)
from trackalert.eventlog.sqlite import SQLiteEventLog, encode_row

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
async def sqlite_logs(tmp_path: Path) -> AsyncIterator[tuple[Path, list[SQLiteEventLog]]]:
    opened: list[SQLiteEventLog] = []
    yield tmp_path / "events.db", opened
    for log in opened:
        await log.close()


class TestSQLiteContract(EventLogContract):
    @pytest.fixture
    def make_log(self, sqlite_logs: tuple[Path, list[SQLiteEventLog]]) -> MakeLog:
        path, opened = sqlite_logs

        async def make(clock: Clock | None = None) -> SQLiteEventLog:
            log = SQLiteEventLog(path, clock or VirtualClock())
            opened.append(log)
            await log.open()
            return log

        return make


def raw(path: Path) -> sqlite3.Connection:
    """A plain connection for looking at the file behind the log's back."""
    return sqlite3.connect(path, isolation_level=None)


# --------------------------------------------------------------------------- URLs


def test_open_event_log_parses_sqlite_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_event_log("sqlite:///data/events.db", VirtualClock())
    assert relative.backend == "sqlite"
    assert relative.location == str(tmp_path / "data" / "events.db")
    absolute = open_event_log("sqlite:////var/lib/trackalert/events.db", VirtualClock())
    assert absolute.location == "/var/lib/trackalert/events.db"


@pytest.mark.parametrize(
    "url", ["postgres://localhost/x", "events.db", "", "sqlite://", "sqlite:///:memory:"]
)
def test_open_event_log_rejects_unusable_urls(url: str) -> None:
    with pytest.raises(ValueError) as error:
        open_event_log(url, VirtualClock())
    assert "sqlite" in str(error.value)


def test_unknown_scheme_error_lists_supported_schemes() -> None:
    assert "sqlite" in SUPPORTED_SCHEMES
    with pytest.raises(ValueError, match=r"supported schemes are sqlite://"):
        open_event_log("elastic://localhost:9200", VirtualClock())


async def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    log = SQLiteEventLog(tmp_path / "nope" / "events.db", VirtualClock())
    with pytest.raises(Exception, match="is not a directory"):
        await log.open()
    await log.close()


# --------------------------------------------------------------------------- schema and migrations


async def test_fresh_file_is_migrated_to_head(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    log = SQLiteEventLog(path, VirtualClock())
    await log.open()
    await log.close()
    with raw(path) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (migrations.head_revision(),)
        ]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"events", "cursors", "deliveries", "alembic_version"} <= tables
        # every index costs ingest: only the three the long-term helpers need (0004)
        assert {r[1] for r in conn.execute("PRAGMA index_list(events)")} == {
            "ix_events_login", "ix_events_ip", "ix_events_pwhash_failed"}
        deliveries_sql = conn.execute(
            "SELECT sql FROM sqlite_master WHERE name='deliveries'"
        ).fetchone()[0]
        assert "WITHOUT ROWID" in deliveries_sql
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_migration_scripts_are_found_from_the_package_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert migrations.SCRIPT_LOCATION == REPO / "trackalert" / "migrations"
    assert migrations.head_revision() == "0004"


async def test_reopen_keeps_data_and_schema(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    log = SQLiteEventLog(path, VirtualClock())
    await log.open()
    await log.append(full_report(), delivery_id="d")
    await log.close()
    log = SQLiteEventLog(path, VirtualClock())
    await log.open()
    try:
        [stored] = await log.read(0, 10)
        assert stored.report == full_report()
    finally:
        await log.close()


def _make_revision_0001_file(path: Path) -> None:
    """A file as the first release would have left it: schema 0001 and a few events."""
    engine = create_engine(f"sqlite:///{path}", poolclass=NullPool)
    with engine.begin() as connection:
        migrations.upgrade(connection, "0001")
    engine.dispose()
    rows = [
        (1, 1_700_000_000.0) + encode_row(report(1), "retry-me")[:16],
        (2, 1_700_000_001.0) + encode_row(full_report(), None)[:16],
        (3, 1_700_000_002.0) + encode_row(report(3), "other")[:16],
    ]
    with raw(path) as conn:
        conn.executemany(f"INSERT INTO events VALUES ({','.join('?' * 18)})", rows)
        conn.execute("INSERT INTO cursors VALUES ('policy', 2)")
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("0001",)


async def test_old_file_is_upgraded_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _make_revision_0001_file(path)
    log = SQLiteEventLog(path, VirtualClock(start=1_700_000_010.0))
    await log.open()
    try:
        stored = await log.read(0, 10)
        assert [e.seq for e in stored] == [1, 2, 3]
        assert stored[1].report == full_report()
        assert await log.load_cursor("policy") == 2
        # 0002 back-fills the delivery index, so a retry of an old delivery is still recognised
        assert await log.append(report(9), delivery_id="retry-me") == Appended(1, True)
        assert await log.append(report(4), delivery_id="new") == Appended(4, False)
    finally:
        await log.close()
    with raw(path) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("0004",)


async def test_file_from_a_newer_trackalert_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    log = SQLiteEventLog(path, VirtualClock())
    await log.open()
    await log.append(report(1))
    await log.close()
    with raw(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0099_from_the_future'")
    log = SQLiteEventLog(path, VirtualClock())
    with pytest.raises(SchemaVersionError, match="0099_from_the_future.*newer trackalert"):
        await log.open()
    await log.close()
    with raw(path) as conn:  # left untouched
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (1,)
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == (
            "0099_from_the_future",
        )


# --------------------------------------------------------------------------- cursors on disk


async def test_cursor_piggybacks_on_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    log = SQLiteEventLog(path, VirtualClock())
    await log.open()
    try:
        log.save_cursor("policy", 0)
        await log.append(report(1))
        log.save_cursor("policy", 1)
        with raw(path) as conn:
            assert conn.execute("SELECT seq FROM cursors WHERE name='policy'").fetchone() == (0,)
        await log.append(report(2))  # its commit carries the cursor
        with raw(path) as conn:
            assert conn.execute("SELECT seq FROM cursors WHERE name='policy'").fetchone() == (1,)
    finally:
        await log.close()


async def test_cursor_is_flushed_by_the_clock_when_nothing_is_appended(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    clock = VirtualClock()
    log = SQLiteEventLog(path, clock, cursor_flush_delay=1.0)
    await log.open()
    try:
        log.save_cursor("policy", 42)

        def stored() -> tuple | None:
            with raw(path) as conn:
                return conn.execute("SELECT seq FROM cursors WHERE name='policy'").fetchone()

        assert stored() is None
        await clock.advance(0.5)
        assert stored() is None
        await clock.advance(0.5)
        await eventually(lambda: stored() == (42,), "the idle cursor flush")
        log.save_cursor("policy", 43)  # a new save after a flush starts a new timer
        await clock.advance(1.0)
        await eventually(lambda: stored() == (43,), "the second idle cursor flush")
    finally:
        await log.close()


# --------------------------------------------------------------------------- failures


async def test_unstorable_report_fails_alone(tmp_path: Path) -> None:
    log = SQLiteEventLog(tmp_path / "events.db", VirtualClock())
    await log.open()
    try:
        results = await asyncio.gather(
            log.append(report(1)),
            log.append(report(2, t=float("nan"))),
            log.append(report(3)),
            return_exceptions=True,
        )
        assert isinstance(results[1], ValueError)
        assert [r.seq for r in (results[0], results[2])] == [1, 2]
    finally:
        await log.close()


async def test_failed_commit_fails_its_whole_batch_and_the_writer_recovers(
    tmp_path: Path,
) -> None:
    """Another process writing seq 2 behind our back makes the next commit fail (PK conflict).

    Nothing of the failed batch may be half-acknowledged; the writer re-reads the log's end and
    carries on after the foreign row.
    """
    path = tmp_path / "events.db"
    log = SQLiteEventLog(path, VirtualClock())
    await log.open()
    try:
        await log.append(report(1))
        with raw(path) as conn:
            conn.execute(
                f"INSERT INTO events VALUES ({','.join('?' * 25)})",
                (2, 1_700_000_000.0) + encode_row(report(2, login="intruder"), None),
            )
        results = await asyncio.gather(
            *(log.append(report(i), delivery_id=f"d{i}") for i in range(10, 60)),
            return_exceptions=True,
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        succeeded = [r for r in results if isinstance(r, Appended)]
        assert failed and all(isinstance(r, sqlite3.IntegrityError) for r in failed)
        assert len(failed) + len(succeeded) == 50
        stored = await log.read(0, 1000)
        assert [e.seq for e in stored] == [1, 2] + sorted(a.seq for a in succeeded)
        assert min(a.seq for a in succeeded) == 3 if succeeded else True
        assert log.stats.pending == 0
        # a failed delivery id was not remembered: its retry is stored
        retry = [i for i, r in zip(range(10, 60), results) if isinstance(r, BaseException)][0]
        assert not (await log.append(report(retry), delivery_id=f"d{retry}")).duplicate
    finally:
        await log.close()


# --------------------------------------------------------------------------- SQLite specifics


async def test_pruned_delivery_ids_can_be_stored_again(tmp_path: Path) -> None:
    clock = VirtualClock()
    path = tmp_path / "events.db"
    log = SQLiteEventLog(path, clock)
    await log.open()
    try:
        for i in range(20):
            await log.append(report(i), delivery_id=f"old-{i:02d}")
        await clock.advance(1000)
        await log.append(report(100), delivery_id="recent")
        assert await log.prune_deliveries(clock.time() - 500, chunk=6) == 20
        with raw(path) as conn:
            assert conn.execute("SELECT delivery_id FROM deliveries").fetchall() == [("recent",)]
        assert await log.append(report(0), delivery_id="old-00") == Appended(22, False)
        assert await log.append(report(0), delivery_id="recent") == Appended(21, True)
    finally:
        await log.close()


async def test_prune_runs_in_chunks_between_appends(tmp_path: Path) -> None:
    clock = VirtualClock()
    log = SQLiteEventLog(tmp_path / "events.db", clock)
    await log.open()
    try:
        for _ in range(5):
            await asyncio.gather(*(log.append(report(i)) for i in range(1000)))
        await clock.advance(10)
        commits_before = log.stats.commits_total
        pruning = asyncio.create_task(log.prune(clock.time(), chunk=500))
        appends = await asyncio.gather(*(log.append(report(i)) for i in range(200)))
        assert await pruning == 5000
        assert log.stats.commits_total - commits_before >= 10  # one transaction per chunk
        assert [e.seq for e in await log.read(0, 1000)] == sorted(a.seq for a in appends)
    finally:
        await log.close()


async def test_close_during_prune_does_not_hang(tmp_path: Path) -> None:
    clock = VirtualClock()
    log = SQLiteEventLog(tmp_path / "events.db", clock)
    await log.open()
    await asyncio.gather(*(log.append(report(i)) for i in range(2000)))
    await clock.advance(10)
    pruning = asyncio.create_task(log.prune(clock.time(), chunk=10))
    for _ in range(3):
        await asyncio.sleep(0)
    await log.close()
    [outcome] = await asyncio.gather(pruning, return_exceptions=True)
    assert isinstance(outcome, (int, EventLogClosed)), outcome
    log = SQLiteEventLog(tmp_path / "events.db", clock)
    await log.open()
    try:
        remaining = await log.read(0, 5000)
        assert [e.seq for e in remaining] == list(range(2001 - len(remaining), 2001))
    finally:
        await log.close()


async def test_describe_reports_file_size(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    log = SQLiteEventLog(path, VirtualClock())
    await log.open()
    try:
        await asyncio.gather(*(log.append(full_report()) for _ in range(100)))
        description = await log.describe()
        on_disk = sum(
            os.path.getsize(f"{path}{s}") for s in ("", "-wal") if os.path.exists(f"{path}{s}")
        )
        assert description["size_bytes"] == on_disk
        assert description["location"] == str(path)
    finally:
        await log.close()


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from trackalert.clock import RealClock
    from trackalert.eventlog import open_event_log
    from trackalert.report import Report

    async def main(path):
        log = open_event_log("sqlite:///" + path, RealClock())
        await log.open()
        out = sys.stdout

        async def one(i):
            appended = await log.append(Report(login=f"user{i}", t=float(i)), f"d{i}")
            out.write(f"{appended.seq} {i}\\n")
            out.flush()

        for start in range(0, 10_000_000, 64):
            await asyncio.gather(*(one(start + k) for k in range(64)))

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_acknowledged_appends_survive_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    child = subprocess.Popen(
        [sys.executable, str(script), str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    acknowledged: dict[int, int] = {}
    buffer = b""
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(child.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + 60
            while len(acknowledged) < 3000 and time.monotonic() < deadline:
                if not selector.select(timeout=1):
                    continue
                chunk = os.read(child.stdout.fileno(), 65536)
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    seq, i = map(int, line.split())
                    acknowledged[seq] = i
    finally:
        child.send_signal(signal.SIGKILL)
        rest, errors = child.communicate(timeout=30)
    # whatever the child printed before it died was acknowledged too
    for line in (buffer + rest).split(b"\n")[:-1]:
        seq, i = map(int, line.split())
        acknowledged[seq] = i
    assert child.returncode == -signal.SIGKILL
    assert len(acknowledged) >= 3000, errors.decode()

    log = SQLiteEventLog(path, VirtualClock())
    await log.open()
    try:
        stored = {e.seq: e for e in await log.read(0, 10_000_000)}
        missing = sorted(set(acknowledged) - set(stored))
        assert not missing, f"{len(missing)} acknowledged events lost, e.g. {missing[:5]}"
        for seq, i in acknowledged.items():
            assert stored[seq].report.login == f"user{i}"
            assert stored[seq].delivery_id == f"d{i}"
        assert list(stored) == list(range(1, len(stored) + 1))  # no holes either
        # and the log carries on after the crash
        assert (await log.append(report(0))).seq == len(stored) + 1
    finally:
        await log.close()
