"""Sliding-window counts kept in lockstep with the policy runner: the starter helpers in O(1).

Why it exists: the starter policies ask, on every report, questions such as "how many distinct
logins failed from this address in the last hour?". On a busy log the SQL answer scans every
matching row of the window (10^4..10^6 rows for one attacking address), so a policy ran tens of
events per second. This projection answers the same questions from counters.

How it stays exact (the SQL path, eventlog/queries.py, is the reference):

* A *shape* is a helper call's filter made only of equality keys (login, remote, netmask,
  pwhash, country, protocol, asn, device_attrs.<k>, attrs.<k>), `success` and `window`, plus the
  counted field for countDistinct. Per shape and per key tuple (the values of those keys in an
  event) it keeps a count, or the occurrences of each counted value (distinct = their number).
  Values are compared as the SQL does: addresses by their `ip` key, a netmask as the address
  masked to its bits (and of its family), NULL never equal, map values only when JSON strings.
* Two cursors per window W, no memory per event: the *head* adds each event right after the
  runner ran `report` on it; the *tail* reads the log in seq order (a narrow read, in chunks)
  and subtracts every event received before ``now - W``, now being the received time of the
  event being judged: exactly the SQL's seq range, ties included.
* As of: the runner judges one event at a time, in log order, in one thread; a helper answers
  from here only inside that report call (`judging` is its seq, all events before it applied,
  none after). Anything else goes to SQL.
* A shape is registered on first use and built by a background thread from the log, then
  handed to the runner thread, which catches it up the last few events and switches it on
  between two events. Until then SQL answers. The bulk of a build is counted by groups
  (`EventLog.count_fields`: the distinct tuples of the columns its shapes read, with their
  counts, each added once), then the head and tail cursors go on from there row by row; the
  shortest pending window is built first (seconds), the longest (minutes over 10M events)
  last.
* Restarts: at a graceful stop the runner saves the windows switched on (their counts, head
  and tail) beside the log (snapshot.py; where the backend has a place for it); the next start
  hands them to the builder thread as builds already done up to the snapshot's head, caught
  up from there and switched on as any build. A snapshot that is not this log's (or is
  truncated, or counts rows retention pruned, or is ahead of the runner) is ignored.
* Retention: before every batch the runner looks at the oldest stored event; should pruning
  have removed events a window still counts (the oldest is beyond its tail), the window's
  shapes are dropped and rebuilt from what the log still holds (SQL answers meanwhile), so
  pruned events are never counted. A prune landing inside a batch is seen at the next one;
  the SQL answer itself depends on which side of that prune it ran.
* Other writers: the head adds the events this runner judges. On a log several nodes share
  (`EventLog.single_writer` turns False), a feed (foreign.py) hands it the other nodes' events
  below the event being judged as they become searchable, and the tails and builds read the
  log only where the feed has decided what counts (its stable mark); foreign.py says why that
  keeps what a tail subtracts equal to what was added. A window whose tail would have to
  expire events past the stable mark answers by query for that event (`_lagging`). A log with
  other writers but no feed: the queries answer.
* Memory: per shape, the keys and distinct values present in its window (`describe`), at most
  MAX_SHAPES shapes; the tails hold one chunk of narrow rows each.

The runner drives recentReports' and lastSeen's newest rows per key (recent.py) from here too:
the same begin/finish, the same retention check, the same "only inside that report" rule.
"""

from __future__ import annotations

import bisect
import collections
import heapq
import logging
import operator
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

from trackalert.eventlog.base import FIELDS_ROW, Event, EventLog, EventQueries, columns_picker
from trackalert.eventlog.bound import BoundFilter, as_filter, plan_of
from trackalert.eventlog.filters import AsOf, Field, Filter
from trackalert.eventlog.foreign import FeedOverflow, ForeignFeed
from trackalert.eventlog.keys import (ASN, COUNTRY, IP, LOGIN, PROTOCOL, PWHASH, RECEIVED, SEQ,
                                      SUCCESS, Row, equality_keys, event_fields, key_function,
                                      spec_column, spec_extractor)
from trackalert.eventlog import snapshot
from trackalert.eventlog.recent import BOUND, NOT_ANSWERED, Answer, RecentProjection

logger = logging.getLogger("trackalert")

#: Rows read from the log at a time by a cursor.
CHUNK = 5000
#: A building shape this close to the runner is handed over to the runner thread to finish.
NEAR = 1000
#: Rows a tail looks at one by one before it bisects (it expires about one row per event).
SCAN = 8
#: Events a grouped count (`EventLog.count_fields`) covers at a time: each is one statement,
#: so that a build neither holds one read transaction open for minutes (the WAL could not be
#: checkpointed past it) nor keeps a stopping daemon waiting, and the distinct tuples held at
#: once stay bounded (a key of unique values). 1,000,000 cost ~10 % less CPU over 1M events.
GROUP_ROWS = 250_000
#: A build counts by groups only past this many events (below it, reading the rows is as quick).
GROUP_MIN = 20_000
#: Shapes kept at most (a policy building windows from data must not grow memory without end).
MAX_SHAPES = 64

#: (equality key specs, success, window seconds, counted field or None for countReports)
ShapeId = tuple[tuple[str, ...], "bool | None", float, "str | None"]

_COUNTED_COLUMNS = {"login": LOGIN, "remote": IP, "pwhash": PWHASH, "country": COUNTRY,
                    "protocol": PROTOCOL, "asn": ASN}


# ------------------------------------------------------------------------ filters -> shapes


def cover(flt: Filter | BoundFilter, counted: Field | None) -> tuple[ShapeId, tuple] | None:
    """The shape answering `flt` and the key tuple to look up, or None when it is not covered."""
    if flt.window is None or flt.since is not None or flt.until is not None:
        return None
    if counted is not None and counted.name not in _COUNTED_COLUMNS and counted.kind != "prefix":
        return None
    specs, values = equality_keys(flt)
    return (specs, flt.success, flt.window, counted.name if counted else None), values


#: topValues' fields answered from a shape: those whose counted values are SQL's values (not
#: `remote`: SQL counts its text, which a stored row may have without an address key).
_TOP_VALUES = frozenset(("login", "pwhash", "country", "protocol", "asn"))


def _by_count_then_value(item: tuple[Any, int]) -> tuple[int, Any]:
    return -item[1], item[0]


def _columns_read(shape_id: ShapeId) -> set[int]:
    """The `FIELDS_ROW` positions a shape's key, `success` and counted value are read from."""
    specs, _, _, counted = shape_id
    read = {SUCCESS} | {spec_column(spec) for spec in specs}
    if counted is not None:
        read.add(IP if counted.startswith("remote") else _COUNTED_COLUMNS[counted])
    return read


def _counted(name: str) -> Callable[[Row], Any]:
    if name.startswith("remote/"):
        size = 1 + int(name[len("remote/"):]) // 8  # SQL: substr(ip, 1, 1 + bits / 8)
        return lambda row: row[IP][:size] if row[IP] is not None else None
    index = _COUNTED_COLUMNS[name]
    return lambda row: row[index]


# ------------------------------------------------------------------------ one shape


class Shape:
    """The counts of one shape over the events of its window (added minus expired)."""

    def __init__(self, shape_id: ShapeId) -> None:
        self.id = shape_id
        specs, self.success, self.window, counted = shape_id
        self._key = key_function(specs)
        self._value = _counted(counted) if counted else None
        self.counts: dict[tuple, Any] = {}

    def _keyed(self, rows: Iterable[Row]) -> Iterator[tuple[tuple, Row]]:
        """(key tuple, row) of the rows this shape counts (a tight loop: builds see millions)."""
        success, key_of = self.success, self._key
        for row in rows:
            if success is not None and row[SUCCESS] != success:
                continue
            key = key_of(row)
            if key is not None:
                yield key, row

    # add_all/remove_all count many rows in one loop: a call per row made the builds of 10M
    # events ~35 % slower (bench/policy_helpers_bench.py)
    def add_all(self, rows: Iterable[Row]) -> None:
        counts, value_of = self.counts, self._value
        if value_of is None:
            for key, _ in self._keyed(rows):
                counts[key] = counts.get(key, 0) + 1
            return
        for key, row in self._keyed(rows):
            value = value_of(row)
            if value is None:  # count(DISTINCT x) ignores NULL
                continue
            seen = counts.get(key)
            if seen is None:
                counts[key] = {value: 1}
            else:
                seen[value] = seen.get(value, 0) + 1

    def remove_all(self, rows: Iterable[Row]) -> None:
        counts, value_of = self.counts, self._value
        if value_of is None:
            for key, _ in self._keyed(rows):
                left = counts[key] - 1
                if left:
                    counts[key] = left
                else:
                    del counts[key]
            return
        for key, row in self._keyed(rows):
            value = value_of(row)
            if value is None:
                continue
            seen = counts[key]
            left = seen[value] - 1
            if left:
                seen[value] = left
            elif len(seen) > 1:
                del seen[value]
            else:
                del counts[key]

    def add_group(self, row: Row, n: int) -> None:
        """Count `n` events equal to `row` in every column this shape reads (a group of
        `EventLog.count_fields`): what `add_all` of `n` such rows would do."""
        if self.success is not None and row[SUCCESS] != self.success:
            return
        key = self._key(row)
        if key is None:
            return
        counts = self.counts
        if self._value is None:
            counts[key] = counts.get(key, 0) + n
            return
        value = self._value(row)
        if value is None:
            return
        seen = counts.get(key)
        if seen is None:
            counts[key] = {value: n}
        else:
            seen[value] = seen.get(value, 0) + n

    def answer(self, key: tuple) -> int:
        if None in key:
            return 0
        found = self.counts.get(key)
        if found is None:
            return 0
        return found if self._value is None else len(found)

    def top(self, key: tuple, n: int) -> list[tuple[Any, int]]:
        """The `n` most frequent counted values of `key`, as SQL's topValues orders them
        (count descending, then value)."""
        seen = None if None in key else self.counts.get(key)
        if not seen or n <= 0:
            return []
        return heapq.nsmallest(n, seen.items(), key=_by_count_then_value)

    def size(self) -> tuple[int, int]:
        """(key tuples, distinct pairs) held: what the memory of this shape grows with."""
        if self._value is None:
            return len(self.counts), 0
        return len(self.counts), sum(len(seen) for seen in self.counts.values())


def head_adder(shapes: list[Shape]) -> Callable[[Row], None]:
    """`add` of one row to every shape of `shapes`, in one function: each key spec's value is
    read from the row once for all of them (a failed login's /24 network keys four shapes), and
    no call is made per shape. The head runs it on every event judged; what it counts is
    exactly what `Shape.add_all` counts (the builds' path), a key with a NULL part counting
    nothing.
    """
    specs = list(dict.fromkeys(spec for shape in shapes for spec in shape.id[0]))
    extractors = [spec_extractor(spec) for spec in specs]
    plan = []
    for shape in shapes:
        at = [specs.index(spec) for spec in shape.id[0]]
        if not at:
            get = None
        elif len(at) == 1:
            get = operator.itemgetter(at[0])
        else:
            get = operator.itemgetter(*at)
        plan.append((shape, get, len(at) == 1, shape._value))

    def add(row: Row) -> None:
        values = [extract(row) for extract in extractors]
        for shape, get, single, value_of in plan:
            if get is None:
                key: Any = ()
            elif single:
                key = get(values)
                if key is None:
                    continue
                key = (key,)
            else:
                key = get(values)
                if None in key:
                    continue
            counts = shape.counts
            if value_of is None:
                counts[key] = counts.get(key, 0) + 1
                continue
            value = value_of(row)
            if value is None:  # count(DISTINCT x) ignores NULL
                continue
            seen = counts.get(key)
            if seen is None:
                counts[key] = {value: 1}
            else:
                seen[value] = seen.get(value, 0) + 1

    return add


# ------------------------------------------------------------------------ reading the log


class Cursor:
    """Reads the log forward from a seq, in chunks (pruning under it is `check_retention`'s).

    Hands rows out in runs (lists), found by bisection: the builder goes through millions of
    rows, the runner's tails through a few per event.
    """

    def __init__(self, read: Callable[[int, int], list[Row]], after: int) -> None:
        self._read = read
        self.after = after  # the last row taken
        self._rows: list[Row] = []
        self._next = 0  # index in _rows of the first row not taken

    def _ready(self) -> bool:
        if self._next >= len(self._rows):
            self._rows, self._next = self._read(self.after, CHUNK), 0
        return self._next < len(self._rows)

    def _take(self, end: int) -> list[Row]:
        run = self._rows[self._next:end]
        if run:
            self._next = end
            self.after = run[-1][SEQ]
        return run

    def take_while_before(self, threshold: float, upto: int) -> Iterator[list[Row]]:
        """Runs of the rows received before `threshold` with seq <= `upto`, in seq order."""
        while self.after < upto and self._ready():
            rows, start = self._rows, self._next
            end = min(bisect.bisect_left(rows, threshold, start, key=_received),
                      bisect.bisect_right(rows, upto, start, key=_seq))
            run = self._take(end)
            if run:
                yield run
            if end < len(rows):
                return

    def take_before(self, threshold: float, upto: int) -> list[Row]:
        """`take_while_before`'s rows in one list, for the runner's tails: a few rows per event,
        so a short scan finds them (bisection only for longer runs)."""
        rows, start = self._rows, self._next
        if start < len(rows):  # most events expire nothing: one look at the next row
            row = rows[start]
            if row[RECEIVED] >= threshold or row[SEQ] > upto:
                return []
        taken: list[Row] = []
        while self.after < upto and self._ready():
            rows, start = self._rows, self._next
            end, j = len(rows), start
            while j < end and j - start < SCAN:
                row = rows[j]
                if row[RECEIVED] >= threshold or row[SEQ] > upto:
                    break
                j += 1
            else:
                if j < end:
                    j = min(bisect.bisect_left(rows, threshold, j, key=_received),
                            bisect.bisect_right(rows, upto, j, key=_seq))
            taken += self._take(j)
            if j < end:
                break
        return taken

    def skip_to(self, seq: int) -> None:
        """Go on after `seq` (the caller took the rows up to it another way)."""
        self.after, self._rows, self._next = seq, [], 0

    def take_upto(self, upto: int) -> Iterator[list[Row]]:
        """Runs of the rows with seq <= `upto`."""
        while self.after < upto and self._ready():
            rows = self._rows
            end = bisect.bisect_right(rows, upto, self._next, key=_seq)
            run = self._take(end)
            if run:
                yield run
            if end < len(rows):
                return


_seq = operator.itemgetter(SEQ)
_received = operator.itemgetter(RECEIVED)


@dataclass
class _Window:
    seconds: float
    tail: Cursor
    shapes: list[Shape] = field(default_factory=list)


@dataclass
class _Build:
    """Shapes being built by the builder thread, with their own head and tail cursors."""

    seconds: float
    shapes: list[Shape]
    head: Cursor
    tail: Cursor
    generation: int
    started: float


# ------------------------------------------------------------------------ the projection


class WindowProjection:
    """All shapes, the runner's position in the log, and the builder thread."""

    def __init__(self, log: EventLog, feed_interval: float | None = None,
                 feed_monotonic: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self._feed_interval, self._feed_monotonic = feed_interval, feed_monotonic
        self._raw_read = log.read_fields
        #: what the cursors read: the log, or on a shared log only what the feed decided
        self._read = log.read_fields
        self._count = log.count_fields if type(log).count_fields is not EventLog.count_fields else None
        self._single_writer = log.single_writer
        #: the other nodes' events (foreign.py), once another node writes into the log
        self._feed: ForeignFeed | None = None
        #: windows whose tails cannot expire all they should before the event being judged
        self._lagging: set[float] = set()
        self._snapshot = log.projection_snapshot()  # where the counts are saved, or None
        self._restoring: list[_Build] = []  # windows loaded from it, for the builder to catch up
        self._off_for_good = False  # another node writes into the log: the queries answer
        self.position = 0  # every event with seq <= position is applied
        self._at: tuple[int, float | None] = (0, None)  # (position, its received): one read
        #: seq of the event whose report is running (helpers answer only for it), or None
        self.judging: int | None = None
        self._windows: dict[float, _Window] = {}
        #: success -> head_adder of every shape counting events of it, made on first use and
        #: emptied when a shape goes on or off: the head's work, per event
        self._adders: dict[Any, Callable[[Row], None]] = {}
        self._active: dict[ShapeId, Shape] = {}
        self._pending: dict[ShapeId, None] = {}
        self._building: set[ShapeId] = set()
        self._near: list[_Build] = []
        self._generation = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._settled = threading.Event()  # nothing left for the builder thread to do
        self._settled.set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._queries: ProjectedQueries | None = None
        #: (helper, "projection" | "sql") -> calls inside report(lt)
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()
        #: recentReports/lastSeen's newest rows per key (recent.py), driven from here
        self.recent = RecentProjection(self.calls)
        self._judged: tuple[int, float] = (0, 0.0)  # (seq, received) of `judging`

    @staticmethod
    def supports(log: EventLog) -> bool:
        """Whether `log`'s backend has the narrow read this projection is built from."""
        return type(log).read_fields is not EventLog.read_fields

    # -- the runner's side (its thread)

    def start_at(self, position: int) -> None:
        """Where the runner resumes: every event up to `position` has been judged."""
        self.position = position
        self._at = (position, None)
        if self._snapshot is not None:
            path, self._snapshot = self._snapshot, None  # once, at the first start
            try:
                self._restore(path, position)
            except Exception:
                logger.exception("projection: restoring the snapshot %s failed", path)
            self._snapshot = path

    def _restore(self, path: str, position: int) -> None:
        """Load the saved windows (snapshot.py) for the builder thread to catch up from the
        snapshot's head and tail to the runner, as it does a build."""
        loaded = snapshot.load(path, position, self._read)
        if loaded is None:
            return
        saved_at, saved = loaded
        builds = []
        for seconds, tail, _, counted in saved:
            shapes = []
            for shape_id, counts in counted:
                shape = Shape(shape_id)
                shape.counts = counts
                shapes.append(shape)
            builds.append(_Build(seconds, shapes, Cursor(self._read, saved_at),
                                 Cursor(self._read, tail), self._generation, time.monotonic()))
        with self._lock:
            for build in builds:
                self._building.update(shape.id for shape in build.shapes)
            self._restoring.extend(builds)
            self._settled.clear()
            self._start_builder()
        self._wake.set()
        logger.info("projection: %d window(s) restored from %s (saved at event %d), catching up "
                    "to event %d", len(builds), path, saved_at, position)

    def save(self) -> None:
        """Write the windows switched on to the snapshot file (at shutdown, the runner's thread
        idle): the next start catches them up instead of building. No window on, no write (an
        older snapshot, still good, stays)."""
        if self._snapshot is None or self._off_for_good or not self._windows:
            return
        position, saved = self.position, []
        for window in self._windows.values():
            tail = window.tail.after
            first = snapshot.mark(self._read, tail + 1) if tail < position else None
            if tail < position and first is None:
                continue  # pruned under it: not worth keeping
            saved.append((window.seconds, tail, first,
                          [(shape.id, shape.counts) for shape in window.shapes]))
        head = snapshot.mark(self._read, position) if position else None
        if not saved or (position and head is None):
            return
        started = time.monotonic()
        snapshot.save(self._snapshot, position, head, saved)
        logger.info("projection: %d window(s) saved to %s at event %d in %.2f s", len(saved),
                    self._snapshot, position, time.monotonic() - started)

    def begin(self, event: Event) -> None:
        """Before `report` on `event`: shapes switched on, tails expired to its window.

        Should the log be unreadable here, every shape is dropped (SQL answers, and will say
        what is wrong) and rebuilt later: a half-expired window must never answer.
        """
        if self._feed is None and not self._single_writer():
            source = self._log.foreign_source()
            if source is None:
                self._off()
                return
            self._follow_nodes(source)
        try:
            if self._feed is None:
                self._begin(event)
            else:
                self._begin_shared(event, self._feed)
        except FeedOverflow as exc:
            logger.info("projection: %s; rebuilding every shape from the log", exc)
            self._reset(event.seq - 1)
        except Exception as exc:
            if self._feed is None:
                logger.exception("projection: reading the event log failed; rebuilding every shape")
            elif self._feed.failed():
                logger.error("projection: the event log did not answer (%s: %s); every shape is "
                             "dropped and the queries answer until they are rebuilt",
                             type(exc).__name__, exc)
            self._reset(event.seq - 1)
        self.judging = event.seq
        self._judged = (event.seq, event.received)

    def _begin(self, event: Event) -> None:
        if event.seq != self.position + 1:
            self._reset(event.seq - 1)
        if self._near:
            self._install_near(event)
        for window in self._windows.values():
            expired = window.tail.take_before(event.received - window.seconds, self.position)
            if expired:
                for shape in window.shapes:
                    shape.remove_all(expired)

    def _follow_nodes(self, source: Any) -> None:
        """Another node writes into the log: follow its events from now on (foreign.py),
        rebuilding every shape with the feed's reads."""
        self._feed = ForeignFeed(source, self._feed_monotonic, self._feed_interval)
        self._read = self._feed.read_stable(self._raw_read)
        logger.info("projection: another node writes into the event log; the projection adds "
                    "its events as they become searchable (polled every %g s)", self._feed.interval)
        self._reset(self.position)

    def _begin_shared(self, event: Event, feed: ForeignFeed) -> None:
        """`_begin` on a shared log: the other nodes' events below `event` are added first."""
        self._lagging.clear()
        if event.seq != self.position + 1 and event.seq != self._log.seq_after(self.position) \
                and (event.seq <= self.position
                     or feed.source.own_between(self.position, event.seq)):
            self._reset(event.seq - 1)  # own events skipped (pruned, a stuck batch)
        if not feed.ready:
            if not feed.may_start():
                return  # no shape is on: the queries answer
            feed.start(self.position, event.received)
        foreign = feed.absorb(event.seq)
        if foreign and (self._windows or self.recent.shapes):
            for other in foreign:
                self._add(other, late=True)
        if self._near:
            self._install_near(event)
        upto = event.seq - 1
        open_region = feed.stable < upto
        for window in self._windows.values():
            threshold = event.received - window.seconds
            expired = window.tail.take_before(threshold, upto)
            if expired:
                for shape in window.shapes:
                    shape.remove_all(expired)
            if open_region and threshold > feed.stable_received:
                self._lagging.add(window.seconds)

    def _add(self, event: Event, late: bool = False) -> None:
        """The head adds `event` (judged here, or another node's: `late`, maybe below rows
        the recent shapes hold)."""
        row = event_fields(event)
        success = row[SUCCESS]
        add = self._adders.get(success)
        if add is None:
            add = self._adders[success] = self._shape_adders(success)
        add(row)
        if self.recent.shapes:
            self.recent.add(event, row, late)

    def _off(self) -> None:
        """Another node writes into the log (EventLog.single_writer): the events between this
        node's are not the runner's to add, so the queries answer from now on."""
        self.judging = None
        if not self._off_for_good:
            self._off_for_good = True
            self._windows.clear()
            self._adders = {}
            self._active.clear()
            self.recent.clear()
            self.close()

    def finish(self, event: Event) -> None:
        """After `report` on `event`: the head adds it."""
        if self._off_for_good:
            self.position = event.seq
            return
        self.judging = None
        if self._windows or self.recent.shapes:
            self._add(event)
        if self._feed is not None and self._feed.ready:
            self._feed.note_own(event.seq, event.received)
        self.position = event.seq
        self._at = (event.seq, event.received)

    def _shape_adders(self, success: Any) -> Callable[[Row], None]:
        """head_adder of the shapes an event of `success` counts in, in window and shape order."""
        return head_adder([shape for window in self._windows.values() for shape in window.shapes
                           if shape.success is None or shape.success == success])

    def check_retention(self) -> None:
        """Drop windows that count events the log no longer holds, and tell the recent rows
        which are gone (once per batch)."""
        if not self._windows and not self.recent.shapes:
            return
        try:
            rows = self._raw_read(0, 1)
        except Exception:
            logger.exception("projection: reading the event log failed; rebuilding every shape")
            self._reset(self.position)
            return
        oldest = rows[0][SEQ] if rows else self.position + 1
        self.recent.oldest = oldest
        for window in list(self._windows.values()):
            if oldest > window.tail.after + 1 and window.tail.after < self.position:
                self._invalidate(window)

    def answer(self, helper: str, flt: Filter | BoundFilter, counted: Field | None, as_of: AsOf) -> int | None:
        """The projection's answer, or None when SQL must answer (counted in `calls`)."""
        found = self._shape(helper, flt, counted, as_of)
        return None if found is None else found[0].answer(found[1])

    def count_pairs(self, helper: str, pairs: tuple, counted: Field | None, before_seq: int) -> int | None:
        """`answer` for a filter of flat (key, value, ...) pairs as of `before_seq`, without
        building its BoundFilter: the count helpers' common call, made on every report. None
        when the general path must answer (it then does all that `answer` does: not the report
        being judged, keys that make no plan, a filter no shape covers, a shape not on yet,
        a lagging window); a value its key refuses raises the FilterError that path raises."""
        if before_seq != self.judging:
            return None
        plan = plan_of(pairs[::2])
        if plan is None:
            return None
        parsed = plan.parse(pairs[1::2])
        success_at, window_at, since_at, until_at = plan.windowing_at
        window = parsed[window_at] if window_at >= 0 else None
        if window is None or (since_at >= 0 and parsed[since_at] is not None) \
                or (until_at >= 0 and parsed[until_at] is not None):
            return None
        success = parsed[success_at] if success_at >= 0 else None
        if counted is not None and counted.name not in _COUNTED_COLUMNS and counted.kind != "prefix":
            return None
        specs, values = plan.equality(parsed)
        shape_id = (specs, success, window, None if counted is None else counted.name)
        shape = self._active.get(shape_id)
        if shape is None or (self._lagging and shape_id[2] in self._lagging):
            return None
        self.calls[helper, "projection"] += 1
        return shape.answer(values)

    def top(self, flt: Filter | BoundFilter, counted: Field, n: int,
            as_of: AsOf) -> list[tuple[Any, int]] | None:
        """topValues from the countDistinct shape of `counted`, or None when SQL must answer:
        for the columns whose counted values are SQL's values."""
        if counted.name not in _TOP_VALUES:
            if as_of.before_seq is not None and as_of.before_seq == self.judging:
                self.calls["topValues", "sql"] += 1
            return None
        found = self._shape("topValues", flt, counted, as_of)
        return None if found is None else found[0].top(found[1], n)

    def _shape(self, helper: str, flt: Filter | BoundFilter, counted: Field | None,
               as_of: AsOf) -> tuple[Shape, tuple] | None:
        """The active shape answering `flt` and the key to look up, or None for SQL."""
        if as_of.before_seq is None or as_of.before_seq != self.judging:
            return None
        covered = cover(flt, counted)
        if covered is None:
            self.calls[helper, "sql"] += 1
            return None
        shape_id, key = covered
        shape = self._active.get(shape_id)
        if shape is None:
            self._register(shape_id)
            self.calls[helper, "sql"] += 1
            return None
        if self._lagging and shape_id[2] in self._lagging:
            self.calls[helper, "sql"] += 1
            return None
        self.calls[helper, "projection"] += 1
        return shape, key

    def recent_answer(self, helper: str, flt: Filter | BoundFilter, n: int, as_of: AsOf, sql: EventQueries,
                      pick: Answer) -> Any:
        """`pick` of the newest `n` rows matching `flt` from the recent rows (recent.py), or
        NOT_ANSWERED when SQL must answer (outside the report being judged, or not covered)."""
        if as_of.before_seq is None or as_of.before_seq != self.judging:
            return NOT_ANSWERED
        return self.recent.answer(helper, flt, n, as_of, self._judged, sql, pick)

    # -- shapes on and off

    def register(self, flt: Filter, counted: Field | None = None) -> bool:
        """Ask for the shape answering `flt` before a policy does (benchmarks, tests, warm-up);
        False when no shape covers it."""
        covered = cover(flt, counted)
        if covered is None:
            return False
        if covered[0] not in self._active:
            self._register(covered[0])
        return True

    def wait_built(self, timeout: float) -> bool:
        """Wait until every registered shape is built (they switch on at the runner's next event)."""
        return self._settled.wait(timeout)

    def _register(self, shape_id: ShapeId) -> None:
        with self._lock:
            if shape_id in self._pending or shape_id in self._building:
                return
            if len(self._active) + len(self._pending) + len(self._building) >= MAX_SHAPES:
                return
            self._pending[shape_id] = None
            self._settled.clear()
            self._start_builder()
        self._wake.set()

    def _start_builder(self) -> None:
        """Start the builder thread if it is not running (the lock held)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._builder, name="projection-build",
                                            daemon=True)
            self._thread.start()

    def _invalidate(self, window: _Window) -> None:
        logger.info("projection: the %gs window's %d shapes are dropped (events it counts were "
                    "pruned, or skipped); rebuilding them", window.seconds, len(window.shapes))
        del self._windows[window.seconds]
        self._adders = {}
        with self._lock:
            for shape in window.shapes:
                del self._active[shape.id]
                self._pending[shape.id] = None
            self._settled.clear()
        self._wake.set()

    def _reset(self, position: int) -> None:
        """The runner skipped events (pruned before it judged them): rebuild everything."""
        self.recent.clear()
        for window in list(self._windows.values()):
            self._invalidate(window)
        with self._lock:
            self._generation += 1
            for build in self._near:
                for shape in build.shapes:
                    self._building.discard(shape.id)
                    self._pending[shape.id] = None
                self._settled.clear()
            self._near.clear()
        self._lagging.clear()
        if self._feed is not None:
            self._feed.stop()
        self.start_at(position)

    def _install_near(self, event: Event) -> None:
        """Finish the builds close to the runner and switch them on (before judging `event`)."""
        with self._lock:
            builds, self._near = self._near, []
        for build in builds:
            ok = build.generation == self._generation
            if ok:
                for run in build.head.take_upto(self.position):
                    for shape in build.shapes:
                        shape.add_all(run)
                feed = self._feed
                if feed is not None and feed.ready:  # past the stable mark, and the other
                    upto = event.seq - 1             # nodes' events added before `event`
                    if build.head.after < upto:
                        rows = feed.read_open(build.head.after, upto)
                        for shape in build.shapes:
                            shape.add_all(rows)
                        build.head.skip_to(upto)
                    ok = True
                elif feed is not None:
                    ok = False
                else:
                    ok = build.head.after == self.position
            window = self._windows.get(build.seconds)
            if ok and window is not None:
                for run in build.tail.take_upto(window.tail.after):
                    for shape in build.shapes:
                        shape.remove_all(run)
                ok = build.tail.after == window.tail.after
            with self._lock:
                for shape in build.shapes:
                    self._building.discard(shape.id)
                    if not ok:
                        self._pending[shape.id] = None
                        self._settled.clear()
            if not ok:
                self._wake.set()
                continue
            if window is None:
                window = self._windows[build.seconds] = _Window(build.seconds, build.tail)
            window.shapes.extend(build.shapes)
            self._adders = {}
            for shape in build.shapes:
                self._active[shape.id] = shape
            logger.info("projection: %d shape(s) of the %gs window on after %.1f s",
                        len(build.shapes), build.seconds, time.monotonic() - build.started)
        self.check_retention()  # a prune while they were building

    # -- the builder thread

    def _builder(self) -> None:
        while not self._stopping:
            self._wake.wait(1.0)
            self._wake.clear()
            while not self._stopping:
                with self._lock:
                    restored = self._restoring.pop() if self._restoring else None
                if restored is not None:
                    self._catch_up_restored(restored)
                    continue
                with self._lock:
                    if not self._pending:
                        self._settled.set()
                        break
                    # the shortest window first: it builds in seconds, the longest may take minutes
                    seconds = min(shape_id[2] for shape_id in self._pending)
                    ids = [s for s in self._pending if s[2] == seconds]
                    for shape_id in ids:
                        del self._pending[shape_id]
                        self._building.add(shape_id)
                    generation = self._generation
                try:
                    build = self._build(seconds, ids, generation)
                except Exception:
                    logger.exception("projection: building the %gs window failed", seconds)
                    build = None
                with self._lock:
                    if build is not None and build.generation == self._generation:
                        self._near.append(build)
                        continue
                    for shape_id in ids:
                        self._building.discard(shape_id)
                        self._pending[shape_id] = None
                    self._settled.clear()
                if self._stopping:
                    return
                time.sleep(0.5)  # the log is unreadable or moved under us: try again shortly

    def _build(self, seconds: float, ids: list[ShapeId], generation: int) -> _Build | None:
        """Counts of the window before the runner's position, caught up to NEAR events of it."""
        started = time.monotonic()
        feed = self._feed
        if feed is not None and not feed.ready:
            return None  # it starts at the runner's next event
        position, received = self._at
        if received is None and position:
            rows = self._raw_read(position - 1, 1)
            received = rows[0][RECEIVED] if rows and rows[0][SEQ] == position else None
        start = position
        if received is not None:
            rows = self._read_from(received - seconds)
            if rows and rows[0][SEQ] <= position:
                start = rows[0][SEQ] - 1
        shapes = [Shape(shape_id) for shape_id in ids]
        head = start
        if self._count is not None and position - start > GROUP_MIN:
            counted = self._count_groups(shapes, start, position, generation)
            if counted is None:
                return None
            head = counted
        return self._catch_up(_Build(seconds, shapes, Cursor(self._read, head),
                                   Cursor(self._read, start), generation, started))

    def _catch_up_restored(self, build: _Build) -> None:
        """A window loaded from the snapshot, caught up as a build; rebuilt should that fail."""
        try:
            done = self._catch_up(build)
        except Exception:
            logger.exception("projection: catching up the restored %gs window failed",
                             build.seconds)
            done = None
        with self._lock:
            if done is not None and done.generation == self._generation:
                self._near.append(done)
                return
            for shape in build.shapes:
                self._building.discard(shape.id)
                self._pending[shape.id] = None
            self._settled.clear()

    def _catch_up(self, build: _Build) -> _Build | None:
        """Catch `build` up to NEAR events of the runner (its head adds, its tail expires)."""
        shapes, seconds, generation = build.shapes, build.seconds, build.generation
        feed = self._feed  # on a shared log: the runner's next events wait for its stable mark
        while not self._stopping and generation == self._generation:
            position, received = self._at
            for run in build.head.take_upto(position):
                for shape in shapes:
                    shape.add_all(run)
            if received is not None:
                for run in build.tail.take_while_before(received - seconds, build.head.after):
                    for shape in shapes:
                        shape.remove_all(run)
            target = self._at[0] if feed is None else min(self._at[0], feed.stable)
            if target - build.head.after <= NEAR:
                return build
        return None

    def _count_groups(self, shapes: list[Shape], after: int, upto: int, generation: int) -> int | None:
        """Add the events ``after < seq <= upto`` to `shapes` by the backend's grouped counts, a
        GROUP_ROWS range at a time; the seq they are counted up to, or None when stopped."""
        columns = tuple(sorted(set().union(*(_columns_read(shape.id) for shape in shapes))))
        blank = [None] * len(FIELDS_ROW)
        while after < upto:
            if self._stopping or generation != self._generation:
                return None
            end = min(upto, after + GROUP_ROWS)
            for group, n in self._count(after, end, columns).items():
                row = blank.copy()
                for index, value in zip(columns, group):
                    row[index] = value
                values = tuple(row)
                for shape in shapes:
                    shape.add_group(values, n)
            after = end
        return after

    def _read_from(self, received: float) -> list[Row]:
        return self._raw_read(0, 1, received)

    def queries(self, sql: EventQueries) -> "ProjectedQueries":
        """The helpers' queries for the report call running now: this projection, else `sql`."""
        if self._queries is None or self._queries.sql is not sql:
            self._queries = ProjectedQueries(self, sql)
        return self._queries

    def close(self, save: bool = False) -> None:
        """Stop the builder; with `save` (the runner's thread idle for good), save the windows
        first (`save`)."""
        if save:
            try:
                self.save()
            except Exception:
                logger.exception("projection: saving the snapshot %s failed", self._snapshot)
        self._stopping = True
        self._wake.set()

    # -- what the console shows

    def describe(self) -> dict[str, Any]:
        """Shapes with their sizes, and the calls answered here vs by SQL, per helper.

        Read from another thread while the runner changes the counts: a dict resized under the
        walk is simply walked again.
        """
        for _ in range(100):
            try:
                return self._describe()
            except RuntimeError:
                continue
        return {"position": self.position, "shapes": [], "building": 0, "calls": {}}

    def shape_counts(self) -> tuple[int, int]:
        """(shapes on, shapes building): what changes the description's shapes but their sizes
        (the policy process describes itself again when it changes)."""
        with self._lock:
            building = len(self._pending) + len(self._building) + sum(
                len(b.shapes) for b in self._near)
        return len(self._active), building

    def _describe(self) -> dict[str, Any]:
        shapes = []
        for shape in list(self._active.values()):
            keys, pairs = shape.size()
            specs, success, window, counted = shape.id
            shapes.append({"keys": list(specs), "success": success, "window": window,
                           "field": counted, "key_tuples": keys, "distinct_pairs": pairs})
        with self._lock:
            building = len(self._pending) + len(self._building) + sum(
                len(b.shapes) for b in self._near)
        calls = calls_by_helper(self.calls)
        out = {"position": self.position, "shapes": shapes, "building": building,
               "calls": calls, "recent": self.recent.describe()}
        if self._feed is not None:
            out["foreign"] = self._feed.describe()
        return out


def calls_by_helper(calls: Mapping[tuple[str, str], int]) -> dict[str, dict[str, int]]:
    """{helper: {"projection": n, "sql": n}} of the (helper, path) counters."""
    out: dict[str, dict[str, int]] = {}
    for (helper, path), n in sorted(list(calls.items())):
        out.setdefault(helper, {"projection": 0, "sql": 0})[path] = n
    return out


class ProjectedQueries(EventQueries):
    """The helpers' queries inside the runner's report call: the projection, else SQL."""

    def __init__(self, projection: WindowProjection, sql: EventQueries) -> None:
        self._projection = projection
        self.sql = sql

    def count_reports(self, flt: Filter | BoundFilter, as_of: AsOf) -> int:
        found = self._projection.answer("countReports", flt, None, as_of)
        return self.sql.count_reports(as_filter(flt), as_of) if found is None else found

    def count_distinct(self, field: Field, flt: Filter | BoundFilter, as_of: AsOf) -> int:
        found = self._projection.answer("countDistinct", flt, field, as_of)
        return self.sql.count_distinct(field, as_filter(flt), as_of) if found is None else found

    def top_values(self, field: Field, flt: Filter | BoundFilter, n: int,
                   as_of: AsOf) -> list[tuple[Any, int]]:
        found = self._projection.top(flt, field, n, as_of)
        return self.sql.top_values(field, as_filter(flt), n, as_of) if found is None else found

    def first_seen(self, flt: Filter | BoundFilter, as_of: AsOf) -> float | None:
        return self.sql.first_seen(as_filter(flt), as_of)

    def last_seen(self, flt: Filter | BoundFilter, as_of: AsOf) -> float | None:
        found = self._projection.recent_answer("lastSeen", flt, 1, as_of, self.sql, _newest_received)
        return self.sql.last_seen(as_filter(flt), as_of) if found is NOT_ANSWERED else found

    def recent_reports(self, flt: Filter | BoundFilter, n: int, as_of: AsOf) -> list[Event]:
        return self.sql.recent_reports(as_filter(flt), n, as_of)

    def recent_rows(self, flt: Filter | BoundFilter, n: int, as_of: AsOf) -> list[tuple]:
        found = self._projection.recent_answer("recentReports", flt, n, as_of, self.sql, list)
        return self.sql.recent_rows(as_filter(flt), n, as_of) if found is NOT_ANSWERED else found

    def recent_columns(self, flt: Filter | BoundFilter, n: int, as_of: AsOf,
                       columns: tuple[int, ...]) -> list[tuple]:
        """From the recent rows up to BOUND; more straight from SQL, which reads the places of
        an account from its index alone (keeping WIDE rows of a key costs memory, and loading
        them reads the table)."""
        if n <= BOUND:
            pick = columns_picker(columns)
            found = self._projection.recent_answer("recentReports", flt, n, as_of, self.sql,
                                                   lambda rows: [pick(row) for row in rows])
            if found is not NOT_ANSWERED:
                return found
        elif as_of.before_seq is not None and as_of.before_seq == self._projection.judging:
            self._projection.calls["recentReports", "sql"] += 1  # as the recent rows count it
        return self.sql.recent_columns(as_filter(flt), n, as_of, columns)

    def count_near(self, flt: Filter | BoundFilter, n: int, latitude: float, longitude: float,
                   km: float, enough: int | None, as_of: AsOf) -> int:
        """Always the backend's: SQLite counts in the login index, faster than rows from memory
        would cross (and the habit sample of 200 is more than the recent rows keep)."""
        if as_of.before_seq is not None and as_of.before_seq == self._projection.judging:
            self._projection.calls["countNear", "sql"] += 1
        return self.sql.count_near(as_filter(flt), n, latitude, longitude, km, enough, as_of)


def _newest_received(rows: list[Row]) -> float | None:
    return rows[0][RECEIVED] if rows else None


_running = threading.local()


def running_projection() -> WindowProjection | None:
    """The projection of the report batch running in this thread, if any."""
    return getattr(_running, "projection", None)


def set_running_projection(projection: WindowProjection | None) -> None:
    _running.projection = projection
