"""Values crossing between Python and Lua.

Data only ever crosses as values (strings, numbers, booleans, Lua tables), never as code and never
as Python objects (trackalert.lua.values says why): a login name full of Lua syntax is just a
string to the policy.
"""

from __future__ import annotations

import json
import math
from itertools import chain
from typing import TYPE_CHECKING, Any, Callable, Iterable

import lupa.luajit21 as luajit

from trackalert.eventlog.base import REPORT_COLUMNS, columns_picker
from trackalert.eventlog.rows import StoredEvent
from trackalert.lua.values import CHUNK_NAME, address_fields, guarded

if TYPE_CHECKING:
    from trackalert.eventlog.base import Event
    from trackalert.lua.state import LuaState

lua_type = luajit.lua_type

# The event tables of one state, built in Lua from plain values (one crossing per call instead of
# one per field or per table): the LoginTuple of report(lt) (lt.remote a Lua ComboAddress built
# from plain values) and the reports recentReports() returns, both from one constructor so that
# their fields cannot drift apart. `run` calls the policy protected (values: V.call) so an error
# comes back as text with its Lua traceback instead of unwinding Python.
#
# recentReports' rows arrive as one flat array of REPORT_COLUMNS values. Their JSON maps
# (attrs, attrs_mv, device_attrs) are decoded by `decode` (Python, pushed once with the chunk) once
# per distinct text and kept as templates; each report gets its own copy, so a policy that
# changes one report's table changes nothing else. The templates are dropped when MAPS_MAX
# distinct texts have been seen, which bounds their memory.
_EVENTS = """
local V, decode, WIDTH, MAPS_MAX = ...
local new_ca, call, type, next, error = V.ca, V.call, type, next, error

local E = {}

local function login_tuple(t, remote, login, pwhash, success, policy_reject, protocol, tls,
                           device_id, session_id, fail_type, attrs, attrs_mv, device_attrs,
                           country, city, latitude, longitude, asn, isp)
  return {t=t, remote=remote, login=login, pwhash=pwhash, success=success,
          policy_reject=policy_reject, protocol=protocol, tls=tls, device_id=device_id,
          session_id=session_id, fail_type=fail_type, attrs=attrs or {},
          attrs_mv=attrs_mv or {}, device_attrs=device_attrs or {}, country=country, city=city,
          latitude=latitude, longitude=longitude, asn=asn, isp=isp}
end

function E.run(fn, t, ip, port, hex, version, mapped, login, pwhash, success, policy_reject,
               protocol, tls, device_id, session_id, fail_type, attrs, attrs_mv, device_attrs,
               country, city, latitude, longitude, asn, isp)
  return call(fn, login_tuple(t, new_ca(ip, port, hex, version, mapped), login, pwhash, success,
                              policy_reject, protocol, tls, device_id, session_id, fail_type,
                              attrs, attrs_mv, device_attrs, country, city, latitude, longitude,
                              asn, isp))
end

local templates, kept = {}, 0

local function copy(template)
  local out = {}
  for k, v in next, template do
    if type(v) == "table" then v = copy(v) end
    out[k] = v
  end
  return out
end

-- A fresh table of the JSON map `text` of column `column`; nil for none (NULL or "").
local function map(column, text)
  if text == nil or text == "" then return nil end
  local known = templates[column]
  local template = known and known[text]
  if template == nil then
    local ok, decoded = decode(column, text)
    if not ok then error(decoded, 0) end
    if kept >= MAPS_MAX then templates, kept = {}, 0 end
    known = templates[column]
    if known == nil then known = {}; templates[column] = known end
    known[text], kept, template = decoded, kept + 1, decoded
  end
  return copy(template)
end

-- The recentReports() array from `count` rows of WIDTH values (REPORT_COLUMNS order): the
-- values decode_row and Enrichment would give, without building them in Python.
function E.reports(a, count)
  local out = {}
  for i = 1, count do
    local b = (i - 1) * WIDTH
    local country, city, latitude, longitude, asn, isp =
      a[b + 17], a[b + 18], a[b + 19], a[b + 20], a[b + 21], a[b + 22]
    -- no enrichment at all (rows.py: no Enrichment): every value unknown, longitude included
    if country == nil and city == nil and latitude == nil and asn == nil and isp == nil then
      longitude = nil
    end
    local r = login_tuple(a[b + 3], a[b + 4], a[b + 5], a[b + 6], a[b + 7] ~= 0, a[b + 8] ~= 0,
                          a[b + 9], a[b + 10] ~= 0, a[b + 11], a[b + 12], a[b + 13],
                          map("attrs", a[b + 14]), map("attrs_mv", a[b + 15]),
                          map("device_attrs", a[b + 16]), country or "", city or "", latitude,
                          longitude, asn, isp or "")
    r.seq, r.received = a[b + 1], a[b + 2]
    out[i] = r
  end
  return out
end

-- run(fn, lt) for an event read back from the log (eventlog/rows.StoredEvent): its stored
-- columns after the address's fields, the maps as their JSON text; the values E.run gets from
-- the decoded Report, built as E.reports builds a row.
function E.run_row(fn, ip, port, hex, version, mapped, t, login, pwhash, success, policy_reject,
                   protocol, tls, device_id, session_id, fail_type, attrs, attrs_mv, device_attrs,
                   country, city, latitude, longitude, asn, isp)
  if country == nil and city == nil and latitude == nil and asn == nil and isp == nil then
    longitude = nil
  end
  return call(fn, login_tuple(t, new_ca(ip, port, hex, version, mapped), login, pwhash,
                              success ~= 0, policy_reject ~= 0, protocol, tls ~= 0, device_id,
                              session_id, fail_type, map("attrs", attrs), map("attrs_mv", attrs_mv),
                              map("device_attrs", device_attrs), country or "", city or "",
                              latitude, longitude, asn, isp or ""))
end

-- recentReports' tables of just the fields `names` (an array): `count` rows of #names values
-- as stored (convert.FieldPlan picks them), each made what E.reports makes of it by its kind:
-- a JSON map decoded, a stored 0/1 a boolean, an unknown text "".
function E.picked(a, count, names, kinds)
  local out, width = {}, #names
  for i = 1, count do
    local b, r = (i - 1) * width, {}
    for j = 1, width do
      local v, kind = a[b + j], kinds[j]
      if kind == "map" then v = map(names[j], v) or {}
      elseif kind == "bool" then v = v ~= 0 and v ~= false  -- stored 0/1, as Python's v != 0
      elseif kind == "text" then v = v or "" end  -- "" when unknown, as in lt
      r[names[j]] = v
    end
    out[i] = r
  end
  return out
end

-- E.reports with the flat values as arguments (few rows: no table to build from Python).
function E.reports_args(count, ...)
  return E.reports({...}, count)
end

-- topValues()' array of {value=, count=} from the flat (value, count, ...) of `count` pairs.
function E.counted(a, count)
  local out = {}
  for i = 1, count do out[i] = {value = a[2 * i - 1], count = a[2 * i]} end
  return out
end

return E
"""

#: How many distinct JSON map texts a state keeps decoded for recentReports (see _EVENTS).
MAPS_MAX = 4096


def protected_call(state: "LuaState", fn: Any, *args: Any) -> tuple[Any, ...]:
    """Call a Lua function under xpcall: (True, results...) or (False, message with traceback)."""
    result = state.values.call(fn, *args)
    return result if isinstance(result, tuple) else (result,)


def _events(state: "LuaState") -> Any:
    """The Lua table of `_EVENTS` for this state; compiled once per state."""
    lib = state.cache.get("events")
    if lib is None:
        lib = state.cache["events"] = state.lua.execute(
            _EVENTS, state.values.lib, guarded(_decode_map(state), state), len(REPORT_COLUMNS),
            MAPS_MAX, name=CHUNK_NAME,
        )
    return lib


def tuple_runner(state: "LuaState") -> Any:
    """The Lua functions that run ``fn(lt)`` for one event (an Event, a StoredEvent); compiled
    once per state."""
    events = _events(state)
    return events.run, events.run_row


def _decode_map(state: "LuaState") -> Any:
    """The Lua table of a JSON map column, as decode_row and the recursive conversion of its
    Event made it (attrs_mv's lists become arrays); called once per distinct text."""
    table_from = state.lua.table_from

    def decode(column: str, text: str) -> Any:
        value = json.loads(text)
        if column == "attrs_mv":
            value = {k: list(v) for k, v in value.items()}
        return table_from(value, recursive=True)

    return decode


#: recentReports' rows up to this many cross as the arguments of one call (~0.1 µs a value),
#: more as one table (~0.2 µs a value, but no limit on Lua's stack).
ARGS_MAX = 8


def report_tables(state: "LuaState", rows: list[tuple]) -> Any:
    """recentReports' array of report tables from rows of REPORT_COLUMNS: the rows cross into
    Lua as one flat table and Lua builds the reports (no Python work per report)."""
    cache = state.cache
    reports = cache.get("reports")
    if reports is None:
        events = _events(state)
        reports = cache["reports"] = (events.reports, events.reports_args)
    if len(rows) <= ARGS_MAX:
        return reports[1](len(rows), *chain.from_iterable(rows))
    return reports[0](_flat(state, rows), len(rows))


_MAPS = ("attrs", "attrs_mv", "device_attrs")
_BOOLS = ("success", "policy_reject", "tls")
_TEXTS = ("country", "city", "isp")  # "" when unknown, as in lt
#: The fields recentReports(filter, n, fields) may name: a report table's keys.
PICKABLE = REPORT_COLUMNS
#: What decides whether a longitude is shown (E.reports: nil when no enrichment at all).
_PLACE = ("country", "latitude", "longitude")


class FieldPlan:
    """What recentReports' `fields` asks for, checked once per state: the columns to read, a
    getter per field over those columns (the value E.reports gives), and the Lua tables of the
    names and of which of them are JSON maps."""

    def __init__(self, state: "LuaState", names: tuple[str, ...]) -> None:
        if not names:
            raise ValueError("fields must name at least one report field")
        for name in names:
            if type(name) is not str:
                raise ValueError(f"fields must hold field names, got {describe(name)}")
            if name not in PICKABLE:
                raise ValueError(f"unknown report field '{name}' in fields (known: "
                                 f"{', '.join(PICKABLE)})")
        wanted = set(names) | (set(_PLACE) if "longitude" in names else set())
        self.columns = tuple(sorted(REPORT_COLUMNS.index(name) for name in wanted))
        at = {REPORT_COLUMNS[column]: i for i, column in enumerate(self.columns)}
        #: the stored values of `names`, in their order, from a row of `columns` (in C: the
        #: conversions to what lt holds are E.picked's, in Lua)
        self.pick = columns_picker(tuple(at[name] for name in names))
        #: A longitude with no country nor latitude: whether the rest of the enrichment is
        #: unknown too (then it is not shown) needs columns not read (the whole rows).
        self.unsure = _unsure_longitude(at) if "longitude" in names else None
        table_from = state.lua.table_from
        self.tables = (table_from(list(names)), table_from([_kind(name) for name in names]))


def _kind(name: str) -> str | bool:
    """What E.picked makes of a stored value of `name` (False: nothing, it is lt's already)."""
    if name in _MAPS:
        return "map"
    if name in _BOOLS:
        return "bool"
    return "text" if name in _TEXTS else False


def _unsure_longitude(at: dict[str, int]) -> Callable[[tuple], bool]:
    country, latitude, longitude = (at[name] for name in _PLACE)
    return lambda row: row[longitude] is not None and row[country] is None and row[latitude] is None


def field_plan(state: "LuaState", fields: Any) -> FieldPlan:
    """The plan of a Lua array of field names (plans are kept per distinct list of names)."""
    if lua_type(fields) != "table":
        raise ValueError(f"fields must be a table of field names, got {describe(fields)}")
    names = tuple(fields.values())
    if len(names) != len(fields):  # keys besides 1..n (or holes): not an array of names
        raise ValueError("fields must be an array of field names, like {\"latitude\", \"longitude\"}")
    plans = state.cache.setdefault("field_plans", {})
    plan = plans.get(names)
    if plan is None:
        if len(plans) >= 256:  # built from what a policy passes: bounded
            plans.clear()
        plan = plans[names] = FieldPlan(state, names)
    return plan


def picked_tables(state: "LuaState", rows: list[tuple], plan: FieldPlan,
                  whole: Callable[[], list[tuple]]) -> Any:
    """recentReports' array of tables holding only `plan`'s fields, from rows of its columns:
    a few values a row cross into Lua instead of every column (impossible_travel's habit check
    reads 200 rows for their latitude and longitude). `whole` gives the rows of every column,
    for the rare answer a longitude makes unsure."""
    unsure = plan.unsure
    if unsure is not None and any(map(unsure, rows)):
        rows = _known_longitudes(whole(), plan)
    flat = list(chain.from_iterable(map(plan.pick, rows)))
    return _events(state).picked(state.lua.table_from(flat), len(rows), *plan.tables)


def _known_longitudes(rows: list[tuple], plan: FieldPlan) -> list[tuple]:
    """Whole rows as rows of the plan's columns, a longitude blanked where E.reports blanks it
    (no enrichment value known at all)."""
    geo = [REPORT_COLUMNS.index(name) for name in ("country", "city", "latitude", "asn", "isp")]
    longitude = REPORT_COLUMNS.index("longitude")
    out = []
    for row in rows:
        if row[longitude] is not None and all(row[g] is None for g in geo):
            row = row[:longitude] + (None,) + row[longitude + 1:]
        out.append(tuple(row[c] for c in plan.columns))
    return out


def counted_table(state: "LuaState", pairs: list[tuple[Any, int]]) -> Any:
    """topValues' array of {value=, count=} tables, built in Lua from one flat table."""
    return _events(state).counted(_flat(state, pairs), len(pairs))


def _flat(state: "LuaState", rows: list[tuple]) -> Any:
    """Rows as one Lua array, row after row: a single crossing whatever their number."""
    return state.lua.table_from(list(chain.from_iterable(rows)))


#: state.cache key of (seq, received) of the report(lt) being run (see call_with_tuple).
LT_TIME = "lt_time"
#: state.cache key of the count helpers' answers given in the report(lt) being run, which the
#: policy runner sets afresh for each report (lua.api_helpers: `_answered`).
ANSWERS = "answers"


def call_with_tuple(state: "LuaState", runner: Any, fn: Any,
                    event: "Event | StoredEvent") -> tuple[bool, Any]:
    """Run `fn(lt)` for one event; returns (ok, error-or-first-result).

    Also leaves the helpers lt's time: a windowed helper then need not look up when lt was
    received (a query on each call). They use it while `state.as_of_seq` is lt's seq, as the
    runner sets it."""
    state.cache[LT_TIME] = (event.seq, event.received)
    if type(event) is StoredEvent:
        c = event.columns
        result = runner[1](fn, *address_fields(c[3]), c[2], *c[4:])
        if isinstance(result, tuple):
            return result[0], result[1] if len(result) > 1 else None
        return result, None
    r = event.report
    table_from = state.lua.table_from
    result = runner[0](
        fn,
        r.t,
        *address_fields(r.remote),
        r.login,
        r.pwhash,
        r.success,
        r.policy_reject,
        r.protocol,
        r.tls,
        r.device_id,
        r.session_id,
        r.fail_type,
        table_from(r.attrs) if r.attrs else None,
        table_from({k: list(v) for k, v in r.attrs_mv.items()}, recursive=True)
        if r.attrs_mv
        else None,
        table_from(r.device_attrs) if r.device_attrs else None,
        *_geo_values(r.geo),
    )
    if isinstance(result, tuple):
        return result[0], result[1] if len(result) > 1 else None
    return result, None


_NO_GEO = ("", "", None, None, None, "")


def _geo_values(geo: Any) -> tuple:
    """lt.country, city, latitude, longitude, asn, isp: "" / nil when unknown (trackalert.enrich)."""
    if geo is None:
        return _NO_GEO
    return (geo.country, geo.city, geo.latitude, geo.longitude, geo.asn, geo.isp)


def is_table(value: Any) -> bool:
    return lua_type(value) == "table"


def number_text(value: int | float) -> str:
    """A number as Lua 5.1 prints it (`%.14g`, integral values without a decimal point)."""
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return format(value, ".14g")
    return str(value)


def scalar_text(value: Any, what: str) -> str:
    """A Lua string or number as text; anything else is a type error naming `what`."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return number_text(value)
    raise TypeError(f"{what} must be a string or a number, got {describe(value)}")


def describe(value: Any) -> str:
    kind = lua_type(value)
    if kind:
        return kind
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def table_items(value: Any, what: str) -> list[tuple[Any, Any]]:
    if not is_table(value):
        raise TypeError(f"{what} must be a table, got {describe(value)}")
    return list(value.items())


def string_list(value: Any, what: str) -> list[str]:
    """An array of strings (numbers accepted), e.g. setACL's argument."""
    items = sorted(table_items(value, what), key=lambda kv: kv[0] if isinstance(kv[0], (int, float)) else 0)
    return [scalar_text(v, f"{what} element") for _, v in items]


def string_map(value: Any, what: str) -> dict[str, str]:
    """A table of string keys to string values (numbers converted), e.g. custom endpoint results."""
    return {
        scalar_text(k, f"{what} key"): scalar_text(v, f"{what} value")
        for k, v in table_items(value, what)
    }


def kv_pairs(value: Any, what: str) -> Iterable[tuple[str, str]]:
    """Pairs in Lua iteration order, for the logging functions."""
    return [
        (scalar_text(k, f"{what} key"), scalar_text(v, f"{what} value"))
        for k, v in table_items(value, what)
    ]
