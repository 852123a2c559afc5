"""The event log interface every backend implements.

The event log is the system of record: a report is acknowledged to wforce only once it is in the
log, and everything downstream (policies, replays, exports) is derived from it. Keeping the
interface small and the same for every backend is what lets one contract test suite vouch for all
of them, and lets the policy runner be written once.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import json
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from trackalert.eventlog.places import count_near
from trackalert.report import Report, fingerprint, parse_delivery_id

if TYPE_CHECKING:
    from trackalert.eventlog.alerts import AlertStore
    from trackalert.eventlog.filters import AsOf, Field, Filter


class EventLogError(Exception):
    """Something is wrong with the event log itself (as opposed to with one report)."""


class EventLogClosed(EventLogError):
    """The log is not open: it was never opened, or it has been closed."""


class EventLogCorrupt(EventLogError):
    """The stored log is damaged; the message names the file and the ways out."""

    def __init__(self, location: str, detail: str) -> None:
        super().__init__(
            f"event log {location} is corrupt ({detail}); trackalert will not use it. Restore "
            f"it from a backup, or salvage what is readable into a new file with "
            f"`sqlite3 {location} .recover | sqlite3 {location}.recovered` and move that "
            f"file into place (keep the damaged one)."
        )


class SchemaVersionError(EventLogError):
    """The stored schema is one this version of trackalert does not know (usually: newer)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One stored report with what the log added to it."""

    #: Log order: strictly increasing, contiguous for one writer, never reused (even after pruning).
    seq: int
    #: Server time (``clock.time()``) at append; non-decreasing in seq order, so it can be searched.
    received: float
    report: Report
    #: The ``X-Wforce-Delivery`` header value the report came with, if any.
    delivery_id: str | None = None


@dataclass(frozen=True, slots=True)
class Appended:
    """What `EventLog.append` tells the caller."""

    seq: int
    #: True: this delivery (same id, same body) was stored before, nothing new was stored and
    #: `seq` is the original's.
    duplicate: bool


def positional_builder(cls: type) -> Callable[..., Any]:
    """A function that builds the frozen, slotted dataclass `cls` from all its fields' values in
    declaration order, equal to `cls(*values)`.

    Why: a frozen dataclass's generated __init__ stores each field through `object.__setattr__`
    (a global lookup and a call per field, ~11 µs for a Report's 16 on the loaded 2-core box),
    and the core process builds a Report, an Event and an Appended for every durable report.
    This stores the slots through their descriptors instead (~4 µs for a Report, same box).
    Only for classes without `__post_init__` (nothing would run it), with every field passed.
    """
    names = [f.name for f in dataclasses.fields(cls)]
    if hasattr(cls, "__post_init__") or tuple(getattr(cls, "__slots__", ())) != tuple(names):
        raise TypeError(f"{cls.__name__} is not a slotted dataclass without __post_init__")
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    namespace.update({f"_set_{name}": getattr(cls, name).__set__ for name in names})
    body = "".join(f"    _set_{name}(_o, {name})\n" for name in names)
    exec(f"def build({', '.join(names)}):\n    _o = _new(_cls)\n{body}    return _o\n", namespace)
    build: Callable[..., Any] = namespace["build"]
    build.__doc__ = f"{cls.__name__}(*values), without the frozen __init__'s per-field calls."
    return build


#: Event(seq, received, report, delivery_id) and Appended(seq, duplicate), for the hot paths.
new_event: Callable[[int, float, Report, "str | None"], Event] = positional_builder(Event)
new_appended: Callable[[int, bool], Appended] = positional_builder(Appended)


@dataclass(frozen=True, slots=True)
class AppendFailure:
    """Why the log is not taking appends right now (e.g. a full disk); readiness reports it."""

    #: Server time (``clock.time()``) of the first failure since the last successful commit.
    since: float
    error: str


@dataclass(slots=True)
class AppendStats:
    """Plain counters, read by the metrics layer at scrape time (no locking: ints, one writer)."""

    appended_total: int = 0
    duplicates_total: int = 0
    #: Appends whose delivery id was stored before with another body, hence stored as new reports.
    delivery_id_collisions_total: int = 0
    commits_total: int = 0
    last_batch_size: int = 0
    max_batch_size: int = 0
    #: Appends queued but not yet committed (a growing number means the disk cannot keep up).
    pending: int = 0


Listener = Callable[[list[Event]], None]

#: A delivery as the log keys it: (delivery id, fingerprint of the body it came with).
DeliveryKey = tuple[str, bytes]

_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False).encode


def delivery_key(
    report: Report, delivery_id: str | None, body_fingerprint: bytes | None
) -> DeliveryKey | None:
    """How every backend keys an append for idempotence (DESIGN §3).

    A blank id is no id. A caller that had the raw body passes its `fingerprint`; one that never
    had one (an import, a test) gets the fingerprint of the report itself, so that appending the
    same report twice under one id is still recognised as a retry.
    """
    delivery_id = parse_delivery_id(delivery_id)
    if delivery_id is None:
        return None
    if body_fingerprint is None:
        body_fingerprint = fingerprint(_canonical(report.to_json_dict()).encode("utf-8"))
    return delivery_id, body_fingerprint


#: A report as recentReports returns it, as a row (EventQueries.recent_rows), in the order
#: trackalert.lua.convert reads it: no `extra` nor delivery id, flags as 0/1 and the JSON maps
#: as text (Lua decodes each distinct text once; most rows repeat a handful of them).
REPORT_COLUMNS = ("seq", "received", "t", "remote", "login", "pwhash", "success", "policy_reject",
                  "protocol", "tls", "device_id", "session_id", "fail_type", "attrs", "attrs_mv",
                  "device_attrs", "country", "city", "latitude", "longitude", "asn", "isp")


#: The columns of a place, latitude and longitude.
_PLACE_COLUMNS = (REPORT_COLUMNS.index("latitude"), REPORT_COLUMNS.index("longitude"))


def columns_picker(columns: tuple[int, ...]) -> Callable[[tuple], tuple]:
    """A function taking the values at `columns` of a row, as a tuple (one column too)."""
    if len(columns) == 1:
        only = columns[0]
        return lambda row: (row[only],)
    return operator.itemgetter(*columns)


def report_row(event: Event) -> tuple:
    """An event as a row of REPORT_COLUMNS, for a backend that has only `Event`s to give."""
    r = event.report
    geo = r.geo
    return (
        event.seq, event.received, r.t, r.remote, r.login, r.pwhash, int(r.success),
        int(r.policy_reject), r.protocol, int(r.tls), r.device_id, r.session_id, r.fail_type,
        _json_text(r.attrs), _json_text(r.attrs_mv), _json_text(r.device_attrs),
    ) + ((geo.country, geo.city, geo.latitude, geo.longitude, geo.asn, geo.isp) if geo
         else (None,) * 6)


def _json_text(mapping: Any) -> str | None:
    return json.dumps(dict(mapping)) if mapping else None


#: What `EventLog.read_fields` returns per event (windows.event_fields builds it from an Event).
FIELDS_ROW = ("seq", "received", "login", "success", "ip", "pwhash", "country", "protocol", "asn",
              "device_attrs", "attrs")


class EventQueries(abc.ABC):
    """The long-term helpers' questions (DESIGN §5), answered by a backend.

    Backend-neutral on purpose: a validated `Filter` and an `AsOf` in, plain values out, so the
    Lua layer is written once and every backend must give the same answers. Synchronous: Lua
    calls the helpers from worker threads, never from the event loop.
    """

    @abc.abstractmethod
    def count_reports(self, flt: "Filter", as_of: "AsOf") -> int:
        """How many events match."""

    @abc.abstractmethod
    def count_distinct(self, field: "Field", flt: "Filter", as_of: "AsOf") -> int:
        """How many distinct non-empty values `field` has over the matching events."""

    @abc.abstractmethod
    def top_values(self, field: "Field", flt: "Filter", n: int, as_of: "AsOf") -> list[tuple[Any, int]]:
        """The `n` most frequent values of `field` with their counts, most frequent first
        (ties by value, ascending)."""

    @abc.abstractmethod
    def first_seen(self, flt: "Filter", as_of: "AsOf") -> float | None:
        """When the first matching event was received, or None."""

    @abc.abstractmethod
    def last_seen(self, flt: "Filter", as_of: "AsOf") -> float | None:
        """When the last matching event was received, or None."""

    @abc.abstractmethod
    def recent_reports(self, flt: "Filter", n: int, as_of: "AsOf") -> list[Event]:
        """Up to `n` matching events, newest first."""

    def recent_rows(self, flt: "Filter", n: int, as_of: "AsOf") -> list[tuple]:
        """`recent_reports` as rows of REPORT_COLUMNS, the form recentReports() builds its Lua
        tables from; a backend may read just those columns (SQLite does)."""
        return [report_row(event) for event in self.recent_reports(flt, n, as_of)]

    def recent_columns(self, flt: "Filter", n: int, as_of: "AsOf",
                       columns: tuple[int, ...]) -> list[tuple]:
        """`recent_rows` holding just the REPORT_COLUMNS at `columns` (recentReports' `fields`);
        a backend may read just those (SQLite's login index holds the places: no table read)."""
        pick = columns_picker(columns)
        return [pick(row) for row in self.recent_rows(flt, n, as_of)]

    def count_near(self, flt: "Filter", n: int, latitude: float, longitude: float, km: float,
                   enough: int | None, as_of: "AsOf") -> int:
        """How many of the newest `n` matching events were located closer than `km` to the
        point, counting up to `enough` (countNear); a backend may count where it reads (SQLite
        does, in one query)."""
        return count_near(self.recent_columns(flt, n, as_of, _PLACE_COLUMNS),
                          latitude, longitude, km, enough)

    def close(self) -> None:
        """Release connections (called by the event log's close)."""


class EventLog(abc.ABC):
    """An append-only, durable, ordered log of reports.

    Appends are group-committed by the backend: callers simply ``await append(...)`` concurrently
    and the backend decides how many go into one commit.
    """

    backend: str
    location: str
    stats: AppendStats

    @abc.abstractmethod
    async def open(self) -> None:
        """Create or migrate the storage and start the writer."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Commit everything pending (appends and cursors), stop the writer. Safe to call twice."""

    #: Set while appends fail (the last commit failed), None once a commit succeeds again.
    failure: AppendFailure | None = None

    @abc.abstractmethod
    async def append(
        self, report: Report, delivery_id: str | None = None, fingerprint: bytes | None = None
    ) -> Appended:
        """Store `report`; returns only once it is durable.

        With a `delivery_id` the append is idempotent: the same delivery id *with the same body*
        (`fingerprint`, see `delivery_key`) seen before (within the delivery window) stores
        nothing and returns the original seq with ``duplicate=True``. The same id with another
        body is another report: it is stored, and counted as a collision. A blank id is no id.
        A report that cannot be stored raises ReportError, and fails alone.
        """

    def submit(
        self, report: Report, delivery_id: str | None = None, fingerprint: bytes | None = None
    ) -> "asyncio.Future[Appended]":
        """Like `append`, but returns the future at once (no task per report).

        For callers that forward many appends and answer each from a done-callback, such as the
        core process serving its web workers. Backends may override it with a cheaper path.
        """
        return asyncio.ensure_future(self.append(report, delivery_id, fingerprint))

    def submit_rows(
        self, appends: list[tuple], done: Callable[[list[Appended | Exception]], None]
    ) -> None:
        """Append (row, report, delivery key or None) items, encoded beforehand by the SQLite row
        codec (`eventlog.rows.encode_row`), and call `done` once with every outcome in order.

        A backend that stores its own form rebuilds nothing from the row: this default appends
        the reports. The SQLite backend overrides it to insert the rows as they are.
        """
        futures = [self.submit(report, *(key or (None, None))) for _row, report, key in appends]

        def gathered(outcome: "asyncio.Future[list[Any]]") -> None:
            done(outcome.result())

        asyncio.gather(*futures, return_exceptions=True).add_done_callback(gathered)

    @abc.abstractmethod
    def add_listener(self, fn: Listener) -> None:
        """Call `fn` on the event-loop thread with the new events of every commit, in seq order,
        before the corresponding `append` calls return.

        This hands events to the policy runner in memory, so the normal path never re-reads them.
        """

    @abc.abstractmethod
    async def read(self, after_seq: int, limit: int) -> list[Event]:
        """Up to `limit` events with ``seq > after_seq``, ascending (catch-up after a restart)."""

    async def read_stored(self, after_seq: int, limit: int) -> "list[Any]":
        """`read` for the policy runner: events it judges as they are (rows.StoredEvent where
        the backend has a narrow read, else `Event`s), without decoding what it never looks at."""
        return await self.read(after_seq, limit)

    def read_fields(self, after_seq: int, limit: int, received_from: float | None = None) -> list[tuple]:
        """Up to `limit` events with ``seq > after_seq`` (and, with `received_from`, received at
        or after it), ascending, as `FIELDS_ROW` tuples.

        Synchronous and narrow on purpose: the window projection (eventlog/windows.py) reads
        the log in chunks from the policy runner's thread, between two Lua calls, and only
        needs the columns the helpers filter on.
        """
        raise NotImplementedError(f"the {self.backend} event log has no narrow read")

    def count_fields(self, after_seq: int, upto_seq: int, columns: tuple[int, ...]) -> dict[tuple, int]:
        """The events with ``after_seq < seq <= upto_seq`` grouped by the `FIELDS_ROW` columns at
        `columns`: each distinct tuple of their values (in that order), and how many events
        have it.

        Why: building a window projection over millions of events one row at a time in Python
        costs minutes; grouped first, each distinct tuple is added once with its count. A
        backend without it (the default) is built row by row from `read_fields`.
        """
        raise NotImplementedError(f"the {self.backend} event log has no grouped count")

    def projection_snapshot(self) -> str | None:
        """Where the window projection keeps its counts between runs (eventlog/snapshot.py): a
        file beside the log, or None where there is no such place (the default)."""
        return None

    def single_writer(self) -> bool:
        """Whether this process is the log's only writer, so that a projection kept from the
        events it judges (eventlog/windows.py) counts exactly what a query as of them would.
        A log several nodes share says False as soon as another node wrote in between."""
        return True

    def foreign_source(self) -> Any:
        """What the window projection reads the other writers' events from (a
        `foreign.ForeignSource`), on a log several nodes share; None where this process is the
        only writer there can be."""
        return None

    def seq_after(self, seq: int) -> int:
        """The seq of the event the policy runner runs after `seq`, when known: the next one;
        on a log several nodes share, this node's next one past the other nodes' blocks."""
        return seq + 1

    @abc.abstractmethod
    async def last_seq(self) -> int:
        """The highest seq ever committed; 0 for a log that never held an event."""

    @abc.abstractmethod
    async def load_cursor(self, name: str) -> int:
        """The last seq saved for consumer `name`; 0 if never saved."""

    @abc.abstractmethod
    def save_cursor(self, name: str, seq: int) -> None:
        """Remember consumer `name`'s position without waiting.

        Persisted with the next write (or within about a second when nothing is written), and by
        `close`. A consumer re-processes at most the events after its last persisted cursor.
        """

    @abc.abstractmethod
    async def prune(self, older_than: float, chunk: int = 5000) -> int:
        """Delete events with ``received < older_than`` in chunks; returns how many were deleted."""

    @abc.abstractmethod
    async def prune_deliveries(self, older_than: float, chunk: int = 5000) -> int:
        """Forget delivery ids recorded before `older_than` (the end of the retry window)."""

    def queries(self) -> EventQueries:
        """The long-term helpers' query engine for this log (while it is open)."""
        raise NotImplementedError(f"the {self.backend} event log does not answer long-term queries")

    def alerts(self) -> "AlertStore":
        """Where this log keeps the alerts policies send (eventlog/alerts.py), while it is open."""
        raise NotImplementedError(f"the {self.backend} event log keeps no alerts")

    @abc.abstractmethod
    async def describe(self) -> dict:
        """A summary for the console and logs: backend, location, events, first_seq, last_seq,
        oldest_received, newest_received, size_bytes."""
