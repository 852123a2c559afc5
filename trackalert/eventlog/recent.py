"""The newest reports per key, kept in lockstep with the policy runner: recentReports in memory.

Why it exists: the starter impossible_travel policy asks `recentReports({login=lt.login,
success=true, window="7d"}, 5)` on nearly every report; each answer was two SQL statements (the
window's first seq, then the rows), the biggest share of the policy runner's time.

How it stays exact (the SQL path, eventlog/queries.py, is the reference):

* A *shape* is a filter made only of equality keys (as the window projection's, windows.py),
  `success` and an optional `window` (no `since`/`until`). Per shape and key tuple it keeps up
  to BOUND rows (REPORT_COLUMNS, as SQL returns them), oldest first. A key asked for more rows
  (up to WIDE: impossible_travel's habit sample of 200) is *widened*: loaded with its newest WIDE
  rows, it keeps WIDE from then on; a key is widened only while the wide keys of all shapes are
  fewer than MAX_WIDE_KEYS and hold fewer than MAX_WIDE_ROWS rows (past that, and for n over
  WIDE, SQL answers).
* Rows arrive two ways. The runner's head adds every judged event to the key it has in each
  shape (`add`), so a shape holds, per key, the newest rows since it was created. A key asked
  for whose rows might go back before that is *loaded*: one SQL query of its newest BOUND rows
  in the window as of lt, after which the head keeps it current. Windows only move forward
  (their end is lt's `received`, never decreasing), so rows the load left out, older than its
  window, are never asked for again.
* A shape is *complete* (every key's rows are in memory, an absent key has none) when nothing
  before its creation can be in the window: the log was empty then, everything before was
  pruned, or the window now starts after the report it was created at. And at creation, when
  its window holds at most BUILD_MAX rows of its `success` (a young log, a short window), they
  are read in one query and the shape starts complete; otherwise keys load one by one.
* Answer: the rows of the key, newest first, received at/after ``now - window`` (SQL's seq
  range: ties at the edge included), seq at/after the oldest stored one, at most n. Exact when
  the key is loaded, the shape complete, n rows were found, or a row was left out by the window
  or retention (everything older is out too); otherwise the key is loaded. A key never
  answers for more rows than it keeps (n over its bound: it is loaded wider first).
* Retention: pruning removes a prefix of the log, so rows below the oldest stored seq (read by
  the runner before each batch, `check_retention`) are simply skipped, and the older rows of
  their key were pruned too.
* Memory: at most MAX_SHAPES shapes; per shape, BOUND rows per key with a row in its window
  (keys all of whose rows left the window are swept, amortised), and at most MAX_KEYS keys;
  the wide keys hold about MAX_WIDE_ROWS rows at most (never more than MAX_WIDE_KEYS * WIDE):
  a wide key of a login seen 30 times in the window keeps 30.
  `describe` gives keys and rows held; bench/policy_helpers_bench.py prints the RSS.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

from trackalert.eventlog.base import Event, EventQueries
from trackalert.eventlog.bound import BoundFilter, as_filter
from trackalert.eventlog.filters import AsOf, Filter
from trackalert.eventlog.ipkey import ip_key
from trackalert.eventlog.keys import RECEIVED, SEQ, SUCCESS, Row, equality_keys, key_function
from trackalert.eventlog.rows import StoredEvent, geo_columns, json_or_null

#: Rows kept per key.
BOUND = 16
#: Most rows a call may ask for and be answered here: rows kept per wide key (a key asked for
#: more than BOUND; impossible_travel's habit sample asks 200).
WIDE = 200
#: Wide keys kept at most in all shapes (each up to WIDE rows): past it, SQL answers over BOUND.
MAX_WIDE_KEYS = 25_000
#: Rows the wide keys may hold before no more keys are widened (~430 MiB at the 433 bytes a row
#: measured at 10M events; the keys already wide go on to at most WIDE rows each).
MAX_WIDE_ROWS = 1_000_000
#: Shapes kept at most.
MAX_SHAPES = 32
#: Keys one shape keeps at most (a shape without a window never sweeps): past it, it restarts.
MAX_KEYS = 1_000_000
#: A shape whose window holds at most this many rows at creation is built from them at once.
BUILD_MAX = 20_000
#: A shape sweeps keys out of its window when it holds this many more than after its last sweep.
SWEEP_AFTER = 20_000

#: Distinct texts `_compact` keeps at most (then it starts afresh).
SHARED_MAX = 200_000
#: The text columns of a REPORT_COLUMNS row.
_TEXT_COLUMNS = (3, 4, 5, 8, 10, 11, 12, 13, 14, 15, 16, 17, 21)

#: (equality key specs, success, window seconds or None)
RecentId = tuple[tuple[str, ...], "bool | None", "float | None"]
#: `RecentProjection.answer`'s "SQL answers this call" (None is a lastSeen answer).
NOT_ANSWERED: Any = object()
#: The entry of a key known to have no row in its window (see RecentShape.sweep).
_NONE_IN_WINDOW: list = [collections.deque((), WIDE), True]
#: What to do with a row read from memory: the rows of recentReports, or lastSeen's time.
Answer = Callable[[list[Row]], Any]


def report_columns(event: "Event | StoredEvent") -> Row:
    """The REPORT_COLUMNS row SQL returns for `event` (eventlog/rows.py encodes what is stored):
    the head keeps this, so that the rows from memory and from the log cannot differ (an event
    read back from the log has it already)."""
    if type(event) is StoredEvent:
        return event.columns
    r = event.report
    return (event.seq, event.received, float(r.t), r.remote, r.login, r.pwhash, int(r.success),
            int(r.policy_reject), r.protocol, int(r.tls), r.device_id, r.session_id, r.fail_type,
            json_or_null(r.attrs), json_or_null(r.attrs_mv), json_or_null(r.device_attrs)
            ) + geo_columns(r.geo)


def _fields(row: Row) -> Row:
    """The `event_fields` (keys.py) of a REPORT_COLUMNS row, to key it as the head keys events."""
    return (row[0], row[1], row[4], row[6], ip_key(row[3]), row[5], row[16], row[8], row[20],
            row[15], row[13])


def recent_cover(flt: Filter | BoundFilter) -> tuple[RecentId, tuple] | None:
    """The shape answering `flt` and the key tuple to look up, or None when it is not covered."""
    if flt.since is not None or flt.until is not None:
        return None
    specs, values = equality_keys(flt)
    return (specs, flt.success, flt.window), values


class RecentShape:
    """The newest rows of each key of one shape."""

    def __init__(self, shape_id: RecentId, position: int, received: float) -> None:
        self.id = shape_id
        specs, self.success, self.window = shape_id
        self.key_of = key_function(specs)
        #: key tuple -> [rows oldest first (at most BOUND), loaded from SQL]
        self.keys: dict[tuple, list] = {}
        self.created_at = position  # events up to this seq came before it
        self.created_received = received  # ... and were received at or before this
        self.complete = position == 0
        self.swept = 0  # keys held after the last sweep
        self.wide = 0  # keys kept with WIDE rows (recounted by each sweep)
        self.wide_rows = 0  # rows those keys hold (likewise)

    def add(self, fields: Row, row: Row) -> None:
        key = self.key_of(fields)
        if key is not None:
            self._append(key, row, False)

    def _append(self, key: tuple, row: Row, loaded: bool) -> None:
        entry = self.keys.get(key)
        if entry is None or entry is _NONE_IN_WINDOW:
            self.keys[key] = [collections.deque((row,), BOUND), loaded or entry is not None]
        else:
            rows = entry[0]
            if rows.maxlen > BOUND and len(rows) < rows.maxlen:
                self.wide_rows += 1
            rows.append(row)

    def insert(self, fields: Row, row: Row) -> None:
        """Add `row` where its seq goes (another node's event, which may arrive after newer
        rows, or be held already from a load): a row kept once, the newest `maxlen` kept."""
        key = self.key_of(fields)
        if key is None:
            return
        entry = self.keys.get(key)
        seq = row[SEQ]
        if seq <= self.created_at and not self.complete and (entry is None or not entry[1]):
            return  # a key not loaded holds the rows since the shape began: a load will read it
        if entry is None or entry is _NONE_IN_WINDOW:
            self._append(key, row, False)
            return
        rows = entry[0]
        at = len(rows)
        while at and rows[at - 1][SEQ] > seq:
            at -= 1
        if at and rows[at - 1][SEQ] == seq:
            return  # a load read it from the log already
        if at == len(rows):
            self._append(key, row, False)
            return
        if len(rows) == rows.maxlen:
            if at == 0:
                return  # older than every row kept: not among the newest
            rows.popleft()
            at -= 1
        elif rows.maxlen > BOUND:
            self.wide_rows += 1
        rows.insert(at, row)

    def take(self, key: tuple, n: int, now: float, oldest: int) -> list[Row] | None:
        """The answer from memory, or None when the key must be loaded first."""
        start = None if self.window is None else now - self.window
        if not self.complete and start is not None and start > self.created_received:
            self.complete = True
        entry = self.keys.get(key)
        if entry is None:
            return [] if self.complete else None
        rows = entry[0]
        if n > rows.maxlen:  # it may have dropped rows that n asks for
            return None
        out = []
        for row in reversed(rows):
            if len(out) == n or row[SEQ] < oldest or (start is not None and row[RECEIVED] < start):
                return out
            out.append(row)
        return out if entry[1] or self.complete or len(out) == n else None

    def fill(self, rows: list[Row]) -> None:
        """Every row of the window as of now (SQL's, newest first): the shape is complete."""
        for row in reversed(rows):
            key = self.key_of(_fields(row))
            if key is not None:
                self._append(key, row, True)
        self.complete = True

    def load(self, key: tuple, rows: list[Row], bound: int = BOUND) -> None:
        """SQL's newest `bound` rows of `key` (newest first) as of the report being judged: the
        key keeps `bound` rows from now on."""
        if self.is_wide(key):
            self.wide -= 1
            self.wide_rows -= len(self.keys[key][0])
        if bound > BOUND:
            self.wide += 1
            self.wide_rows += len(rows)
        self.keys[key] = [collections.deque(reversed(rows), bound), True]

    def is_wide(self, key: tuple) -> bool:
        entry = self.keys.get(key)
        return entry is not None and entry is not _NONE_IN_WINDOW and entry[0].maxlen > BOUND

    def sweep(self, now: float, position: int) -> None:
        """Forget the rows of the keys none of whose rows is in the window any more (amortised:
        the caller calls it when the keys grew by `sweep_after`); restart a shape past MAX_KEYS.

        Such a key has no row in any later window: a complete shape drops it, an incomplete one
        keeps that knowledge (a shared marker, not a load on its next call)."""
        if self.window is not None:
            start = now - self.window
            kept: dict[tuple, Any] = {}
            for key, entry in self.keys.items():
                rows = entry[0]
                if rows and rows[-1][RECEIVED] >= start:
                    kept[key] = entry
                elif not self.complete:
                    kept[key] = _NONE_IN_WINDOW
            self.keys = kept
        if len(self.keys) > MAX_KEYS:
            self.keys = {}
            self.created_at, self.created_received, self.complete = position, now, False
        self.swept = len(self.keys)
        wide = [len(entry[0]) for entry in self.keys.values()
                if entry is not _NONE_IN_WINDOW and entry[0].maxlen > BOUND]
        self.wide, self.wide_rows = len(wide), sum(wide)

    def size(self) -> tuple[int, int]:
        """(keys, rows) held: what the memory of this shape grows with."""
        return len(self.keys), sum(len(entry[0]) for entry in list(self.keys.values()))


class RecentProjection:
    """The recent shapes, driven by the window projection (windows.py) as the runner goes."""

    def __init__(self, calls: collections.Counter) -> None:
        self.shapes: dict[RecentId, RecentShape] = {}
        self.oldest = 0  # the oldest stored seq, as of the last retention check
        self.sweep_after = SWEEP_AFTER
        self.build_max = BUILD_MAX
        self.max_wide = MAX_WIDE_KEYS
        self.max_wide_rows = MAX_WIDE_ROWS
        self._calls = calls
        self._shared: dict[str, str] = {}  # one object per repeated text (see _compact)

    def clear(self) -> None:
        """Events were skipped (or the log moved under the runner): nothing held is known good."""
        self.shapes.clear()

    def add(self, event: Event, fields: Row, late: bool = False) -> None:
        """After `report` on `event`: each shape's head takes it (one row built for all). A
        `late` event is another node's (windows.py, foreign.py): it may belong below rows held,
        so it is inserted in seq order, and it sweeps nothing."""
        row = None
        success = fields[SUCCESS]
        for shape in self.shapes.values():
            if shape.success is not None and success != shape.success:
                continue
            if row is None:
                row = self._compact(report_columns(event))
            if late:
                shape.insert(fields, row)
                continue
            shape.add(fields, row)
            if len(shape.keys) - shape.swept >= self.sweep_after:
                shape.sweep(event.received, event.seq)

    def answer(self, helper: str, flt: Filter | BoundFilter, n: int, as_of: AsOf, judged: tuple[int, float],
               sql: EventQueries, pick: Answer) -> Any:
        """`pick` of the rows SQL would give as of the judged report (seq, received), or
        NOT_ANSWERED when SQL must answer the whole call (not covered, n over WIDE, too many
        wide keys). A key not known well enough is loaded with one SQL query (of BOUND rows, or
        WIDE when n is over BOUND), which answers this call."""
        covered = recent_cover(flt) if n <= WIDE else None
        if covered is None:
            self._calls[helper, "sql"] += 1
            return NOT_ANSWERED
        shape_id, key = covered
        if None in key:  # an unparseable address: SQL's `ip = NULL` matches nothing
            self._calls[helper, "projection"] += 1
            return pick([])
        shape = self.shapes.get(shape_id)
        if shape is None:
            if len(self.shapes) >= MAX_SHAPES:
                self._calls[helper, "sql"] += 1
                return NOT_ANSWERED
            shape = self.shapes[shape_id] = self._create(shape_id, as_of, judged, sql)
        now = judged[1] if as_of.now is None else as_of.now
        rows = shape.take(key, n, now, self.oldest)
        if rows is not None:
            self._calls[helper, "projection"] += 1
            return pick(rows)
        bound = BOUND if n <= BOUND else WIDE
        self._calls[helper, "sql"] += 1
        if bound > BOUND and not shape.is_wide(key) and not self._may_widen():
            return NOT_ANSWERED
        loaded = sql.recent_rows(as_filter(flt), bound, as_of)
        shape.load(key, [self._compact(row) for row in loaded], bound)
        return pick(loaded[:n])

    def _may_widen(self) -> bool:
        """Whether one more key may keep WIDE rows (the memory bound of the wide keys)."""
        shapes = self.shapes.values()
        return (sum(shape.wide for shape in shapes) < self.max_wide
                and sum(shape.wide_rows for shape in shapes) < self.max_wide_rows)

    def _create(self, shape_id: RecentId, as_of: AsOf, judged: tuple[int, float],
                sql: EventQueries) -> RecentShape:
        """A new shape at the report being judged; complete at once when it can be."""
        seq, received = judged
        shape = RecentShape(shape_id, seq - 1, received)
        if self.oldest > shape.created_at:
            shape.complete = True
        if not shape.complete and self.build_max > 0:
            whole = sql.recent_rows(Filter(success=shape.success, window=shape.window),
                                    self.build_max + 1, as_of)
            if len(whole) <= self.build_max:
                shape.fill([self._compact(row) for row in whole])
        return shape

    def _compact(self, row: Row) -> Row:
        """`row` with its texts replaced by the equal ones held already: logins, addresses,
        protocols, devices, maps and places repeat from row to row (measured at 10M events: 870
        bytes per row without, see bench/policy_helpers_bench.py). Texts only: 1, 1.0 and True
        are equal keys, and a row must keep its types."""
        shared = self._shared
        if len(shared) >= SHARED_MAX:
            shared.clear()
        get = shared.setdefault
        values = list(row)
        for i in _TEXT_COLUMNS:
            value = values[i]
            if value is not None:
                values[i] = get(value, value)
        return tuple(values)

    def describe(self) -> list[dict[str, Any]]:
        shapes = []
        for shape in list(self.shapes.values()):
            keys, rows = shape.size()
            specs, success, window = shape.id
            shapes.append({"keys": list(specs), "success": success, "window": window,
                           "key_tuples": keys, "rows": rows, "complete": shape.complete})
        return shapes

