"""The embedded SQLite event log: one file, one writer thread, group commit.

Why it is built this way (figures measured on the 2-core target box):

* One commit per report tops out near 5,000/s (each commit is an fsync). Committing *everything
  that queued up during the previous commit* in one transaction reaches ~24,000 rows/s with no
  extra wait window, so latency stays one fsync when idle and throughput grows under load.
* A single writer thread owns a plain ``sqlite3`` connection: SQLite has one write lock anyway,
  the thread can assign seq numbers from memory, and multi-row INSERTs of pre-built tuples keep
  the per-row Python cost small (SQLAlchemy Core adds ~0.2 ms per single-row statement) and the
  writer's waits for the interpreter lock few (`insert_rows`).
* The event loop never blocks on SQLite: appends go through a queue, results come back with one
  ``call_soon_threadsafe`` per commit, and reads go through SQLAlchemy Core on an aiosqlite
  engine. WAL mode lets those readers run while the writer commits.
* SQLite's automatic checkpoint ran inside the COMMIT that crossed 1,000 WAL pages, up to 321 ms
  on the acknowledgement path; a thread of its own copies the WAL instead (checkpointer.py), and
  the writer only finishes its work between two transactions.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import queue
import sqlite3
import threading
from dataclasses import dataclass
from itertools import chain
from typing import Any, AsyncIterator, Callable, Iterable, Iterator

from sqlalchemy import URL, create_engine, event, select
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from trackalert.clock import Clock
from trackalert.eventlog.base import (
    FIELDS_ROW,
    AppendFailure,
    Appended,
    AppendStats,
    DeliveryKey,
    Event,
    EventLog,
    EventLogClosed,
    EventLogCorrupt,
    EventLogError,
    Listener,
    delivery_key,
    new_appended,
    new_event,
)
from trackalert.eventlog.checkpointer import BACKSTOP_PAGES, MIN_INTERVAL, WalCheckpointer
from trackalert.eventlog.ipkey import ip_key
from trackalert.eventlog.queries import SQLiteQueries
from trackalert.eventlog.rows import (DELIVERY_COLUMN, STORED_COLUMNS, StoredEvent, decode_row,
                                      encode_row)
from trackalert.eventlog.schema import cursors, deliveries, events
from trackalert.eventlog.sqlite_alerts import SQLiteAlerts
from trackalert.report import Report, parse_delivery_id

logger = logging.getLogger("trackalert")

#: Most work items one transaction takes; bounds a commit's duration after a burst.
MAX_BATCH = 8192
#: SQLite's default limit on host parameters is higher, but small IN lists plan and cache well.
LOOKUP_CHUNK = 500
BUSY_TIMEOUT_MS = 5000
#: How often a log whose appends fail tries a probe write to find out it works again.
PROBE_EVERY = 1.0

_DIALECT = sqlite_dialect.dialect()
_INSERT_EVENT = str(events.insert().compile(dialect=_DIALECT))
_INSERT_DELIVERY = str(deliveries.insert().compile(dialect=_DIALECT))
_cursor_insert = sqlite_dialect.insert(cursors)
_UPSERT_CURSOR = str(
    _cursor_insert.on_conflict_do_update(
        index_elements=[cursors.c.name], set_={"seq": _cursor_insert.excluded.seq}
    ).compile(dialect=_DIALECT)
)

# --------------------------------------------------------------------------- writer work items


class _Op:
    """A non-append job for the writer; runs inside the batch transaction, in a savepoint."""

    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: asyncio.Future[Any] | None = None

    def run(self, conn: sqlite3.Connection) -> Any:
        return None


class _Flush(_Op):
    """Nothing to do: the batch transaction itself writes the pending cursors."""

    __slots__ = ()


class _Stop(_Op):
    """Last item the writer processes before it exits."""

    __slots__ = ()


class _Probe(_Op):
    """While appends fail: do what an append does, undo it, and commit (can the log be written?).

    The insert goes through the same page allocations as a real append (a full database fails
    it); the commit of the savepoint's surroundings writes to the WAL (a full disk fails that).
    """

    __slots__ = ()

    #: About what a batch of a few hundred reports needs: free space inside existing pages is
    #: not enough for it, as it would not be for the appends that failed.
    _ROW = encode_row(Report(extra={"probe": "x" * 65536}), None)

    def run(self, conn: sqlite3.Connection) -> None:
        last = conn.execute("SELECT max(seq) FROM events").fetchone()[0] or 0
        conn.execute("SAVEPOINT probe")
        try:
            conn.execute(_INSERT_EVENT, (last + 1, 0.0) + self._ROW)
        finally:
            conn.execute("ROLLBACK TO probe")
            conn.execute("RELEASE probe")
        conn.execute(_UPSERT_CURSOR, ("trackalert.probe", last))


class _PruneEvents(_Op):
    __slots__ = ("upto",)

    def __init__(self, upto: int) -> None:
        super().__init__()
        self.upto = upto

    def run(self, conn: sqlite3.Connection) -> int:
        return conn.execute("DELETE FROM events WHERE seq <= ?", (self.upto,)).rowcount


class _PruneDeliveries(_Op):
    """Delete expired delivery ids within the next `chunk` keys after `after`.

    The table has no index on `received` (it would cost every append), so retention walks it in
    key order, a chunk per transaction, and appends interleave between the chunks.
    Returns (deleted, last key of the chunk or None when the walk is done).
    """

    __slots__ = ("after", "older_than", "chunk")

    def __init__(self, after: str | None, older_than: float, chunk: int) -> None:
        super().__init__()
        self.after, self.older_than, self.chunk = after, older_than, chunk

    def run(self, conn: sqlite3.Connection) -> tuple[int, str | None]:
        low_op, low = (">", self.after) if self.after is not None else (">=", "")
        end = conn.execute(
            f"SELECT delivery_id FROM deliveries WHERE delivery_id {low_op} ? "
            "ORDER BY delivery_id LIMIT 1 OFFSET ?",
            (low, self.chunk - 1),
        ).fetchone()
        if end is None:
            deleted = conn.execute(
                f"DELETE FROM deliveries WHERE delivery_id {low_op} ? AND received < ?",
                (low, self.older_than),
            ).rowcount
            return deleted, None
        deleted = conn.execute(
            f"DELETE FROM deliveries WHERE delivery_id {low_op} ? AND delivery_id <= ? "
            "AND received < ?",
            (low, end[0], self.older_than),
        ).rowcount
        return deleted, end[0]


class HistoryOrderError(EventLogError):
    """History that would make `received` step back in seq order (the log's searches rely on it)."""


@dataclass(frozen=True, slots=True)
class HistoryChunk:
    """What `SQLiteEventLog.append_history` tells the caller about one chunk."""

    stored: int
    #: Deliveries (same id, same report) already in the log or earlier in the chunk: not stored.
    duplicates: int
    #: Events that could not keep the seq they asked for (it was not above the log's end).
    renumbered: int
    first_seq: int
    #: The log's end after the chunk (its newest seq, or the high-water mark retention left).
    last_seq: int


class _HistoryItem:
    """Work for the writer that takes a transaction of its own (history import), never a share
    of an append batch: it moves the writer's position in ways the batch path does not expect."""

    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: asyncio.Future[Any] | None = None

    def run(self, writer: "_Writer", conn: sqlite3.Connection) -> Any:
        raise NotImplementedError


class _HistoryAppend(_HistoryItem):
    """Events with their own `received` (and the seq they would keep), in one transaction.

    Items are (row, wanted seq or None, delivery key or None, received): the key third, where
    `_Writer._known_deliveries` looks for it.
    """

    __slots__ = ("items",)

    def __init__(self, items: list[tuple]) -> None:
        super().__init__()
        self.items = items

    def run(self, writer: "_Writer", conn: sqlite3.Connection) -> HistoryChunk:
        chunk, writer.last_received = store_history(conn, self.items, writer.last_seq,
                                                    writer.last_received)
        writer.last_seq = chunk.last_seq
        return chunk


def store_history(conn: sqlite3.Connection, items: list[tuple], last_seq: int,
                  last_received: float) -> tuple[HistoryChunk, float]:
    """Insert a chunk of history (items as for `SQLiteEventLog.submit_history`) after a log
    that ends at `last_seq`, `last_received`, inside the caller's transaction; returns what was
    stored and the new last received. Shared by the writer's chunks and `trackalert import`,
    which holds a file in one transaction of its own. Raises HistoryOrderError (having written
    nothing of the chunk) if `received` would step back."""
    known, _ = _Writer._known_deliveries(conn, items)
    seq, floor = last_seq, last_received
    rows: list[tuple] = []
    new_deliveries: list[tuple] = []
    duplicates = renumbered = 0
    for row, wanted, key, received in items:
        if not received >= floor:  # NaN fails too
            raise HistoryOrderError(
                f"an event received at {received!r} would follow one received at {floor!r}: "
                "received must not step back in seq order"
            )
        if key is not None:
            if key in known:
                duplicates += 1
                continue
        if wanted is not None and wanted > seq:
            seq = wanted
        else:
            seq += 1
            renumbered += wanted is not None
        if key is not None:
            known[key] = seq
            new_deliveries.append(key + (seq, received))
        rows.append((seq, received) + row)
        floor = received
    # Multi-row statements (insert_rows): one step per 256 rows, not per row; 4.7 instead of
    # 6.4 s CPU for 1,000,000 events in one transaction, no helper indexes (2 Dec 2026).
    insert_rows(conn, _INSERT_EVENT, rows)
    insert_rows(conn, _INSERT_DELIVERY, new_deliveries)
    first = rows[0][0] if rows else 0
    return HistoryChunk(len(rows), duplicates, renumbered, first, seq), floor


def log_end(conn: sqlite3.Connection) -> tuple[int, float, bool]:
    """(the highest seq ever stored, the newest event's received or 0.0, whether the log holds
    any event): where the next event goes (see `_Writer.load_position`)."""
    newest = conn.execute("SELECT seq, received FROM events ORDER BY seq DESC LIMIT 1").fetchone()
    high = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
    last_seq = max(newest[0] if newest else 0, high[0] if high else 0)
    return last_seq, newest[1] if newest else 0.0, newest is not None


class _HistoryDiscard(_HistoryItem):
    """Remove every event after `upto` and give seqs above it back: an import that failed half
    way leaves the log as it found it (seqs stay contiguous)."""

    __slots__ = ("upto",)

    def __init__(self, upto: int) -> None:
        super().__init__()
        self.upto = upto

    def run(self, writer: "_Writer", conn: sqlite3.Connection) -> int:
        deleted = conn.execute("DELETE FROM events WHERE seq > ?", (self.upto,)).rowcount
        conn.execute("DELETE FROM deliveries WHERE seq > ?", (self.upto,))
        conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'events' AND seq > ?",
                     (self.upto, self.upto))
        writer.load_position()
        return deleted


#: An append as the writer sees it: (row without seq/received, report, delivery key or None,
#: sink, index). The sink is the append's own future (index -1) or the `_Group` of the appends
#: submitted together (index: the append's place in it). A group is queued as one list.
_Append = tuple

#: Called on the loop after a commit with: new events, (sink, index, result) triples, op
#: outcomes, number of appends, number of duplicates, the events stored under an id already
#: used by another body (delivery-id collisions).
_Committed = Callable[[list[Event], list[tuple], list[tuple], int, int, list[Event]], None]
#: Called on the loop when a transaction failed with: (sink, index) pairs, the error, appends.
_Failed = Callable[[list[tuple], BaseException, int], None]


class _Group:
    """Appends submitted together (`submit_rows`): one callback once all of them are settled.

    One object and one callback per group instead of a future and its callbacks per append:
    the core process serving its web workers appends thousands of reports a second in groups.
    Only the loop thread touches it.
    """

    __slots__ = ("results", "pending", "done")

    def __init__(self, size: int, done: Callable[[list[Any]], None]) -> None:
        self.results: list[Any] = [None] * size
        self.pending = size
        self.done = done

    def settle(self, index: int, result: Any) -> None:
        if self.results[index] is not None:  # already settled (cannot happen twice; be safe)
            return
        self.results[index] = result
        self.pending -= 1
        if not self.pending:
            try:
                self.done(self.results)
            except Exception:
                logger.exception("event log: an append group's callback failed")


def _settle(sink: Any, index: int, result: Any) -> None:
    """Hand one append's outcome (an `Appended` or an exception) to whoever waits for it."""
    if index >= 0:
        sink.settle(index, result)
    elif sink is not None and not sink.done():
        if isinstance(result, BaseException):
            sink.set_exception(result)
        else:
            sink.set_result(result)


#: Most rows one multi-row INSERT takes (256 events bind 6,400 parameters, far below SQLite's
#: limit of 32,766).
INSERT_CHUNK = 256
#: Chunks are multiples of this (then a power-of-two remainder): preparing a multi-row statement
#: costs ~12 µs a row, so only ~35 shapes per table ever exist, each prepared once and kept in
#: the connection's statement cache, and a batch under INSERT_CHUNK rows still takes at most
#: four statements per table.
CHUNK_STEP = 8
#: The write connection's statement cache: every chunk shape of both tables and the lookups.
STATEMENT_CACHE = 256


def insert_rows(conn: sqlite3.Connection, insert: str, rows: list[tuple]) -> None:
    """Insert `rows` with a few multi-row statements instead of one statement per row.

    Why: sqlite3 lets go of the interpreter lock around every statement step, and taking it back
    means waiting for whichever thread holds it then (the event loop, a Lua runner): executemany
    steps once per row, so a 64-row batch waited up to 130 times per commit, and that convoy,
    not SQLite, bounded the writer. A chunk is one step.
    """
    start, total = 0, len(rows)
    while start < total:
        size = chunk_size(total - start)
        chunk = rows[start:start + size]
        conn.execute(_multi_row_sql(insert, size, len(chunk[0])), list(chain.from_iterable(chunk)))
        start += size


def chunk_size(left: int) -> int:
    """The next chunk for `left` rows: INSERT_CHUNK, else the largest multiple of CHUNK_STEP,
    else the largest power of two (so the shapes stay few)."""
    if left >= INSERT_CHUNK:
        return INSERT_CHUNK
    if left >= CHUNK_STEP:
        return left - left % CHUNK_STEP
    return 1 << (left.bit_length() - 1)


@functools.lru_cache(maxsize=128)
def _multi_row_sql(insert: str, rows: int, width: int) -> str:
    """`insert` (one row of `?` placeholders) turned into the same INSERT of `rows` rows."""
    head, _, _ = insert.partition(" VALUES ")
    return head + " VALUES " + ",".join(["(" + ",".join("?" * width) + ")"] * rows)


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, taken at once (no lock upgrade half-way) and rolled back on any
    error, so that the writer's connection is never left inside a failed transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


@functools.lru_cache(maxsize=64)
def _lookup_sql(n: int) -> str:
    return (
        "SELECT delivery_id, fingerprint, seq FROM deliveries WHERE delivery_id IN ("
        + ",".join("?" * n)
        + ")"
    )


def _log_level(exc: BaseException) -> bool:
    """An error of the log itself (full disk, I/O, corruption, lock), not of one row.

    Retrying a batch piecemeal cannot help with those, and they make the log not ready; a row's
    own errors (a constraint, a value SQLite cannot bind) are isolated by splitting the batch.
    """
    return isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError


class _Writer:
    """The thread that owns the write connection and turns queued work into transactions."""

    def __init__(self, path: str, clock: Clock, cache_mb: int,
                 checkpointer: WalCheckpointer) -> None:
        self.path = path
        self.clock = clock
        self.cache_mb = cache_mb
        #: Told after every commit; checkpoints the WAL in its own thread (checkpointer.py).
        self.checkpointer = checkpointer
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.conn: sqlite3.Connection | None = None
        self.last_seq = 0
        self.last_received = 0.0
        self._cursors: dict[str, int] = {}
        self._cursor_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._committed: _Committed | None = None
        self._failed: _Failed | None = None
        #: Set (never cleared) once history is queued: only then do batches need sorting out.
        self.history_queued = False
        self._history_done: Callable[[Any, Any, BaseException | None, int], None] | None = None

    # -- set-up (runs in a worker thread, before the writer thread starts)

    def connect(self) -> None:
        """Open the write connection in WAL/synchronous=FULL, after checking the file is sound."""
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False,
            timeout=BUSY_TIMEOUT_MS / 1000, cached_statements=STATEMENT_CACHE,
        )
        try:
            self._check_integrity(conn)
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise EventLogError(f"cannot put {self.path} in WAL mode (got {mode!r})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute(f"PRAGMA cache_size={-1024 * self.cache_mb}")
            conn.execute("PRAGMA temp_store=MEMORY")
            # not inside our commits: the checkpointer thread does it; this is a backstop only
            conn.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
        except BaseException:
            conn.close()
            raise
        self.conn = conn

    def _check_integrity(self, conn: sqlite3.Connection) -> None:
        """Refuse a damaged file at start, before anything is appended to it.

        `quick_check` reads every page once (structure, not index contents): a page overwritten
        while the daemon was stopped would otherwise surface as failed appends or wrong answers
        months later. Only at start: while running, only this process writes the file.
        """
        try:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as exc:  # "file is not a database", "malformed"
            problems = [str(exc)]
        if problems != ["ok"]:
            raise EventLogCorrupt(self.path, "; ".join(problems))

    def load_position(self) -> None:
        """Read the newest seq/received: the writer is the only writer, so it counts from here.

        sqlite_sequence (AUTOINCREMENT) remembers the highest seq ever stored, so a log emptied
        by retention still continues after its old last seq instead of reusing numbers.
        """
        assert self.conn is not None
        self.last_seq, self.last_received, _ = log_end(self.conn)

    def start(
        self, loop: asyncio.AbstractEventLoop, committed: _Committed, failed: _Failed
    ) -> None:
        self._loop, self._committed, self._failed = loop, committed, failed
        self._thread = threading.Thread(
            target=self._run, name="trackalert-eventlog-writer", daemon=True
        )
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    # -- cursors (called from the loop thread)

    def save_cursor(self, name: str, seq: int) -> None:
        with self._cursor_lock:
            self._cursors[name] = seq

    def pending_cursor(self, name: str) -> int | None:
        with self._cursor_lock:
            return self._cursors.get(name)

    def has_pending_cursors(self) -> bool:
        return bool(self._cursors)

    def _take_cursors(self) -> dict[str, int]:
        if not self._cursors:
            return {}
        with self._cursor_lock:
            taken, self._cursors = self._cursors, {}
        return taken

    def _restore_cursors(self, taken: dict[str, int]) -> None:
        """Put back cursors of a failed transaction, unless a newer save replaced them."""
        if taken:
            with self._cursor_lock:
                for name, seq in taken.items():
                    self._cursors.setdefault(name, seq)

    # -- the thread

    def _run(self) -> None:
        take = self.queue.get
        take_nowait = self.queue.get_nowait
        try:
            while True:
                batch: list[Any] = []
                item = take()
                while True:
                    if type(item) is list:  # a group: its appends, in order
                        batch.extend(item)
                    else:
                        batch.append(item)
                    if len(batch) >= MAX_BATCH:
                        break
                    try:
                        item = take_nowait()
                    except queue.Empty:
                        break
                try:
                    stop = self._process(batch)
                except BaseException as exc:  # a bug here must not leave callers hanging
                    logger.exception("event log writer: unexpected error")
                    self._fail(batch, exc)
                    stop = any(type(item) is _Stop for item in batch)
                if stop:
                    return
                if self.checkpointer.finish_requested and self.conn is not None:
                    # after the batch's outcomes went to the loop: not on their path
                    self.checkpointer.finish(self.conn)
        finally:
            if self.conn is not None:
                self.conn.close()
                self.conn = None

    def _process(self, batch: list[Any]) -> bool:
        """Commit one batch; report the outcomes back. True when told to stop."""
        if self.history_queued:
            batch = self._commit_history_apart(batch)
            if not batch:
                return False
        self._commit(batch)
        return any(type(item) is _Stop for item in batch)

    def _commit_history_apart(self, batch: list[Any]) -> list[Any]:
        """Give each history item its own transaction, in queue order; the rest of the batch
        (what was queued after the last of them) is returned for the ordinary commit."""
        rest: list[Any] = []
        for item in batch:
            if isinstance(item, _HistoryItem):
                if rest:
                    self._commit(rest)
                    rest = []
                self._commit_history(item)
            else:
                rest.append(item)
        return rest

    def _commit_history(self, item: _HistoryItem) -> None:
        conn = self.conn
        assert conn is not None
        try:
            with _immediate(conn):
                value = item.run(self, conn)
        except Exception as exc:
            self._resync()
            self._call_loop(self._history_done, item.future, None, exc, self.last_seq)
            return
        self.checkpointer.committed()
        self._call_loop(self._history_done, item.future, value, None, self.last_seq)

    def _commit(self, batch: list[Any]) -> None:
        """One transaction for the batch; if it fails because of a row, halve and retry.

        Bisecting isolates a guilty row in ~2·log2(n) transactions, so one bad report fails
        alone instead of taking its whole group commit with it. Errors of the log itself (a full
        disk) fail the batch at once: every half would fail the same way.
        """
        appends: list[_Append] = []
        ops: list[_Op] = []
        for item in batch:
            (appends if type(item) is tuple else ops).append(item)
        taken = self._take_cursors()
        conn = self.conn
        assert conn is not None
        try:
            with _immediate(conn):
                stored = self._store(conn, appends)
                if taken:
                    conn.executemany(_UPSERT_CURSOR, taken.items())
                outcomes = [self._run_op(conn, op) for op in ops]
        except Exception as exc:
            self._restore_cursors(taken)
            self._resync()
            if len(appends) > 1 and not _log_level(exc):
                middle = len(batch) // 2
                self._commit(batch[:middle])
                self._commit(batch[middle:])
            else:
                self._fail(batch, exc)
            return
        self.checkpointer.committed()
        new_events, results, duplicates, collisions, last_received = stored
        if new_events:
            self.last_seq = new_events[-1].seq
            self.last_received = last_received
        self._call_loop(
            self._committed, new_events, results, outcomes, len(appends), duplicates, collisions
        )

    def _store(
        self, conn: sqlite3.Connection, appends: list[_Append]
    ) -> tuple[list[Event], list[tuple], int, list[Event], float]:
        """Insert the batch's new events (skipping retried deliveries) with seq and received."""
        if not appends:
            return [], [], 0, [], self.last_received
        known, used_ids = self._known_deliveries(conn, appends)
        received = self.clock.time()
        if received < self.last_received:  # keep `received` searchable: never step back
            received = self.last_received
        seq = self.last_seq
        rows: list[tuple] = []
        new_deliveries: list[tuple] = []
        new_events: list[Event] = []
        collisions: list[Event] = []
        results: list[tuple] = []
        duplicates = 0
        for row, report, key, sink, index in appends:
            if key is not None:
                original = known.get(key)
                if original is not None:
                    results.append((sink, index, new_appended(original, True)))
                    duplicates += 1
                    continue
            seq += 1
            event = new_event(seq, received, report, row[DELIVERY_COLUMN])
            if key is not None:
                known[key] = seq  # later copies in this batch are retries of this one
                new_deliveries.append(key + (seq, received))
                if key[0] in used_ids:
                    collisions.append(event)
                used_ids.add(key[0])
            rows.append((seq, received) + row)
            new_events.append(event)
            results.append((sink, index, new_appended(seq, False)))
        insert_rows(conn, _INSERT_EVENT, rows)
        insert_rows(conn, _INSERT_DELIVERY, new_deliveries)
        return new_events, results, duplicates, collisions, received

    @staticmethod
    def _known_deliveries(
        conn: sqlite3.Connection, appends: list[_Append]
    ) -> tuple[dict[DeliveryKey, int], set[str]]:
        """The stored seq of every (id, fingerprint) of the batch's ids, and the ids stored
        before at all (to tell a collision from a first delivery): one query per 500 ids."""
        ids = list(dict.fromkeys(a[2][0] for a in appends if a[2] is not None))
        known: dict[DeliveryKey, int] = {}
        for start in range(0, len(ids), LOOKUP_CHUNK):
            chunk = ids[start:start + LOOKUP_CHUNK]
            chunk += chunk[-1:] * (-len(chunk) % CHUNK_STEP)  # a repeat: few statement shapes
            for delivery_id, print_, seq in conn.execute(_lookup_sql(len(chunk)), chunk):
                known[(delivery_id, print_)] = seq
        return known, {key[0] for key in known}

    @staticmethod
    def _run_op(conn: sqlite3.Connection, op: _Op) -> tuple:
        """Run one op in a savepoint so that its failure does not fail the appends beside it."""
        if type(op) in (_Flush, _Stop):
            return (op.future, None, None)
        conn.execute("SAVEPOINT op")
        try:
            value = op.run(conn)
        except Exception as exc:
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            return (op.future, None, exc)
        conn.execute("RELEASE op")
        return (op.future, value, None)

    def _resync(self) -> None:
        """After a failed transaction, re-read the log's end (another process may have written)."""
        try:
            self.load_position()
        except Exception:
            logger.exception("event log writer: cannot re-read the log position")

    def _fail(self, batch: list[Any], exc: BaseException) -> None:
        sinks = [(item[3], item[4]) if type(item) is tuple else (item.future, -1) for item in batch]
        appends = sum(1 for item in batch if type(item) is tuple)
        self._call_loop(self._failed, sinks, exc, appends)

    def _call_loop(self, fn: Callable[..., None] | None, *args: Any) -> None:
        assert self._loop is not None and fn is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is gone; nobody is waiting any more
            pass


# --------------------------------------------------------------------------- the backend

_NEW, _OPEN, _CLOSING, _CLOSED = "new", "open", "closing", "closed"


class SQLiteEventLog(EventLog):
    """`EventLog` on one SQLite file (see the module docstring for the design)."""

    backend = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        clock: Clock,
        *,
        cursor_flush_delay: float = 1.0,
        cache_mb: int = 64,
        probe_every: float = PROBE_EVERY,
        checkpoint_interval: float = MIN_INTERVAL,
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.location = self.path
        self.stats = AppendStats()
        self._clock = clock
        self._cursor_flush_delay = cursor_flush_delay
        self._probe_every = probe_every
        self._probe_task: asyncio.Task[None] | None = None
        self.failure: AppendFailure | None = None
        self._checkpointer = WalCheckpointer(self.path, checkpoint_interval, BUSY_TIMEOUT_MS)
        self._writer = _Writer(self.path, clock, cache_mb, self._checkpointer)
        self._listeners: list[Listener] = []
        self._state = _NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine: AsyncEngine | None = None
        self._committed_seq = 0
        self._flush_timer: asyncio.Task[None] | None = None
        self._close_task: asyncio.Task[None] | None = None
        self._prune_lock = asyncio.Lock()
        self._active_reads = 0
        self._reads_done = asyncio.Event()
        self._reads_done.set()
        self._queries = SQLiteQueries(self.path)  # connects lazily, per thread
        self._alerts: SQLiteAlerts | None = None

    def __repr__(self) -> str:
        return f"<SQLiteEventLog {self.path} {self._state}>"

    # -- life cycle

    async def open(self) -> None:
        if self._state != _NEW:
            raise EventLogError(f"event log {self.path} was already opened")
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._open_sync)
        self._committed_seq = self._writer.last_seq
        self._engine = self._reader_engine()
        self._writer.start(self._loop, self._on_committed, self._on_failed)
        self._state = _OPEN

    def _open_sync(self) -> None:
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise EventLogError(
                f"cannot open event log {self.path}: {directory} is not a directory"
            )
        self._writer.connect()
        try:
            self._migrate()
            self._writer.load_position()
            self._checkpointer.start()
        except BaseException:
            assert self._writer.conn is not None
            self._writer.conn.close()
            self._writer.conn = None
            raise

    def _migrate(self) -> None:
        """`alembic upgrade head` on the file, in one IMMEDIATE transaction.

        pysqlite does not put DDL in a transaction by itself; doing so explicitly makes a
        migration all-or-nothing and keeps two processes from migrating the same file at once.
        """
        from trackalert import migrations  # alembic is only needed here, at open time

        engine = create_engine(URL.create("sqlite", database=self.path), poolclass=NullPool)

        @event.listens_for(engine, "connect")
        def _autocommit_driver(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None
            dbapi_connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

        @event.listens_for(engine, "begin")
        def _begin_immediate(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        try:
            with engine.begin() as connection:
                migrations.upgrade(connection, location=self.path)
        finally:
            engine.dispose()

    def _reader_engine(self) -> AsyncEngine:
        engine = create_async_engine(URL.create("sqlite+aiosqlite", database=self.path))

        @event.listens_for(engine.sync_engine, "connect")
        def _reader_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA query_only=1")  # readers must never take the write lock
            cursor.close()

        return engine

    async def close(self) -> None:
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self._shutdown())
        await asyncio.shield(self._close_task)

    async def _shutdown(self) -> None:
        """Let the writer commit everything queued (appends, cursors), then release it all."""
        if self._state == _NEW:
            self._state = _CLOSED
            return
        self._state = _CLOSING
        for task in (self._flush_timer, self._probe_task):
            if task is not None:
                task.cancel()
        self._flush_timer = self._probe_task = None
        try:
            await self._submit(_Stop())
        finally:
            await asyncio.to_thread(self._writer.join)
            await asyncio.to_thread(self._checkpointer.stop)
            # disposing the engine under a running query would leak that query's connection
            await self._reads_done.wait()
            if self._engine is not None:
                await self._engine.dispose()
            self._queries.close()
            if self._alerts is not None:
                self._alerts.close()
            await asyncio.to_thread(self._checkpoint)
            self._state = _CLOSED

    def _checkpoint(self) -> None:
        """Fold the write-ahead log into the main file, so that after a graceful stop the file
        alone (a copy, a backup) holds every acknowledged event.

        SQLite does this by itself only when the last connection closes, and a daemon has
        connections it does not close (other threads', other processes'); an idle one does not
        keep TRUNCATE from completing, a reader in the middle of a transaction does (then the
        -wal file is still needed, and we say so).
        """
        try:
            conn = sqlite3.connect(self.path, isolation_level=None,
                                   timeout=BUSY_TIMEOUT_MS / 1000)
            try:
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            logger.warning("event log %s: cannot checkpoint the WAL at close: %s", self.path, exc)
            return
        if busy:
            logger.warning("event log %s: a reader kept the WAL from being checkpointed at close; "
                           "keep %s-wal with the file", self.path, self.path)

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[AsyncConnection]:
        """A reader connection; close() waits for these to finish before releasing the engine."""
        self._check_open()
        assert self._engine is not None
        self._active_reads += 1
        self._reads_done.clear()
        try:
            async with self._engine.connect() as conn:
                yield conn
        finally:
            self._active_reads -= 1
            if not self._active_reads:
                self._reads_done.set()

    def _check_open(self) -> None:
        if self._state != _OPEN:
            raise EventLogClosed(f"event log {self.path} is {self._state}, not open")

    # -- writing

    async def append(
        self, report: Report, delivery_id: str | None = None, fingerprint: bytes | None = None
    ) -> Appended:
        return await self.submit(report, delivery_id, fingerprint)

    def submit(
        self, report: Report, delivery_id: str | None = None, fingerprint: bytes | None = None
    ) -> "asyncio.Future[Appended]":
        self._check_open()
        row = encode_row(report, parse_delivery_id(delivery_id))  # first: proves it storable
        key = delivery_key(report, delivery_id, fingerprint)
        assert self._loop is not None
        future: asyncio.Future[Appended] = self._loop.create_future()
        self._writer.queue.put((row, report, key, future, -1))
        self.stats.pending += 1
        return future

    def submit_rows(
        self, appends: list[tuple], done: Callable[[list[Appended | Exception]], None]
    ) -> None:
        """Append rows encoded beforehand (`encode_row`), as one group: one queue item, and one
        call of `done` with every outcome in order once all of them are durable or failed.

        Each item is (row, report, delivery key or None). The rows are trusted to come from
        `encode_row` (a web worker encodes them): a row SQLite refuses still fails alone.
        """
        self._check_open()
        if not appends:
            done([])
            return
        group = _Group(len(appends), done)
        self._writer.queue.put(
            [(row, report, key, group, index) for index, (row, report, key) in enumerate(appends)]
        )
        self.stats.pending += len(appends)

    # -- history (import): events with their own received, a transaction per chunk

    def submit_history(self, items: list[tuple]) -> "asyncio.Future[HistoryChunk]":
        """Queue a chunk of history: items are (row from `encode_row`, wanted seq or None,
        delivery key or None, received), `received` non-decreasing from the log's end on.

        One transaction per chunk instead of one per event (the append path stamps
        `clock.time()` once per batch, so it cannot write history). An event keeps the seq it
        asks for when that is above the log's end (an export re-imported keeps its seqs, so a
        replay of either names the same events); otherwise it takes the next one. Listeners are
        not told: history is not news for the policy runner. Fails with HistoryOrderError, and
        stores nothing of the chunk, if `received` would step back.
        """
        return self._submit_history(_HistoryAppend(items))

    async def append_history(self, items: list[tuple]) -> HistoryChunk:
        return await self.submit_history(items)

    async def discard_history(self, upto: int) -> int:
        """Delete every event after seq `upto` and reuse the seqs above it (undo an import that
        could not finish); returns how many events were deleted."""
        return await self._submit_history(_HistoryDiscard(upto))

    def _submit_history(self, item: _HistoryItem) -> "asyncio.Future[Any]":
        self._check_open()
        assert self._loop is not None
        item.future = self._loop.create_future()
        self._writer._history_done = self._history_done
        self._writer.history_queued = True
        self._writer.queue.put(item)
        return item.future

    def _history_done(self, future: "asyncio.Future[Any]", value: Any,
                      exc: BaseException | None, last_seq: int) -> None:
        """On the loop: the writer's position right after the item's transaction, and its outcome."""
        self._committed_seq = last_seq
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)

    def add_listener(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def save_cursor(self, name: str, seq: int) -> None:
        self._check_open()
        self._writer.save_cursor(name, int(seq))
        if self._flush_timer is None:
            assert self._loop is not None
            deadline = self._clock.monotonic() + self._cursor_flush_delay
            self._flush_timer = self._loop.create_task(self._flush_cursors_later(deadline))

    async def _flush_cursors_later(self, deadline: float) -> None:
        """Persist cursors within `cursor_flush_delay` even when no append comes to carry them.

        The deadline is taken at save time: the task may first run a little later.
        """
        remaining = deadline - self._clock.monotonic()
        if remaining > 0:
            await self._clock.sleep(remaining)
        self._flush_timer = None  # a save from now on starts a new timer
        if self._state == _OPEN and self._writer.has_pending_cursors():
            try:
                await self._submit(_Flush())
            except Exception:
                logger.exception("event log: flushing cursors failed; will retry with next write")

    async def prune(self, older_than: float, chunk: int = 5000) -> int:
        self._check_open()
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        async with self._prune_lock:
            first, cut = await self._prune_range(older_than)
            deleted = 0
            low = first
            while cut and low <= cut:
                high = min(cut, low + chunk - 1)
                deleted += await self._submit(_PruneEvents(high))
                low = high + 1
            return deleted

    async def _prune_range(self, older_than: float) -> tuple[int, int]:
        """(first seq, last seq with received < older_than), or (first, 0) if there is none.

        Binary search on seq, relying on `received` being non-decreasing in seq: ~23 primary-key
        probes for 5 million events, and no index on `received` to slow every append down.
        """
        probe = select(events.c.seq, events.c.received).order_by(events.c.seq).limit(1)
        async with self._reading() as conn:

            async def at_or_after(seq: int) -> tuple[int, float] | None:
                row = (await conn.execute(probe.where(events.c.seq >= seq))).first()
                return (row[0], row[1]) if row else None

            head = await at_or_after(0)
            if head is None or head[1] >= older_than:
                return (head[0] if head else 0), 0
            tail = (await conn.execute(
                select(events.c.seq, events.c.received).order_by(events.c.seq.desc()).limit(1)
            )).first()
            assert tail is not None
            if tail[1] < older_than:
                return head[0], tail[0]
            # Invariant: `low` is a stored seq with received < older_than; every seq >= `high`
            # has received >= older_than.
            low, high = head[0], tail[0]
            while high - low > 1:
                middle = (low + high) // 2
                found = await at_or_after(middle)
                if found is not None and found[0] < high and found[1] < older_than:
                    low = found[0]
                else:
                    high = middle
            return head[0], low

    async def prune_deliveries(self, older_than: float, chunk: int = 5000) -> int:
        self._check_open()
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        deleted, after = 0, None
        while True:
            count, after = await self._submit(_PruneDeliveries(after, older_than, chunk))
            deleted += count
            if after is None:
                return deleted

    async def _submit(self, op: _Op) -> Any:
        """Queue `op` for the writer and wait for its transaction.

        Only `_Stop` may be queued once closing has begun: anything queued behind it would never
        be processed (a prune still walking its chunks when close() is called stops here).
        """
        if type(op) is not _Stop:
            self._check_open()
        assert self._loop is not None
        op.future = self._loop.create_future()
        self._writer.queue.put(op)
        return await op.future

    # -- completions (run on the loop thread, scheduled by the writer)

    def _on_committed(
        self,
        new_events: list[Event],
        results: list[tuple],
        outcomes: list[tuple],
        appends: int,
        duplicates: int,
        collisions: list[Event],
    ) -> None:
        stats = self.stats
        stats.commits_total += 1
        stats.pending -= appends
        if appends:
            stats.last_batch_size = appends
            if appends > stats.max_batch_size:
                stats.max_batch_size = appends
            self._recovered()
        stats.duplicates_total += duplicates
        stats.delivery_id_collisions_total += len(collisions)
        for event in collisions:
            logger.warning(
                "event log: delivery id %r came again with another body: stored as a new "
                "report (seq %d), not as a retry", event.delivery_id, event.seq,
            )
        if new_events:
            stats.appended_total += len(new_events)
            self._committed_seq = new_events[-1].seq
            for listener in self._listeners:
                try:
                    listener(new_events)
                except Exception:
                    logger.exception("event log listener %r failed", listener)
        for sink, index, result in results:
            _settle(sink, index, result)
        for future, value, exc in outcomes:
            if future is None or future.done():
                continue
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(value)

    def _on_failed(self, sinks: list[tuple], exc: BaseException, appends: int) -> None:
        self.stats.pending -= appends
        logger.error("event log %s: commit failed: %s", self.path, exc)
        if _log_level(exc):
            self._failing(exc)
        for sink, index in sinks:
            _settle(sink, index, exc)

    # -- health (readiness)

    def _failing(self, exc: BaseException) -> None:
        """Remember that appends fail, and probe until a write works again.

        Without the probe a daemon taken out of rotation for being not ready would never see the
        append that proves it recovered.
        """
        if self.failure is None:
            self.failure = AppendFailure(self._clock.time(), str(exc))
        if self._probe_task is None and self._state == _OPEN:
            assert self._loop is not None
            self._probe_task = self._loop.create_task(self._probe())

    def _recovered(self) -> None:
        if self.failure is not None:
            logger.warning("event log %s: appends work again", self.path)
            self.failure = None

    async def _probe(self) -> None:
        try:
            while self.failure is not None and self._state == _OPEN:
                await self._clock.sleep(self._probe_every)
                try:
                    await self._submit(_Probe())
                except Exception as exc:  # still failing (the op's own error, or the commit's)
                    if self.failure is not None:
                        self.failure = AppendFailure(self.failure.since, str(exc))
                else:
                    self._recovered()
        finally:
            self._probe_task = None

    # -- reading

    async def read(self, after_seq: int, limit: int) -> list[Event]:
        self._check_open()
        statement = (
            select(events).where(events.c.seq > after_seq).order_by(events.c.seq).limit(limit)
        )
        async with self._reading() as conn:
            rows = (await conn.execute(statement)).all()
        return [decode_row(row) for row in rows]

    async def read_stored(self, after_seq: int, limit: int) -> list[StoredEvent]:
        """One narrow query per batch on a reader connection of the queries (in a thread): the
        REPORT_COLUMNS and `ip` of each event, kept as stored (rows.StoredEvent)."""
        self._check_open()
        return await asyncio.to_thread(self._read_stored, after_seq, limit)

    def _read_stored(self, after_seq: int, limit: int) -> list[StoredEvent]:
        rows = self._queries._conn().execute(_READ_STORED, (after_seq, limit)).fetchall()
        return [StoredEvent(row) for row in rows]

    def read_fields(self, after_seq: int, limit: int, received_from: float | None = None) -> list[tuple]:
        """Narrow rows on the helpers' own per-thread read-only connection (no event loop hop):
        a rowid range, whose start a `received_from` finds in one seek of ix_events_received.
        The maps stay JSON text (or None), parsed only by whoever looks inside; success is the
        stored 0/1 (equal to False/True)."""
        self._check_open()
        conn = self._queries._conn()
        if received_from is None:
            return conn.execute(_READ_FIELDS + "ORDER BY seq LIMIT ?", (after_seq, limit)).fetchall()
        return conn.execute(_READ_FIELDS + _FROM_RECEIVED + "ORDER BY seq LIMIT ?",
                            (after_seq, received_from, limit)).fetchall()

    def projection_snapshot(self) -> str | None:
        return f"{self.path}-windows"

    def count_fields(self, after_seq: int, upto_seq: int, columns: tuple[int, ...]) -> dict[tuple, int]:
        """Counted in Python over a narrow rowid range on the helpers' per-thread read-only
        connection: a Counter (C) of the fetched tuples groups exactly as the projection's keys
        compare, and built the window no slower than SQLite's GROUP BY, whose temporary b-tree
        sorts every row (4.6 s CPU each for 1M events, 3 alternating rounds). The columns are
        FIELDS_ROW positions: nothing from outside reaches the SQL."""
        self._check_open()
        names = ", ".join(FIELDS_ROW[i] for i in columns)
        rows = self._queries._conn().execute(
            f"SELECT {names} FROM events WHERE seq > ? AND seq <= ?", (after_seq, upto_seq))
        return collections.Counter(rows)

    async def last_seq(self) -> int:
        """From memory: the writer is the only writer, so the last commit it reported is the end."""
        self._check_open()
        return self._committed_seq

    async def load_cursor(self, name: str) -> int:
        self._check_open()
        pending = self._writer.pending_cursor(name)
        if pending is not None:
            return pending
        async with self._reading() as conn:
            row = (await conn.execute(select(cursors.c.seq).where(cursors.c.name == name))).first()
        return int(row[0]) if row else 0

    def alerts(self) -> SQLiteAlerts:
        """The alerts table of this file, on a connection of its own (sqlite_alerts.py)."""
        self._check_open()
        if self._alerts is None:
            self._alerts = SQLiteAlerts(self.path)
        return self._alerts

    def queries(self) -> SQLiteQueries:
        """The long-term helpers' engine: per-thread read-only connections (eventlog/queries.py)."""
        self._check_open()
        return self._queries

    async def describe(self) -> dict:
        """Counts come from the seq range: seqs are contiguous and retention only cuts the head,
        so this is exact without a full-table count(*) over millions of rows."""
        pick = select(events.c.seq, events.c.received).limit(1)
        async with self._reading() as conn:
            first = (await conn.execute(pick.order_by(events.c.seq))).first()
            last = (await conn.execute(pick.order_by(events.c.seq.desc()))).first()
        return {
            "backend": self.backend,
            "location": self.location,
            "events": (last[0] - first[0] + 1) if first and last else 0,
            "first_seq": first[0] if first else 0,
            "last_seq": max(self._committed_seq, last[0] if last else 0),
            "oldest_received": first[1] if first else None,
            "newest_received": last[1] if last else None,
            "size_bytes": _file_sizes(self.path, ("", "-wal")),
        }


_READ_STORED = f"SELECT {', '.join(STORED_COLUMNS)} FROM events WHERE seq > ? ORDER BY seq LIMIT ?"
_READ_FIELDS = ("SELECT seq, received, login, success, ip, pwhash, country, protocol, asn, "
                "device_attrs, attrs FROM events WHERE seq > ? ")
_FROM_RECEIVED = ("AND seq >= coalesce((SELECT seq FROM events INDEXED BY ix_events_received "
                  "WHERE received >= ? ORDER BY received, seq LIMIT 1), 9223372036854775807) ")


def _file_sizes(path: str, suffixes: Iterable[str]) -> int:
    total = 0
    for suffix in suffixes:
        try:
            total += os.path.getsize(path + suffix)
        except OSError:
            pass
    return total
