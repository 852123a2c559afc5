"""The event log interface every backend implements.

The event log is the system of record: a report is acknowledged to wforce only once it is in the
log, and everything downstream (policies, replays, exports) is derived from it. Keeping the
interface small and the same for every backend is what lets one contract test suite vouch for all
of them, and lets the policy runner be written once.
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from trackalert.report import Report

if TYPE_CHECKING:
    from trackalert.eventlog.filters import AsOf, Field, Filter


class EventLogError(Exception):
    """Something is wrong with the event log itself (as opposed to with one report)."""


class EventLogClosed(EventLogError):
    """The log is not open: it was never opened, or it has been closed."""


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
    #: True: this delivery id was stored before, nothing new was stored and `seq` is the original's.
    duplicate: bool


@dataclass(slots=True)
class AppendStats:
    """Plain counters, read by the metrics layer at scrape time (no locking: ints, one writer)."""

    appended_total: int = 0
    duplicates_total: int = 0
    commits_total: int = 0
    last_batch_size: int = 0
    max_batch_size: int = 0
    #: Appends queued but not yet committed (a growing number means the disk cannot keep up).
    pending: int = 0


Listener = Callable[[list[Event]], None]


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

    @abc.abstractmethod
    async def append(self, report: Report, delivery_id: str | None = None) -> Appended:
        """Store `report`; returns only once it is durable.

        With a `delivery_id` the append is idempotent: a delivery id seen before (within the
        delivery window) stores nothing and returns the original seq with ``duplicate=True``.
        """

    def submit(self, report: Report, delivery_id: str | None = None) -> "asyncio.Future[Appended]":
        """Like `append`, but returns the future at once (no task per report).

        For callers that forward many appends and answer each from a done-callback, such as the
        core process serving its web workers. Backends may override it with a cheaper path.
        """
        return asyncio.ensure_future(self.append(report, delivery_id))

    @abc.abstractmethod
    def add_listener(self, fn: Listener) -> None:
        """Call `fn` on the event-loop thread with the new events of every commit, in seq order,
        before the corresponding `append` calls return.

        This hands events to the policy runner in memory, so the normal path never re-reads them.
        """

    @abc.abstractmethod
    async def read(self, after_seq: int, limit: int) -> list[Event]:
        """Up to `limit` events with ``seq > after_seq``, ascending (catch-up after a restart)."""

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

    @abc.abstractmethod
    async def describe(self) -> dict:
        """A summary for the console and logs: backend, location, events, first_seq, last_seq,
        oldest_received, newest_received, size_bytes."""
