"""Where a replay's events come from: the log file itself, read-only, as it was at the start.

Why it is built this way:

* A replay is often run against the file of a daemon that keeps ingesting. Every connection is
  opened with a ``file:...?mode=ro`` URI and ``query_only``: SQLite never takes the write lock,
  never changes the main file, and WAL readers do not block the daemon's writer. The replay
  reads only events up to the last seq stored when it opened the file (`snapshot`), and the
  helpers answer as of seqs below it, so what the daemon appends meanwhile is never seen.
* The helpers must be those of the daemon (`eventlog/queries.py`, and the window projection of
  `eventlog/windows.py`): `ReadOnlyLog` is an `EventLog` with just the read side they need
  (`queries()` and `read_fields`), on the same SQL. Nothing else of `EventLog` applies to a file
  the replay must not write.
* An NDJSON export (`trackalert.eventlog.history.read_export`) is loaded into a temporary SQLite
  log first (`load_events`), so that it is answered by exactly the same SQL and projection code
  as a log file, with no second query engine to keep in step.
* An Elasticsearch log (``elasticsearch://...``) is loaded the same way, from one point in time
  of its index (`trackalert.eventlog.es_snapshot`: read-only, as of the start). Why not answer
  the helpers from the cluster: a replay asks several helpers per event, each then a search over
  HTTP instead of a local SQLite query; loading the index is one sequential read, and the
  replay then gives exactly a file's answers for the same events.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import tempfile
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from trackalert.eventlog.base import Event, EventLog
from trackalert.eventlog.queries import SQLiteQueries
from trackalert.eventlog.rows import decode_row, encode_row
from trackalert.eventlog.schema import EVENT_COLUMNS

SQLITE_MAGIC = b"SQLite format 3\x00"
#: How much of a file's start may be blank lines before an export's first `{`.
NDJSON_SNIFF = 1 << 16
#: Events read from the file at a time.
READ_CHUNK = 2048
#: What a log needs for a replay: the events with the columns of this version, and the index
#: that turns a time into a seq (migration 0006).
REQUIRED_INDEX = "ix_events_received"


class SourceError(Exception):
    """The source cannot be replayed (not a log, unreadable, wrong schema); for the operator."""


@dataclass(frozen=True)
class Selection:
    """Which events `report` runs on: received in [start, end), of these logins (all if empty).

    The helpers still see every event of the log before each one, whatever the selection: the
    history before `start`, and other logins' reports, are part of what the policy asks about.
    """

    start: float | None = None
    end: float | None = None
    logins: tuple[str, ...] = ()


def connect_read_only(path: str) -> sqlite3.Connection:
    """A connection that can never write `path` (nor create it, nor its journal)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                           check_same_thread=False, timeout=5.0)
    conn.execute("PRAGMA query_only=1")
    return conn


def check_log_file(path: str) -> None:
    """Raise SourceError saying what is wrong when `path` is not a trackalert event log."""
    if not os.path.isfile(path):
        raise SourceError(f"{path}: no such file")
    with open(path, "rb") as handle:
        magic = handle.read(len(SQLITE_MAGIC))
    if magic != SQLITE_MAGIC:
        raise SourceError(f"{path} is not a trackalert event log (not an SQLite file)")
    try:
        conn = connect_read_only(path)
        try:
            columns = [row[1] for row in conn.execute("PRAGMA table_info(events)")]
            indexes = {row[1] for row in conn.execute("PRAGMA index_list(events)")}
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise SourceError(f"{path}: cannot read it as a trackalert event log ({exc})") from exc
    if not columns:
        raise SourceError(f"{path} is an SQLite file but not a trackalert event log (no events table)")
    missing = [name for name in EVENT_COLUMNS if name not in columns]
    if missing or REQUIRED_INDEX not in indexes:
        raise SourceError(
            f"{path} is a trackalert event log of an older schema (missing "
            f"{', '.join(missing) or REQUIRED_INDEX}): start this version's daemon on it once "
            "(it migrates the file), or replay a copy after `trackalert export`/`import`")


class ReadOnlyLog(EventLog):
    """The read side of the SQLite event log that the helpers and the projection use.

    The daemon's `SQLiteEventLog` opens a writer and migrates the file; a replay must do
    neither, so this serves the same `SQLiteQueries` and the same narrow read, and refuses
    every write.
    """

    backend = "sqlite"

    def __init__(self, path: str, snapshot: int) -> None:
        self.path = self.location = os.path.abspath(path)
        self.snapshot = snapshot
        self._queries = SQLiteQueries(self.path)

    def queries(self) -> SQLiteQueries:
        return self._queries

    def read_fields(self, after_seq: int, limit: int, received_from: float | None = None) -> list[tuple]:
        """As `SQLiteEventLog.read_fields`, never past the snapshot."""
        conn = self._queries._conn()
        sql = ("SELECT seq, received, login, success, ip, pwhash, country, protocol, asn, "
               "device_attrs, attrs FROM events WHERE seq > ? AND seq <= ? ")
        params: tuple = (after_seq, self.snapshot)
        if received_from is not None:
            sql += ("AND seq >= coalesce((SELECT seq FROM events INDEXED BY ix_events_received "
                    "WHERE received >= ? ORDER BY received, seq LIMIT 1), 9223372036854775807) ")
            params += (received_from,)
        return conn.execute(sql + "ORDER BY seq LIMIT ?", params + (limit,)).fetchall()

    async def open(self) -> None:
        """Nothing to open: connections are made per thread on first use."""

    async def close(self) -> None:
        self._queries.close()

    def _refuse(self, *_args: object, **_kwargs: object) -> None:
        raise RuntimeError("a replay never writes the event log")

    append = prune = prune_deliveries = _refuse  # type: ignore[assignment]

    def save_cursor(self, name: str, seq: int) -> None:
        """A replay keeps no cursor in the file it reads."""

    def add_listener(self, fn: object) -> None:
        """Nothing is appended, so there is nothing to listen to."""

    async def read(self, after_seq: int, limit: int) -> list[Event]:
        return list(read_events(self._queries._conn(), after_seq, self.snapshot, limit))

    async def last_seq(self) -> int:
        return self.snapshot

    async def load_cursor(self, name: str) -> int:
        return 0

    async def describe(self) -> dict:
        return {"backend": self.backend, "location": self.location, "last_seq": self.snapshot}


@functools.lru_cache(maxsize=65536)
def _shared_json(text: str) -> Any:
    """A map column's JSON, parsed once per distinct text: the replay's events are read-only
    (the runner and the projection only read their maps), so equal texts share one dict."""
    return json.loads(text)


def read_events(conn: sqlite3.Connection, after_seq: int, upto: int, limit: int) -> list[Event]:
    """Up to `limit` events after `after_seq`, never past `upto`, in seq order."""
    rows = conn.execute("SELECT * FROM events WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                        (after_seq, upto, limit)).fetchall()
    return [decode_row(row, _shared_json) for row in rows]


class LogSource:
    """A log file to replay: its events in log order, up to the snapshot taken at opening."""

    def __init__(self, path: str, cleanup: str | None = None) -> None:
        check_log_file(path)
        self.path = os.path.abspath(path)
        self._cleanup = cleanup
        self._conn = connect_read_only(self.path)
        row = self._conn.execute("SELECT max(seq) FROM events").fetchone()
        self.snapshot: int = row[0] or 0

    def log(self) -> ReadOnlyLog:
        """A fresh read side for one runtime (each runtime's helpers get their own connections)."""
        return ReadOnlyLog(self.path, self.snapshot)

    def bounds(self, selection: Selection) -> tuple[int, int]:
        """(seq before the first selected event, last seq that may be selected)."""
        first = 0
        if selection.start is not None:
            first = self.first_seq_from(selection.start) - 1
        last = self.snapshot
        if selection.end is not None:
            last = min(last, self.first_seq_from(selection.end) - 1)
        return first, last

    def first_seq_from(self, when: float) -> int:
        """The first seq received at or after `when` (snapshot + 1 when none): the helpers'
        horizon for a background function running at `when`."""
        row = self._conn.execute(
            "SELECT seq FROM events INDEXED BY ix_events_received WHERE received >= ? AND seq <= ? "
            "ORDER BY received, seq LIMIT 1", (when, self.snapshot)).fetchone()
        return row[0] if row else self.snapshot + 1

    def first_received(self, selection: Selection) -> float | None:
        """When the first selected event was received (where the virtual clock starts)."""
        for batch in self.batches(selection, limit=1):
            return batch[0].received
        return None

    def batches(self, selection: Selection, limit: int = READ_CHUNK) -> Iterator[list[Event]]:
        """The selected events in log order, `limit` at a time."""
        after, last = self.bounds(selection)
        logins = set(selection.logins)
        while after < last:
            events = read_events(self._conn, after, last, limit)
            if not events:
                return
            after = events[-1].seq
            if logins:
                events = [event for event in events if event.report.login in logins]
                if not events:
                    continue
            yield events

    def count(self, selection: Selection) -> int | None:
        """How many events the selection holds (the progress bar's total; None: unknown)."""
        after, last = self.bounds(selection)
        if selection.logins:
            marks = ",".join("?" * len(selection.logins))
            row = self._conn.execute(
                f"SELECT count(*) FROM events WHERE seq > ? AND seq <= ? AND login IN ({marks})",
                (after, last, *selection.logins)).fetchone()
            return row[0]
        return max(0, last - after)

    def close(self) -> None:
        self._conn.close()
        if self._cleanup is not None:
            _remove(self._cleanup)


# ------------------------------------------------------------------------ NDJSON exports


def load_events(events: Iterable[Event], path: str) -> int:
    """Write `events` (seq and received as they are) into a new log file at `path`; how many.

    The schema is the daemon's own (a real `SQLiteEventLog` creates and migrates the file), so
    the loaded log is answered by the same SQL as any other.
    """
    import asyncio

    from trackalert.clock import VirtualClock
    from trackalert.eventlog.sqlite import SQLiteEventLog

    async def create() -> None:
        log = SQLiteEventLog(path, VirtualClock())
        await log.open()
        await log.close()

    asyncio.run(create())
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=OFF")
        insert = (f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) "
                  f"VALUES ({', '.join('?' * len(EVENT_COLUMNS))})")
        count = 0
        conn.execute("BEGIN")
        previous = (0, float("-inf"))
        for event in events:
            if event.seq <= previous[0] or event.received < previous[1]:
                raise SourceError(f"event {event.seq} is out of log order (after seq {previous[0]}): "
                                  "seq must increase and received never decrease")
            previous = (event.seq, event.received)
            conn.execute(insert, (event.seq, event.received) + encode_row(event.report, event.delivery_id))
            count += 1
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return count


def open_source(path: str, scratch: str | None = None) -> LogSource:
    """The source at `path`: an SQLite log, or an NDJSON export or Elasticsearch log (a URL)
    loaded into a temporary log."""
    if path.lower().startswith("elasticsearch://"):
        from trackalert.eventlog.es_client import parse_elastic_url

        try:
            where = parse_elastic_url(path).location  # never the credentials
        except ValueError as exc:
            raise SourceError(str(exc)) from None
        return _loaded(where, _elastic_events(path), scratch)
    if not os.path.isfile(path):
        raise SourceError(f"{path}: no such file")
    if not _looks_like_ndjson(path):
        return LogSource(path)
    from trackalert.eventlog.history import read_export

    return _loaded(path, read_export(path), scratch)


def _elastic_events(url: str) -> Iterator[Event]:
    """The events of an Elasticsearch log as of now, in log order (read-only)."""
    from trackalert.eventlog.es_snapshot import ElasticSnapshot, SnapshotError

    try:
        with ElasticSnapshot(url) as snapshot:
            for page in snapshot.events():
                yield from page
    except SnapshotError as exc:
        raise SourceError(str(exc)) from None


def _loaded(path: str, events: Iterable[Event], scratch: str | None) -> LogSource:
    """`events` (of the source at `path`) in a temporary log file, removed on close."""
    from trackalert.eventlog.history import HistoryError

    handle_fd, temporary = tempfile.mkstemp(prefix="trackalert-replay-", suffix=".db", dir=scratch)
    os.close(handle_fd)
    os.unlink(temporary)
    try:
        load_events(events, temporary)
    except BaseException as exc:  # an interrupted load must not leave its copy behind either
        _remove(temporary)
        if isinstance(exc, SourceError) or not isinstance(exc, Exception):
            raise
        # the export's own errors already name the file and line
        raise SourceError(str(exc) if isinstance(exc, HistoryError) else f"{path}: {exc}") from exc
    return LogSource(temporary, cleanup=temporary)


def _looks_like_ndjson(path: str) -> bool:
    """An export starts with `{` once leading blank lines are skipped (the export reader skips
    them too); anything else is left to `check_log_file`, which says what it is not."""
    with open(path, "rb") as handle:
        head = handle.read(NDJSON_SNIFF)
    return not head.startswith(SQLITE_MAGIC) and head.lstrip().startswith(b"{")


def _remove(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(path + suffix)
        except OSError:
            pass
