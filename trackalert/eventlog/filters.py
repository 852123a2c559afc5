"""The filter of the long-term helpers (DESIGN §5), independent of any backend.

A policy's filter table is validated here once, into a `Filter` value: every backend (SQLite
today, Elasticsearch later) receives the same checked object and never sees raw Lua data, and a
mistake in a policy (`{logn="alice"}`) is a clear error naming the key instead of a query that
silently matches everything.
"""

from __future__ import annotations

import functools
import ipaddress
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from trackalert.durations import DurationError, parse_span
from trackalert.netaddr import AddressError, parse_combo

FILTER_KEYS = ("login", "remote", "netmask", "success", "protocol", "pwhash", "country", "asn",
               "window", "since", "until")
MAP_PREFIXES = ("device_attrs.", "attrs.")
#: Plain fields countDistinct/topValues can count (besides device_attrs.<key>, attrs.<key> and
#: remote/<bits>).
FIELDS = ("login", "remote", "pwhash", "protocol", "country", "city", "asn", "isp", "device_id",
          "fail_type", "session_id")


class FilterError(ValueError):
    """A filter or field a policy passed is not valid; the message names what is wrong."""


@dataclass(frozen=True, slots=True)
class Filter:
    """Which events a helper looks at. None = no condition; every condition must hold."""

    login: str | None = None
    remote: str | None = None
    netmask: str | None = None
    success: bool | None = None
    protocol: str | None = None
    pwhash: str | None = None
    country: str | None = None
    asn: int | None = None
    device_attrs: tuple[tuple[str, str], ...] = ()
    attrs: tuple[tuple[str, str], ...] = ()
    #: Only events received in the last `window` seconds (before the as-of time).
    window: float | None = None
    #: Only events received at or after `since` / at or before `until` (epoch seconds).
    since: float | None = None
    until: float | None = None


@dataclass(frozen=True, slots=True)
class Field:
    """What countDistinct/topValues count: a column, a map key, or an address prefix."""

    name: str
    kind: str  # "column" | "device_attrs" | "attrs" | "prefix"
    key: str = ""
    bits: int = 0


@dataclass(frozen=True, slots=True)
class AsOf:
    """The point in the log a helper answers for.

    In `report(lt)`: `before_seq` = lt's seq (events strictly before it; "now" is when lt was
    received). Elsewhere: `now` = the clock's time (events received up to then).
    """

    before_seq: int | None = None
    now: float | None = None


def _text(key: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, ".14g") if isinstance(value, float) and not value.is_integer() else str(int(value))
    raise FilterError(f"filter key '{key}' must be a string, got {_kind(value)}")


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FilterError(f"filter key '{key}' must be a number, got {_kind(value)}")
    return float(value)


def _kind(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__


def _map_key(key: str, prefix: str) -> str:
    name = key[len(prefix):]
    if not name or '"' in name or "\\" in name or any(ord(c) < 32 for c in name):
        raise FilterError(f"bad {prefix[:-1]} key in '{key}' (empty or with quotes/control characters)")
    return name


def parse_filter(items: Iterable[tuple[Any, Any]]) -> Filter:
    """A `Filter` from (key, value) pairs, e.g. a Lua table's items."""
    values: dict[str, Any] = {}
    maps: dict[str, list[tuple[str, str]]] = {"device_attrs": [], "attrs": []}
    for key, value in items:
        attribute, name, convert = key_converter(key)
        if name:
            maps[attribute].append((name, convert(value)))
        else:
            values[attribute] = convert(value)
    return Filter(device_attrs=tuple(sorted(maps["device_attrs"])),
                  attrs=tuple(sorted(maps["attrs"])), **values)


#: What one filter key's value becomes: (Filter attribute, map key or "", checking converter).
KeyConverter = tuple[str, str, Callable[[Any], Any]]


def key_converter(key: Any) -> KeyConverter:
    """How `parse_filter` reads the value of `key`: shared with the filter plans (bound.py), so
    that a filter parsed once per shape checks each value exactly as parse_filter does."""
    if not isinstance(key, str):
        raise FilterError(f"filter keys must be strings, got {_kind(key)} {key!r}")
    return _key_converter(key)


@functools.lru_cache(maxsize=1024)  # errors (unknown keys) are not remembered
def _key_converter(key: str) -> KeyConverter:
    if key in ("login", "protocol", "pwhash", "country"):
        return key, "", functools.partial(_text, key)
    simple = _CONVERTERS.get(key)
    if simple is not None:
        return key, "", simple
    for prefix in MAP_PREFIXES:
        if key.startswith(prefix):
            return prefix[:-1], _map_key(key, prefix), functools.partial(_text, key)
    raise FilterError(
        f"unknown filter key '{key}' (known keys: {', '.join(FILTER_KEYS)}, "
        f"device_attrs.<key>, attrs.<key>)"
    )


def _success(value: Any) -> bool:
    if not isinstance(value, bool):
        raise FilterError(f"filter key 'success' must be a boolean, got {_kind(value)}")
    return value


def _asn(value: Any) -> int:
    number = _number("asn", value)
    if not number.is_integer() or number < 0:
        raise FilterError("filter key 'asn' must be a non-negative integer")
    return int(number)


def parse_field(name: Any) -> Field:
    """What `countDistinct`/`topValues` count, from its name."""
    if not isinstance(name, str):
        raise FilterError(f"field must be a string, got {_kind(name)}")
    if name in FIELDS:
        return Field(name, "column")
    for prefix in MAP_PREFIXES:
        if name.startswith(prefix):
            return Field(name, prefix[:-1], _map_key(name, prefix))
    if name.startswith("remote/"):
        bits = name[len("remote/"):]
        if bits.isdigit() and 0 < int(bits) <= 128 and int(bits) % 8 == 0:
            return Field(name, "prefix", bits=int(bits))
        raise FilterError(f"field '{name}': the prefix length must be a multiple of 8 (8..128)")
    raise FilterError(
        f"unknown field '{name}' (known fields: {', '.join(FIELDS)}, device_attrs.<key>, "
        f"attrs.<key>, remote/<bits>)"
    )


def _remote(value: Any) -> str:
    text = value.tostring() if callable(getattr(value, "tostring", None)) else value
    if not isinstance(text, str):
        raise FilterError(f"filter key 'remote' must be an address, got {_kind(value)}")
    return _address(text)


@functools.lru_cache(maxsize=4096)  # the few addresses of an attack, asked on each of its reports
def _address(text: str) -> str:
    try:
        return parse_combo(text).unmapped().tostring()  # as reports are stored
    except AddressError as exc:
        raise FilterError(f"filter key 'remote': {exc}") from None


def _netmask(value: Any) -> str:
    text = value.toStringNetwork() if callable(getattr(value, "toStringNetwork", None)) else value
    if not isinstance(text, str):
        raise FilterError(f"filter key 'netmask' must be a string like \"192.0.2.0/24\", got {_kind(value)}")
    return _network(text)


@functools.lru_cache(maxsize=4096)  # a policy asks about the same few networks over and over
def _network(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError as exc:
        raise FilterError(f"filter key 'netmask': {exc}") from None


@functools.lru_cache(maxsize=256, typed=True)  # a handful of windows, asked on every report
def _window(value: Any) -> float:
    if isinstance(value, str):
        try:
            seconds = parse_span(value)
        except (DurationError, ValueError) as exc:
            raise FilterError(f"filter key 'window': {exc}") from None
    else:
        seconds = _number("window", value)
    if seconds <= 0:
        raise FilterError("filter key 'window' must be longer than 0s")
    return float(seconds)


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "remote": _remote,
    "netmask": _netmask,
    "success": _success,
    "asn": _asn,
    "window": _window,
    "since": functools.partial(_number, "since"),
    "until": functools.partial(_number, "until"),
}
