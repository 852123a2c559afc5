"""Values crossing between Python and Lua.

Data only ever crosses as values (strings, numbers, booleans, Lua tables), never as code and never
as Python objects (trackalert.lua.values says why): a login name full of Lua syntax is just a
string to the policy.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable

import lupa.luajit21 as luajit

from trackalert.lua.values import CHUNK_NAME, address_fields

if TYPE_CHECKING:
    from trackalert.eventlog.base import Event
    from trackalert.lua.state import LuaState

lua_type = luajit.lua_type

# Builds the LoginTuple table in Lua (one crossing instead of one per field; lt.remote is a Lua
# ComboAddress built from plain values) and runs the policy protected (values: V.call) so an error
# comes back as text with its Lua traceback instead of unwinding Python.
_RUN_WITH_TUPLE = """
local V = ...
local new_ca, call = V.ca, V.call
return function(fn, t, ip, port, hex, version, mapped, login, pwhash, success, policy_reject,
                protocol, tls, device_id, session_id, fail_type, attrs, attrs_mv, device_attrs,
                country, city, latitude, longitude, asn, isp)
  local lt = {t=t, remote=new_ca(ip, port, hex, version, mapped), login=login, pwhash=pwhash,
              success=success, policy_reject=policy_reject, protocol=protocol, tls=tls,
              device_id=device_id, session_id=session_id, fail_type=fail_type, attrs=attrs or {},
              attrs_mv=attrs_mv or {}, device_attrs=device_attrs or {},
              country=country, city=city, latitude=latitude, longitude=longitude, asn=asn,
              isp=isp}
  return call(fn, lt)
end
"""


def protected_call(state: "LuaState", fn: Any, *args: Any) -> tuple[Any, ...]:
    """Call a Lua function under xpcall: (True, results...) or (False, message with traceback)."""
    result = state.values.call(fn, *args)
    return result if isinstance(result, tuple) else (result,)


def tuple_runner(state: "LuaState") -> Any:
    """The Lua function that runs ``fn(lt)`` for one event; compiled once per state."""
    runner = state.cache.get("tuple_runner")
    if runner is None:
        runner = state.cache["tuple_runner"] = state.lua.execute(
            _RUN_WITH_TUPLE, state.values.lib, name=CHUNK_NAME
        )
    return runner


def call_with_tuple(state: "LuaState", runner: Any, fn: Any, event: "Event") -> tuple[bool, Any]:
    """Run `fn(lt)` for one event; returns (ok, error-or-first-result)."""
    r = event.report
    table_from = state.lua.table_from
    result = runner(
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
