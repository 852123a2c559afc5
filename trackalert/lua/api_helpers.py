"""Lua globals: the long-term helpers over the event log (DESIGN §5 "Long-term helpers").

As-of rule: inside `report(lt)` a helper sees only events logged before `lt` (windows end when lt
was received); in background and custom functions, and on the console, it sees events received up
to the clock's now (virtual in replays and tests). That one rule makes live runs and replays agree.

The helpers also work in the config state: a console command runs in every worker state and then
in the config state, whose result is the reply, so a helper that did nothing there (as the C++
convention for worker-only functions would have it) answered every console question with nil.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from trackalert.eventlog.bound import BoundFilter, as_filter, bind_pairs
from trackalert.eventlog.filters import AsOf, Field, Filter, FilterError, parse_field, parse_filter
from trackalert.eventlog.windows import running_projection
from trackalert.lua.convert import (ANSWERS, LT_TIME, counted_table, describe, field_plan, is_table,
                                    picked_tables, report_tables)
from trackalert.lua.registry import Where, lua_global

#: Worker states, and the config state that answers console commands.
HELPERS = Where.WORKER | Where.CONFIG

if TYPE_CHECKING:
    from trackalert.eventlog.base import EventQueries
    from trackalert.lua.state import LuaState

_FILTER_DOC = """`filter` is a table; every key given must match: `login`, `remote` (address string or
ComboAddress), `netmask` (`"192.0.2.0/24"`), `success` (boolean), `protocol`, `pwhash`, `country`
(ISO code from enrichment), `asn`, `["device_attrs.<key>"]`, `["attrs.<key>"]`, and a time window:
`window` (`"30d"`, `"1h"`, or seconds) and/or `since`/`until` (epoch seconds, compared with the
time each report was received). Fastest: inside `report(lt)`, `countReports` and `countDistinct`
(of `login`, `remote`, `remote/<bits>`, `pwhash`, `country`, `protocol` or `asn`) whose filter
has only equal-to keys, `success` and a `window` (no `since`/`until`) answer in O(1) from window
counts kept in memory in step with the policy runner, exactly as the query would (and so does
`topValues` of `login`, `pwhash`, `country`, `protocol` or `asn`, from the same counts); the first call
of a new such filter shape starts building it from the log (a query answers meanwhile; some
seconds per million events its window holds); so do `recentReports` with `n` up to 200 and
`lastSeen` with such a filter (`window` optional), from the newest 16 rows of each key kept in
memory, 200 for a key asked for more (a key's first call is one query). A `countReports` or
`countDistinct` asked again with the same filter in one `report(lt)` is answered from the first
call (the same answer, as of lt). `showEventLog()` shows the shapes and the calls each
way answered. Other calls are indexed queries: anything with `login`; `remote`,
`netmask` or `pwhash` with `success=false` (attacks); otherwise a scan of the window, so give a
short `window`.
Inside `report(lt)` only events logged before `lt` are seen
(windows end when `lt` was received); elsewhere (background and custom functions, the console)
events received up to now. An unknown key or a value of the wrong type raises a Lua error naming
it."""


def _queries(state: "LuaState", flt: "BoundFilter | Filter") -> "tuple[EventQueries, BoundFilter | Filter]":
    """The queries to ask and the filter to give them: inside the runner's report call, the
    window projection (falling back to SQL itself), which takes a bound filter as it is;
    everywhere else (console, background, custom functions, replays without it) SQL."""
    log = state.host.eventlog
    if log is None:
        raise RuntimeError("the event log is not open yet (helpers answer in the report, background "
                           "and custom functions and on the console of a running daemon)")
    projection = running_projection()
    if projection is not None and state.as_of_seq is not None:
        return projection.queries(log.queries()), flt
    return log.queries(), as_filter(flt)


def _as_of(state: "LuaState") -> AsOf:
    seq = state.as_of_seq
    if seq is None:
        return AsOf(before_seq=state.host.horizon, now=state.host.clock.time())
    known = state.cache.get("as_of")  # one per report(lt), asked by each helper it calls
    if known is None or known.before_seq != seq:
        lt_seq, received = state.cache.get(LT_TIME, (None, None))  # left by call_with_tuple
        known = state.cache["as_of"] = AsOf(before_seq=seq, now=received if lt_seq == seq else None)
    return known


def _filter(state: "LuaState", value: Any) -> "BoundFilter | Filter":
    """The filter of a helper's Lua argument, read in one call into Lua."""
    flat = state.values.lib.flat(value)
    return _flat_filter(state, flat if type(flat) is tuple else (flat,))


def _flat_filter(state: "LuaState", flat: tuple) -> "BoundFilter | Filter":
    """The filter of values.flat's (True, key, value, ...), bound to the plan of its keys
    (bound.py); for its (False, value), the value read item by item."""
    if flat[0] is True:
        return bind_pairs(flat[1:])
    value = flat[1]
    if value is None:
        return Filter()
    if not is_table(value):
        raise FilterError(f"filter must be a table, got {describe(value)}")
    # `remote=lt.remote`, `netmask=newNetmask(...)`: Lua objects, which the filter takes as text
    return parse_filter((key, state.values.plain(item)) for key, item in value.items())


def _with_flat(generic: Callable[..., Any], flat: Callable[..., Any]) -> Callable[..., Any]:
    """`generic` (the helper as Lua called it) carrying the flat form values.V.wrap_flat calls
    when the filter crossed as flat pairs (the `filter_at` of its lua_global)."""
    generic.flat = flat  # type: ignore[attr-defined]
    return generic


def _answered(state: "LuaState", helper: str, at: int, ask: Callable[..., int]) -> Callable[..., int]:
    """`ask` for flat arguments (the filter's flag at position `at`), answering a call made
    before in the same report(lt) from memory: the answer is as of lt, so the same question has
    the same answer all through the call (the starter new_country and new_device both count the
    account's successes of 180 days). Only inside the policy runner's report call (it sets the
    memory afresh for each), and only for filters that crossed as plain pairs (a Lua table may
    change between two calls); keyed by the values' types as well, since Python's
    True == 1 == 1.0 (Lua's true, 1)."""
    def answered(*flat: Any) -> int:
        memory = state.cache.get(ANSWERS)
        if memory is None or flat[at] is not True or (at and type(flat[0]) is not str):
            return ask(*flat)
        key = (helper, flat, tuple(map(type, flat)))
        found = memory.get(key)
        if found is None:
            found = memory[key] = ask(*flat)
        return found

    return answered


def _projected_count(state: "LuaState", helper: str, counted: "Field | None", flat: tuple) -> int | None:
    """The window projection's answer to a count helper whose filter crossed as plain pairs,
    inside the runner's report call; None when the general path must answer (it asks the
    projection itself, then SQL). The same answer, without the general path's filter object."""
    if flat[0] is not True or state.as_of_seq is None:
        return None
    projection = running_projection()
    if projection is None:
        return None
    return projection.count_pairs(helper, flat[1:], counted, state.as_of_seq)


#: countDistinct's fields by name, None for a name that is not one (the general path then
#: raises its error, after the filter's own): parsed once, not on every call.
_fields: dict[str, "Field | None"] = {}


def _known_field(name: Any) -> "Field | None":
    if type(name) is not str:
        return None
    try:
        return _fields[name]
    except KeyError:
        pass
    try:
        field: Field | None = parse_field(name)
    except FilterError:
        field = None
    if len(_fields) >= 1024:  # names built from data: bounded
        _fields.clear()
    _fields[name] = field
    return field


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{what} must be a number, got {describe(value)}")
    return max(0, int(value))


@lua_global(
    "countReports", HELPERS, "countReports(filter) -> number",
    "How many logged reports match `filter`. " + _FILTER_DOC,
    example='local fails = countReports({login=lt.login, success=false, window="1h"})',
    topic="helpers", filter_at=(1, 1),
)
def _count_reports(state: "LuaState") -> Callable[[Any], int]:
    def ask(flt: "BoundFilter | Filter") -> int:
        queries, flt = _queries(state, flt)
        return queries.count_reports(flt, _as_of(state))

    def count_reports(flt: Any = None) -> int:
        return ask(_filter(state, flt))

    def count_reports_flat(*flat: Any) -> int:
        found = _projected_count(state, "countReports", None, flat)
        return ask(_flat_filter(state, flat)) if found is None else found

    return _with_flat(count_reports, _answered(state, "countReports", 0, count_reports_flat))


@lua_global(
    "countDistinct", HELPERS, "countDistinct(field, filter) -> number",
    """How many distinct values `field` takes over the reports matching `filter`. Fields:
    `login`, `remote`, `pwhash`, `protocol`, `country`, `city`, `asn`, `isp`, `device_id`,
    `fail_type`, `session_id`, `"device_attrs.<key>"`, `"attrs.<key>"`, and `"remote/<bits>"`
    (networks, e.g. `"remote/24"`). Unknown values (no enrichment) are not counted. """ + _FILTER_DOC,
    example='local sprayed = countDistinct("login", {remote=lt.remote, success=false, window="1h"})',
    topic="helpers", filter_at=(2, 2),
)
def _count_distinct(state: "LuaState") -> Callable[[Any, Any], int]:
    def ask(field: Any, flt: "BoundFilter | Filter") -> int:
        queries, flt = _queries(state, flt)
        return queries.count_distinct(parse_field(field), flt, _as_of(state))

    def count_distinct(field: Any, flt: Any = None) -> int:
        return ask(field, _filter(state, flt))

    def count_distinct_flat(field: Any, *flat: Any) -> int:
        counted = _known_field(field)
        found = None if counted is None else _projected_count(state, "countDistinct", counted, flat)
        return ask(field, _flat_filter(state, flat)) if found is None else found

    return _with_flat(count_distinct, _answered(state, "countDistinct", 1, count_distinct_flat))


@lua_global(
    "topValues", HELPERS, "topValues(field, filter, n) -> {{value=, count=}, ...}",
    """The `n` most frequent values of `field` (as for `countDistinct`) over the reports matching
    `filter`, most frequent first (ties in value order), as an array of `{value=, count=}`.
    """ + _FILTER_DOC,
    example='for _, v in ipairs(topValues("country", {login=lt.login, success=true, window="180d"}, 3)) do\n'
            '  infoLog("country", {country=v.value, count=v.count})\nend',
    topic="helpers", filter_at=(3, 2),
)
def _top_values(state: "LuaState") -> Callable[[Any, Any, Any], Any]:
    def ask(field: Any, flt: "BoundFilter | Filter", n: Any) -> Any:
        queries, flt = _queries(state, flt)
        rows = queries.top_values(parse_field(field), flt, _count(n, "n"), _as_of(state))
        return counted_table(state, rows)

    def top_values(field: Any, flt: Any = None, n: Any = 10) -> Any:
        return ask(field, _filter(state, flt), n)

    return _with_flat(top_values, lambda field, n, *flat: ask(field, _flat_filter(state, flat), n))


def _number(value: Any, what: str, low: float, high: float) -> float:
    """A finite number in [low, high] as a float, or a ValueError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {describe(value)}")
    if not low <= value <= high:
        raise ValueError(f"{what} must be from {low:g} to {high:g}, got {value:g}")
    return float(value)


@lua_global(
    "countNear", HELPERS, "countNear(filter, n, latitude, longitude, km[, enough]) -> number",
    """How many of the newest `n` reports matching `filter` were located (enrichment gave them a
    latitude and longitude) closer than `km` kilometres to the point `latitude`, `longitude`
    (degrees; great-circle distance on a sphere of 6,371 km, the haversine formula). With
    `enough`, counting stops once that many are found (the answer is then `enough`): a question
    like "at least 3 near here?" is decided by an account's first few reports from home.
    Counted where the reports are read: on SQLite one query over the login index, much cheaper
    than `recentReports` of as many rows measured in Lua (the starter impossible_travel policy
    asks it whether a login comes from a place the account uses). """ + _FILTER_DOC,
    example='local near = countNear({login=lt.login, success=true, window="30d"}, 200,\n'
            '                       lt.latitude, lt.longitude, 500, 3)',
    topic="helpers", filter_at=(6, 1),
)
def _count_near(state: "LuaState") -> Callable[..., int]:
    def ask(flt: "BoundFilter | Filter", n: Any, latitude: Any, longitude: Any, km: Any,
            enough: Any) -> int:
        count = _count(n, "n")
        point = (_number(latitude, "latitude", -90, 90), _number(longitude, "longitude", -180, 180),
                 _number(km, "km", 0, float("inf")))
        stop = None if enough is None else _count(enough, "enough")
        queries, flt = _queries(state, flt)
        return queries.count_near(flt, count, *point, stop, _as_of(state))

    def count_near(flt: Any = None, n: Any = None, latitude: Any = None, longitude: Any = None,
                   km: Any = None, enough: Any = None) -> int:
        return ask(_filter(state, flt), n, latitude, longitude, km, enough)

    return _with_flat(count_near, lambda n, latitude, longitude, km, enough, *flat:
                      ask(_flat_filter(state, flat), n, latitude, longitude, km, enough))


@lua_global(
    "firstSeen", HELPERS, "firstSeen(filter) -> time or nil",
    """When the first report matching `filter` was received (epoch seconds), or nil when there is
    none. """ + _FILTER_DOC,
    example='if firstSeen({login=lt.login, country=lt.country, success=true}) == nil then\n'
            '  warnLog("first login from this country", {login=lt.login})\nend',
    topic="helpers", filter_at=(1, 1),
)
def _first_seen(state: "LuaState") -> Callable[[Any], float | None]:
    def ask(flt: "BoundFilter | Filter") -> float | None:
        queries, flt = _queries(state, flt)
        return queries.first_seen(flt, _as_of(state))

    def first_seen(flt: Any = None) -> float | None:
        return ask(_filter(state, flt))

    return _with_flat(first_seen, lambda *flat: ask(_flat_filter(state, flat)))


@lua_global(
    "lastSeen", HELPERS, "lastSeen(filter) -> time or nil",
    """When the last report matching `filter` was received (epoch seconds), or nil. """ + _FILTER_DOC,
    example='local last = lastSeen({login=lt.login, success=true})',
    topic="helpers", filter_at=(1, 1),
)
def _last_seen(state: "LuaState") -> Callable[[Any], float | None]:
    def ask(flt: "BoundFilter | Filter") -> float | None:
        queries, flt = _queries(state, flt)
        return queries.last_seen(flt, _as_of(state))

    def last_seen(flt: Any = None) -> float | None:
        return ask(_filter(state, flt))

    return _with_flat(last_seen, lambda *flat: ask(_flat_filter(state, flat)))


@lua_global(
    "recentReports", HELPERS, "recentReports(filter, n[, fields]) -> {report, ...}",
    """Up to `n` reports matching `filter`, newest first. Each is a table with the LoginTuple
    fields (`remote` as a string), `seq`, `received`, and the enrichment `country`, `city`,
    `latitude`, `longitude`, `asn`, `isp` (nil/"" when unknown). With `fields`, an array of
    those names (e.g. `{"latitude", "longitude"}`), each table holds just them, with the same
    values: much cheaper when many reports are asked for a few fields. """ + _FILTER_DOC,
    example='local prev = recentReports({login=lt.login, success=true}, 1)[1]\n'
            'if prev then infoLog("previous login", {from=prev.remote}) end\n'
            'local places = recentReports({login=lt.login}, 200, {"latitude", "longitude"})',
    topic="helpers", filter_at=(3, 1),
)
def _recent_reports(state: "LuaState") -> Callable[..., Any]:
    def ask(flt: "BoundFilter | Filter", n: Any, fields: Any) -> Any:
        plan = None if fields is None else field_plan(state, fields)
        queries, flt = _queries(state, flt)
        count, as_of = _count(n, "n"), _as_of(state)
        if plan is None:
            return report_tables(state, queries.recent_rows(flt, count, as_of))
        rows = queries.recent_columns(flt, count, as_of, plan.columns)
        return picked_tables(state, rows, plan, lambda: queries.recent_rows(flt, count, as_of))

    def recent_reports(flt: Any = None, n: Any = 10, fields: Any = None) -> Any:
        return ask(_filter(state, flt), n, fields)

    return _with_flat(recent_reports,
                      lambda n, fields, *flat: ask(_flat_filter(state, flat), n, fields))
