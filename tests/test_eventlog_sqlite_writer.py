"""The SQLite event log's writer under load: how a batch reaches SQLite, and what concurrent
appenders see (stored once, one seq order, acknowledged only once durable).

Real SQLite files; the statements are watched with the writer connection's own trace callback.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from eventlog_contract import report
from test_eventlog_sqlite import POISON_TRIGGER, raw, row_of, submit_group
from trackalert.clock import VirtualClock
from trackalert.eventlog import Appended
from trackalert.eventlog.sqlite import INSERT_CHUNK, SQLiteEventLog, chunk_size


def trace_writer(log: SQLiteEventLog) -> list[str]:
    """Every statement the writer's connection runs from now on (set while the writer is idle)."""
    assert log.stats.pending == 0 and log._writer.conn is not None
    statements: list[str] = []
    log._writer.conn.set_trace_callback(statements.append)
    return statements


def inserts_into(statements: list[str], table: str) -> int:
    return sum(1 for s in statements if s.startswith(f"INSERT INTO {table} "))


async def test_a_batch_is_inserted_with_a_few_statements_whatever_its_size(tmp_path: Path) -> None:
    """Each statement step lets go of the interpreter lock and must wait to take it back from
    the event loop or a Lua runner: a row per statement made the writer wait ~130 times per
    64-row commit. A group of 300 is one batch: at most 4 INSERTs per table, every row stored,
    in order, with its delivery id."""
    log = SQLiteEventLog(tmp_path / "events.db", VirtualClock())
    await log.open()
    try:
        statements = trace_writer(log)
        items = [row_of(report(i), f"d-{i}") for i in range(300)]
        outcomes = await submit_group(log, items)
        assert [o.seq for o in outcomes] == list(range(1, 301))
        assert 1 <= inserts_into(statements, "events") <= 4
        assert 1 <= inserts_into(statements, "deliveries") <= 4
        assert sum(1 for s in statements if s == "COMMIT") == 1
        stored = await log.read(0, 1000)
        assert [(e.report, e.delivery_id) for e in stored] == [(r, k[0]) for _, r, k in items]
    finally:
        await log.close()


@pytest.mark.parametrize("size", [1, 2, 7, 8, 9, 63, 64, 65, 255, 256, 257, 700])
def test_chunks_cover_any_batch_with_few_shapes(size: int) -> None:
    """The chunks of a batch add up to it, are at most four below INSERT_CHUNK, and come from a
    small set of sizes (each a statement prepared once)."""
    chunks, left = [], size
    while left:
        chunks.append(chunk_size(left))
        left -= chunks[-1]
    assert sum(chunks) == size
    assert len([c for c in chunks if c < INSERT_CHUNK]) <= 4
    shapes = {chunk_size(n) for n in range(1, 2 * INSERT_CHUNK)}
    assert set(chunks) <= shapes and len(shapes) <= 40


async def test_every_batch_size_stores_its_rows_in_order(tmp_path: Path) -> None:
    """Groups of every size from 1 to 70 and a few large ones, each one batch: the rows of each
    are stored in order under contiguous seqs."""
    log = SQLiteEventLog(tmp_path / "events.db", VirtualClock())
    await log.open()
    try:
        sizes = list(range(1, 71)) + [255, 256, 257, 520]
        expected: list[str] = []
        for g, size in enumerate(sizes):
            items = [row_of(report(g * 1000 + i), f"g{g}-{i}") for i in range(size)]
            outcomes = await submit_group(log, items)
            assert [o.seq for o in outcomes] == list(range(len(expected) + 1, len(expected) + size + 1))
            expected += [r.login for _, r, _ in items]
        stored = await log.read(0, 10_000)
        assert [e.report.login for e in stored] == expected
        assert [e.seq for e in stored] == list(range(1, len(expected) + 1))
    finally:
        await log.close()


APPENDERS = 128
PER_APPENDER = 12


async def test_concurrent_appenders_with_retries_and_a_bad_row(tmp_path: Path) -> None:
    """128 appenders at once, each appending its reports and retrying some deliveries (the same
    id and body, some retries racing the original), one of them a row SQLite refuses: every
    report is stored exactly once, seqs are one contiguous order, each retry gets its original's
    seq, the bad row fails alone, and every acknowledgement finds its row committed in the file
    (read on another connection the moment the acknowledgement arrives)."""
    path = tmp_path / "events.db"
    log = SQLiteEventLog(path, VirtualClock())
    await log.open()
    with raw(path) as conn:
        conn.execute(POISON_TRIGGER)
    reader = raw(path)
    not_durable: list[int] = []

    def committed(seq: int) -> bool:
        return reader.execute("SELECT 1 FROM events WHERE seq = ?", (seq,)).fetchone() is not None

    async def appender(a: int) -> list[tuple[str, Appended | BaseException]]:
        outcomes = []
        for i in range(PER_APPENDER):
            login = "poison" if (a, i) == (77, 3) else f"a{a}-{i}"
            r = report(a * 100 + i, login=login)
            delivery = f"a{a}-d{i}"
            calls = [log.append(r, delivery_id=delivery)]
            if i % 4 == 1:  # a retry racing its original
                calls.append(log.append(r, delivery_id=delivery))
            for result in await asyncio.gather(*calls, return_exceptions=True):
                if isinstance(result, Appended) and not committed(result.seq):
                    not_durable.append(result.seq)
                outcomes.append((delivery, result))
            if i % 4 == 2:  # a retry after the original was acknowledged
                outcomes.append((delivery, await log.append(r, delivery_id=delivery)))
        return outcomes

    try:
        results = await asyncio.gather(*(appender(a) for a in range(APPENDERS)))
        failed = [(d, o) for rs in results for d, o in rs if isinstance(o, BaseException)]
        assert [d for d, _ in failed] == ["a77-d3"]
        assert isinstance(failed[0][1], sqlite3.IntegrityError)
        seq_of: dict[str, int] = {}
        for delivery, outcome in (x for rs in results for x in rs if x[0] != "a77-d3"):
            assert isinstance(outcome, Appended)
            if not outcome.duplicate:
                assert delivery not in seq_of, f"{delivery} stored twice"
                seq_of[delivery] = outcome.seq
        for delivery, outcome in (x for rs in results for x in rs if x[0] != "a77-d3"):
            assert outcome.seq == seq_of[delivery]
        assert not_durable == []
        stored = await log.read(0, 10_000)
        total = APPENDERS * PER_APPENDER - 1
        assert [e.seq for e in stored] == list(range(1, total + 1))
        assert sorted(e.delivery_id for e in stored) == sorted(seq_of)
        assert {e.delivery_id: e.seq for e in stored} == seq_of
        assert log.stats.duplicates_total == APPENDERS * 6
        assert log.stats.pending == 0 and log.failure is None
    finally:
        reader.close()
        await log.close()
