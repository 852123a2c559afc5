"""The WAL checkpointer (eventlog/checkpointer.py): checkpoints leave the writer's commits, the
WAL still starts over under continuous concurrent appends, and an open reader's snapshot stays
valid while checkpoints run.

Real SQLite files and the real writer; the WAL's restarts are read from its own header (the
checkpoint sequence number SQLite increments each time the WAL starts over).
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
from pathlib import Path

from eventlog_contract import report
from test_eventlog_sqlite import raw, row_of, submit_group
from trackalert.clock import VirtualClock
from trackalert.eventlog.checkpointer import BACKSTOP_PAGES
from trackalert.eventlog.sqlite import SQLiteEventLog


def wal_restarts(path: Path) -> int:
    """The WAL header's checkpoint sequence number: +1 every time the WAL starts over (a WAL
    nothing was written to yet has no header)."""
    with open(f"{path}-wal", "rb") as wal:
        header = wal.read(32)
    assert len(header) == 32, "nothing written to the WAL yet"
    return struct.unpack(">I", header[12:16])[0]


def wal_size(path: Path) -> int:
    return os.path.getsize(f"{path}-wal")


async def test_commits_do_not_checkpoint_the_writer_only_keeps_a_far_backstop(tmp_path: Path) -> None:
    """SQLite's 1,000-page automatic checkpoint ran inside the COMMIT that crossed it (up to
    321 ms measured); the writer's connection keeps it only at BACKSTOP_PAGES, the checkpointer
    thread's connection not at all."""
    log = SQLiteEventLog(tmp_path / "events.db", VirtualClock(), checkpoint_interval=0)
    await log.open()
    try:
        assert log._writer.conn is not None
        assert log._writer.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == BACKSTOP_PAGES
        assert BACKSTOP_PAGES > 1000
        await submit_group(log, [row_of(report(i), f"d-{i}") for i in range(10)])
        assert log._checkpointer.wait_for(1, timeout=30)
    finally:
        await log.close()
    assert log._checkpointer._thread is None  # stopped before the close's TRUNCATE
    wal = Path(f"{tmp_path / 'events.db'}-wal")  # ... which still runs
    assert not wal.exists() or wal.stat().st_size == 0


async def test_the_wal_starts_over_under_continuous_concurrent_appends(tmp_path: Path) -> None:
    """64 appenders in a loop, random logins (the login index's pages all over the file): the
    checkpointer copies while the writer goes on, hands the last frames to the writer, and the
    WAL starts over many times; it stays far below what the appends wrote to it, and every
    append is stored once, in one seq order."""
    path = tmp_path / "events.db"
    log = SQLiteEventLog(path, VirtualClock(), checkpoint_interval=0)
    await log.open()
    rng = random.Random(9)
    appenders, each = 64, 40
    seqs: list[int] = []
    try:
        await log.append(report(-1), "first")
        restarts_before = wal_restarts(path)
        page_size = raw(path).execute("PRAGMA page_size").fetchone()[0]

        async def appender(k: int) -> None:
            for i in range(each):
                n = k * each + i
                appended = await log.append(report(n, login=f"user{rng.randrange(50_000)}"),
                                            f"d-{n}")
                seqs.append(appended.seq)

        await asyncio.gather(*(appender(k) for k in range(appenders)))
        restarts = wal_restarts(path) - restarts_before
        stats = log._checkpointer.stats
        assert stats.checkpoints >= 2 and stats.finished >= 1, stats
        assert restarts >= 2, (restarts, stats)
        # never near the backstop: the WAL is a fraction of the frames the commits wrote
        assert wal_size(path) < BACKSTOP_PAGES * page_size / 4
        assert sorted(seqs) == list(range(2, appenders * each + 2))
        stored = await log.read(0, appenders * each + 2)
        assert len(stored) == appenders * each + 1
        assert len({e.delivery_id for e in stored}) == appenders * each + 1
    finally:
        await log.close()


async def test_an_open_reader_keeps_its_snapshot_while_checkpoints_run(tmp_path: Path) -> None:
    """A PASSIVE checkpoint never copies frames a reader's snapshot still needs: a reader in the
    middle of a transaction sees the same events throughout, while appends and checkpoints go
    on; once it ends, the WAL starts over again."""
    path = tmp_path / "events.db"
    log = SQLiteEventLog(path, VirtualClock(), checkpoint_interval=0)
    await log.open()
    reader = raw(path)
    try:
        await submit_group(log, [row_of(report(i), f"a-{i}") for i in range(100)])
        reader.execute("BEGIN")
        seen = reader.execute("SELECT count(*), max(seq) FROM events").fetchone()
        assert seen == (100, 100)
        checkpoints = log._checkpointer.stats.checkpoints
        for round_ in range(20):
            await submit_group(log, [row_of(report(1000 * round_ + i), f"b-{round_}-{i}")
                                     for i in range(50)])
        assert log._checkpointer.wait_for(checkpoints + 2, timeout=30)
        assert reader.execute("SELECT count(*), max(seq) FROM events").fetchone() == seen
        assert log._checkpointer.stats.incomplete >= 1  # it held frames back for the reader
        reader.execute("COMMIT")
        assert reader.execute("SELECT count(*) FROM events").fetchone()[0] == 1100
        restarted = wal_restarts(path)
        for round_ in range(20):
            await submit_group(log, [row_of(report(10**6 + 100 * round_ + i), f"c-{round_}-{i}")
                                     for i in range(50)])
        assert wal_restarts(path) > restarted
    finally:
        reader.close()
        await log.close()
    check = raw(path)
    assert check.execute("SELECT count(*), max(seq) FROM events").fetchone() == (2100, 2100)
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    check.close()
