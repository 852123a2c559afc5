"""Key tuples of events and filters, shared by the projections (windows.py, recent.py).

Why it is its own module: every projection must key an event and a filter exactly as the SQL
compares them (addresses by their `ip_key`, a netmask as the address masked to its bits and of
its family, NULL never equal, map values only when JSON strings), so there is one definition.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import operator
from typing import TYPE_CHECKING, Any, Callable

from trackalert.eventlog.base import Event
from trackalert.eventlog.filters import Filter
from trackalert.eventlog.ipkey import V4, V6, ip_key
from trackalert.eventlog.rows import StoredEvent

if TYPE_CHECKING:
    from trackalert.eventlog.bound import BoundFilter

#: Positions in an `event_fields` row.
SEQ, RECEIVED, LOGIN, SUCCESS, IP, PWHASH, COUNTRY, PROTOCOL, ASN, DEVICE_ATTRS, ATTRS = range(11)

Row = tuple

_COLUMN_KEYS = {"login": LOGIN, "pwhash": PWHASH, "country": COUNTRY, "protocol": PROTOCOL,
                "asn": ASN}


def event_fields(event: "Event | StoredEvent") -> Row:
    """The `FIELDS_ROW` (eventlog/base.py) of an event in memory, with the values the log stores.

    The same values as a stored row (address as its `ip_key`, unknown enrichment as None), so
    that counts built from memory and from the log agree; success is a bool here and the stored
    0/1 (equal to it) from `read_fields`, the maps are mappings here and JSON text (or None when
    empty) from `read_fields`.
    """
    if type(event) is StoredEvent:  # read back from the log: the stored values themselves
        return event.fields
    r = event.report
    geo = r.geo
    return (event.seq, event.received, r.login, bool(r.success), ip_key(r.remote), r.pwhash,
            (geo.country or None) if geo else None, r.protocol, geo.asn if geo else None,
            r.device_attrs, r.attrs)


#: The plain equality keys of a filter, in the order of its key tuple.
EQUALITY_ORDER = ("login", "remote", "netmask", "pwhash", "country", "protocol", "asn")


@functools.lru_cache(maxsize=4096)
def network_key(text: str) -> tuple[str, bytes]:
    """(key spec, key value) of a filter's netmask: family and bits, and the masked address."""
    network = ipaddress.ip_network(text, strict=False)
    tag = V4 if network.version == 4 else V6
    return f"net{network.version}/{network.prefixlen}", tag + network.network_address.packed


def equality_keys(flt: "Filter | BoundFilter") -> tuple[tuple[str, ...], tuple]:
    """(key specs, key values) of a filter's equality keys, as `key_function` reads them from
    a row: what every projection keys its state by. A bound filter (bound.py) knows its own."""
    if type(flt) is not Filter:
        return flt.equality
    specs: list[str] = []
    values: list[Any] = []
    for name in EQUALITY_ORDER:
        value = getattr(flt, name)
        if value is None:
            continue
        if name == "remote":
            value = ip_key(value)  # None: SQL's `ip = NULL`, which matches nothing
        elif name == "netmask":
            name, value = network_key(value)
        specs.append(name)
        values.append(value)
    for prefix, pairs in (("d:", flt.device_attrs), ("a:", flt.attrs)):
        for key, value in pairs:
            specs.append(prefix + key)
            values.append(value)
    return tuple(specs), tuple(values)



@functools.lru_cache(maxsize=65536)
def _masked(ip: bytes, tag: bytes, bits: int) -> bytes | None:
    if ip[:1] != tag:
        return None
    width = len(ip) - 1
    value = int.from_bytes(ip[1:], "big") >> (width * 8 - bits) << (width * 8 - bits)
    return tag + value.to_bytes(width, "big")


def _column(spec: str) -> int | None:
    """The row position a key spec reads as it is, or None when it is computed."""
    return IP if spec == "remote" else _COLUMN_KEYS.get(spec)


def spec_column(spec: str) -> int:
    """The row position a key spec's value is computed from (what a grouped count groups by)."""
    index = _column(spec)
    if index is not None:
        return index
    if spec.startswith("net"):
        return IP
    return DEVICE_ATTRS if spec.startswith("d:") else ATTRS


def spec_extractor(spec: str) -> Callable[[Row], Any]:
    """The value of one key spec in a row (None: the event cannot match that key): one part
    of `key_function`'s tuple."""
    index = _column(spec)
    if index is not None:
        return operator.itemgetter(index)
    if spec.startswith("net"):
        tag = V4 if spec[3] == "4" else V6
        bits = int(spec.split("/")[1])
        return lambda row: _masked(row[IP], tag, bits) if row[IP] is not None else None
    index = DEVICE_ATTRS if spec.startswith("d:") else ATTRS
    key = spec[2:]

    def map_value(row: Row) -> str | None:
        mapping = row[index]
        if not mapping:
            return None
        if type(mapping) is str:  # as stored: parsed only for the shapes that look inside
            mapping = _parsed_map(mapping)
        value = mapping.get(key)
        return value if type(value) is str else None  # json_extract of a number never = text

    return map_value


#: Stored maps repeat (a few browsers, a few sites): parse each text once. Read only.
_parsed_map = functools.lru_cache(maxsize=8192)(json.loads)


def key_function(specs: tuple[str, ...]) -> Callable[[Row], tuple | None]:
    """The key tuple of a row for `specs`, None when one of them is NULL (hot: every event and
    shape, so plain columns are one itemgetter)."""
    if not specs:
        return lambda row: ()
    columns = [_column(spec) for spec in specs]
    if None not in columns:
        get = operator.itemgetter(*columns)
        if len(columns) == 1:
            def one(row: Row) -> tuple | None:
                value = get(row)
                return None if value is None else (value,)
            return one

        def several(row: Row) -> tuple | None:
            values = get(row)
            return None if None in values else values
        return several
    parts = [spec_extractor(spec) for spec in specs]

    def computed(row: Row) -> tuple | None:
        values = tuple([part(row) for part in parts])
        return None if None in values else values

    return computed


