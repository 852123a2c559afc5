"""The SQLite event log: the shared contract plus what only SQLite has (files, migrations, crashes).

Everything runs against real SQLite files in tmp_path; the crash test kills a real child process.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
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
from trackalert.eventlog.base import delivery_key
from trackalert.eventlog.sqlite import SQLiteEventLog, encode_row
from trackalert.report import ReportError

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
        # every index costs ingest: only the three the long-term helpers need (0004) and the
        # append-order one on received (0006)
        assert {r[1] for r in conn.execute("PRAGMA index_list(events)")} == {
            "ix_events_login", "ix_events_ip", "ix_events_pwhash_failed", "ix_events_received"}
        deliveries_sql = conn.execute(
            "SELECT sql FROM sqlite_master WHERE name='deliveries'"
        ).fetchone()[0]
        assert "WITHOUT ROWID" in deliveries_sql
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_migration_scripts_are_found_from_the_package_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert migrations.SCRIPT_LOCATION == REPO / "migrations"
    assert migrations.head_revision() == "0008"


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


async def test_old_file_is_upgraded_and_keeps_its_data(tmp_path: Path, caplog) -> None:
    path = tmp_path / "old.db"
    _make_revision_0001_file(path)
    log = SQLiteEventLog(path, VirtualClock(start=1_700_000_010.0))
    with caplog.at_level("INFO", logger="trackalert"):
        await log.open()
    head = migrations.head_revision()
    assert f"upgrading its schema from revision 0001 to {head}" in caplog.text  # before, and
    assert re.search(r"schema upgraded in \d+\.\d s", caplog.text)             # how long it took
    try:
        stored = await log.read(0, 10)
        assert [e.seq for e in stored] == [1, 2, 3]
        assert stored[1].report == full_report()
        assert await log.load_cursor("policy") == 2
        assert await log.append(report(4), delivery_id="new") == Appended(4, False)
        assert await log.append(report(4), delivery_id="new") == Appended(4, True)
    finally:
        await log.close()
    with raw(path) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == (migrations.head_revision(),)


async def test_0005_keys_old_delivery_ids_with_an_unknown_body(tmp_path: Path) -> None:
    """Before 0005 an id alone made a retry. The bodies of those deliveries are unknown, so a
    report arriving under an old id is stored (a collision), never taken for a retry."""
    path = tmp_path / "v4.db"
    engine = create_engine(f"sqlite:///{path}", poolclass=NullPool)
    with engine.begin() as connection:
        migrations.upgrade(connection, "0004")
    engine.dispose()
    with raw(path) as conn:
        conn.execute(
            f"INSERT INTO events VALUES ({','.join('?' * 25)})",
            (1, 1_700_000_000.0) + encode_row(report(1), "same-microsecond"),
        )
        conn.execute("INSERT INTO deliveries VALUES ('same-microsecond', 1, 1700000000.0)")
    log = SQLiteEventLog(path, VirtualClock(start=1_700_000_010.0))
    await log.open()
    try:
        assert await log.append(report(2), delivery_id="same-microsecond") == Appended(2, False)
        assert await log.append(report(2), delivery_id="same-microsecond") == Appended(2, True)
        assert log.stats.delivery_id_collisions_total == 1
    finally:
        await log.close()
    with raw(path) as conn:
        assert conn.execute(
            "SELECT delivery_id, length(fingerprint), seq FROM deliveries ORDER BY seq"
        ).fetchall() == [("same-microsecond", 0, 1), ("same-microsecond", 16, 2)]
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == (migrations.head_revision(),)


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


async def test_a_foreign_row_fails_a_commit_and_the_batch_is_retried(tmp_path: Path) -> None:
    """Another process writing seq 2 behind our back makes the next commit fail (PK conflict).

    The writer re-reads the log's end and retries the batch in halves: nothing is lost, and the
    new events continue after the foreign row.
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
            *(log.append(report(i), delivery_id=f"d{i}") for i in range(10, 60))
        )
        assert sorted(a.seq for a in results) == list(range(3, 53))
        stored = await log.read(0, 1000)
        assert [e.seq for e in stored] == list(range(1, 53))
        assert log.stats.pending == 0 and log.failure is None
    finally:
        await log.close()


POISON_TRIGGER = """
CREATE TRIGGER poison BEFORE INSERT ON events WHEN NEW.login LIKE 'poison%'
BEGIN SELECT RAISE(ABORT, 'poisoned row'); END
"""


async def test_a_row_failing_at_insert_fails_alone(tmp_path: Path) -> None:
    """Rows that pass encode_row but that SQLite refuses at INSERT time (here a trigger) fail
    alone: the batch is bisected until only they are left, and every valid report is stored."""
    path = tmp_path / "events.db"
    log = SQLiteEventLog(path, VirtualClock())
    await log.open()
    try:
        await log.append(report(0))
        with raw(path) as conn:
            conn.execute(POISON_TRIGGER)
        calls = []
        for i in range(1, 1001):
            calls.append(log.append(report(i), delivery_id=f"ok-{i}"))
            if i % 200 == 0:
                calls.append(log.append(report(i, login=f"poison{i}"), delivery_id=f"bad-{i}"))
        results = await asyncio.gather(*calls, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert len(failed) == 5
        assert all(isinstance(r, sqlite3.IntegrityError) and "poisoned" in str(r) for r in failed)
        stored = await log.read(0, 5000)
        assert sorted(e.report.login for e in stored) == sorted(f"user{i}" for i in range(1001))
        assert [e.seq for e in stored] == list(range(1, 1002))  # no gap where a row failed
        assert log.stats.pending == 0
        assert log.failure is None  # a bad row is not a broken log
        # a failed delivery was not remembered: its retry is tried again (and fails again)
        with pytest.raises(sqlite3.IntegrityError):
            await log.append(report(200, login="poison200"), delivery_id="bad-200")
    finally:
        await log.close()


def row_of(r, delivery_id: str | None = None) -> tuple:
    """An item of `submit_rows`, encoded as a web worker encodes it."""
    return encode_row(r, delivery_id), r, delivery_key(r, delivery_id, None)


async def submit_group(log: SQLiteEventLog, items: list[tuple]) -> list:
    """`submit_rows` awaited: its outcomes, and a check that `done` is called exactly once."""
    calls: list[list] = []
    finished = asyncio.get_running_loop().create_future()

    def done(outcomes: list) -> None:
        calls.append(list(outcomes))
        if not finished.done():
            finished.set_result(None)

    log.submit_rows(items, done)
    await asyncio.wait_for(finished, 30)
    await asyncio.sleep(0)  # a second call would have been scheduled by now
    assert len(calls) == 1
    return calls[0]


async def test_a_group_of_rows_settles_once_with_every_outcome_in_order(tmp_path: Path) -> None:
    """submit_rows: one callback for the whole group, outcomes in submission order: new rows,
    a retry of an earlier delivery, a retry inside the group, an id reused by another body
    (stored, a collision) and a row SQLite cannot bind, which fails alone."""
    log = SQLiteEventLog(tmp_path / "events.db", VirtualClock())
    await log.open()
    try:
        first = await log.append(report(0), delivery_id="old")
        items = [row_of(report(i), f"id-{i}") for i in range(1, 201)]
        items[49] = row_of(report(0), "old")                 # the same delivery again
        items[59] = row_of(report(60, login="other"), "old")  # the same id, another body
        items[70] = row_of(report(70), "id-70")              # retry of items[69]
        row, r, key = row_of(report(100), "id-100")
        items[99] = (row[:1] + ("bad\udcff",) + row[2:], r, key)  # not UTF-8: cannot be bound
        outcomes = await submit_group(log, items)
        assert len(outcomes) == 200
        assert outcomes[49] == Appended(first.seq, True)
        assert isinstance(outcomes[99], UnicodeEncodeError)
        assert outcomes[70] == Appended(outcomes[69].seq, True)
        new = [o for i, o in enumerate(outcomes) if i not in (49, 70, 99)]
        assert all(type(o) is Appended and not o.duplicate for o in new)
        assert [o.seq for o in new] == list(range(2, 2 + len(new)))  # in order, no gap
        stored = {e.seq: e for e in await log.read(0, 1000)}
        for i, outcome in enumerate(outcomes):
            if i not in (49, 70, 99):
                assert stored[outcome.seq].report == items[i][1]
                assert stored[outcome.seq].delivery_id == items[i][2][0]
        assert log.stats.delivery_id_collisions_total == 1
        assert log.stats.duplicates_total == 2
        assert log.stats.pending == 0 and log.failure is None
    finally:
        await log.close()


async def test_groups_and_single_appends_interleave_at_scale(tmp_path: Path) -> None:
    """Many groups and single appends in flight at once: every outcome names the row it stored,
    seqs stay contiguous, and the listeners see each stored event exactly once."""
    log = SQLiteEventLog(tmp_path / "events.db", VirtualClock())
    seen: list[int] = []
    log.add_listener(lambda events: seen.extend(e.seq for e in events))
    await log.open()
    try:
        groups = [[row_of(report(g * 1000 + i), f"g{g}-{i}") for i in range(40)] for g in range(60)]
        singles = [report(100_000 + i) for i in range(400)]
        results = await asyncio.gather(
            *(submit_group(log, group) for group in groups),
            *(log.append(r, delivery_id=f"s{i}") for i, r in enumerate(singles)),
        )
        stored = {e.seq: e.report.login for e in await log.read(0, 10_000)}
        for group, outcomes in zip(groups, results[:60]):
            assert [stored[o.seq] for o in outcomes] == [r.login for _, r, _ in group]
        assert [stored[o.seq] for o in results[60:]] == [r.login for r in singles]
        assert sorted(stored) == list(range(1, 60 * 40 + 400 + 1))
        assert sorted(seen) == sorted(stored)
    finally:
        await log.close()


#: A login longer than a 4 KiB page: its row cannot fit in the free space of existing pages.
PAGE_PLUS = 5000


def _set_max_pages(log: SQLiteEventLog, pages: int) -> None:
    """Emulate a full disk: SQLite refuses to grow the file past `pages` (SQLITE_FULL).

    Run on the writer's own connection while the writer is idle (nothing queued). A row must
    then need a new page for the refusal to be certain: a small batch of short rows can fit in
    the free space of the last pages and succeed, which clears the failure (as it should), so
    the tests below store logins longer than a page (overflow pages in the table and in
    ix_events_login)."""
    assert log.stats.pending == 0
    conn = log._writer.conn
    assert conn is not None
    conn.execute(f"PRAGMA max_page_count={pages}")


async def test_a_full_disk_makes_the_log_failing_until_a_probe_succeeds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = VirtualClock(start=1_700_000_000.0)
    log = SQLiteEventLog(tmp_path / "events.db", clock, probe_every=5.0)
    await log.open()
    try:
        await log.append(report(0))
        assert log.failure is None
        _set_max_pages(log, 1)  # the file's current size: it may not grow any more
        results = await asyncio.gather(
            *(log.append(report(i, login=f"user{i}-" + "x" * PAGE_PLUS)) for i in range(2000)),
            return_exceptions=True,
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        assert failed and all(isinstance(r, sqlite3.OperationalError) for r in failed)
        assert "full" in str(failed[0])
        assert log.failure is not None and "full" in log.failure.error
        assert log.failure.since == 1_700_000_000.0
        failures = caplog.text.count("commit failed")
        await clock.advance(5.0)  # the probe runs, and fails: still failing
        await eventually(lambda: caplog.text.count("commit failed") > failures, "the first probe")
        assert log.failure is not None and log.failure.since == 1_700_000_000.0
        _set_max_pages(log, 1_000_000)  # space again
        await clock.advance(5.0)
        await eventually(lambda: log.failure is None, "a successful probe")
        assert (await log.append(report(1))).seq == (await log.last_seq())
    finally:
        await log.close()


async def test_a_successful_append_clears_the_failure(tmp_path: Path) -> None:
    log = SQLiteEventLog(tmp_path / "events.db", VirtualClock(), probe_every=3600.0)
    await log.open()
    try:
        _set_max_pages(log, 1)
        with pytest.raises(sqlite3.OperationalError):
            await asyncio.gather(*(log.append(report(i, login="y" * PAGE_PLUS)) for i in range(500)))
        await eventually(lambda: log.stats.pending == 0, "the failed appends")
        assert log.failure is not None
        _set_max_pages(log, 1_000_000)
        await log.append(report(1))
        assert log.failure is None
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
        assert await log.append(report(100), delivery_id="recent") == Appended(21, True)
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


@pytest.mark.parametrize("mapping", [
    {"cos": "basic"}, {"ключ": "значение", "emoji": "🦊", "quote": 'a"b\\c\n'},
    {"groups": ("admin", "üsers"), "none": ()}, {"nested": {"a": [1, 2.5, None, True, "x"]}, "n": 7},
    {1: "int key"}, {"big": 2 ** 70, "neg": -0.0},
])
def test_row_json_is_what_the_standard_encoder_writes(mapping: dict) -> None:
    from trackalert.eventlog.rows import json_or_null

    expected = json.dumps(mapping, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    assert json_or_null(mapping) == expected
    assert json.loads(json_or_null(mapping)) == json.loads(expected)


@pytest.mark.parametrize("extra", [{"x": float("nan")}, {"x": [float("inf")]}, {"x": object()}])
def test_a_map_that_is_not_json_fails_its_own_row(extra: dict) -> None:
    with pytest.raises(ReportError, match="cannot be stored as JSON"):
        encode_row(report(1, extra=extra), None)


def test_a_cyclic_map_fails_its_own_row() -> None:
    cyclic: dict = {}
    cyclic["self"] = cyclic
    with pytest.raises(ReportError, match="cannot be stored as JSON"):
        encode_row(report(1, extra=cyclic), None)
