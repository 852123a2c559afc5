"""MaxMind (GeoIP2/GeoLite2) databases: one registry shared by every Lua state (reference §4.6).

Why a registry object rather than readers held by each state: the config runs once per state, but a
database is opened once (by the config state, `newGeoIP2DB`) and looked up by name from everywhere
(`getGeoIP2DB`, the ingest enricher). Reloading swaps the reader object inside each entry under a
lock; a lookup that already fetched the old reader finishes on it (the old mmap is released when
the last reference goes), so reports in flight are never disturbed.
"""

from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

import maxminddb

logger = logging.getLogger("trackalert")


class GeoIPError(Exception):
    """A database cannot be opened (the message says which file and why)."""


class _Entry:
    """A named database: its file and the reader currently serving lookups."""

    __slots__ = ("name", "path", "reader")

    def __init__(self, name: str, path: str, reader: Any) -> None:
        self.name, self.path, self.reader = name, path, reader


def _open_reader(path: str) -> Any:
    try:
        return maxminddb.open_database(path, maxminddb.MODE_AUTO)
    except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
        raise GeoIPError(f"Cannot open {path}: {exc}") from None


class GeoIPRegistry:
    """Every database opened with `newGeoIP2DB`, by name; thread-safe."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        #: Bumped by every reload, so caches of lookup results know to forget them.
        self.generation = 0

    def open(self, name: str, path: str) -> bool:
        """Open `path` as `name`; False (nothing changed) when the name exists (reference: an
        existing name is not replaced). Raises GeoIPError when the file cannot be opened."""
        with self._lock:
            if name in self._entries:
                return False
        reader = _open_reader(path)
        with self._lock:
            if name in self._entries:  # lost a race with another open of the same name
                reader.close()
                return False
            self._entries[name] = _Entry(name, path, reader)
            self.generation += 1
        return True

    def get(self, name: str) -> "GeoIPDB | None":
        with self._lock:
            entry = self._entries.get(name)
        return GeoIPDB(entry) if entry is not None else None

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def reload(self) -> None:
        """Reopen every database from its file; all or nothing (a broken file keeps the old
        readers everywhere and raises GeoIPError)."""
        with self._lock:
            entries = list(self._entries.values())
        fresh = [(entry, _open_reader(entry.path)) for entry in entries]
        with self._lock:
            for entry, reader in fresh:
                entry.reader = reader  # old reader: released by the GC once no lookup holds it
            self.generation += 1

    def close(self) -> None:
        with self._lock:
            entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            entry.reader.close()


@dataclass(frozen=True, slots=True)
class GeoIPRecord:
    """What `lookupCity` returns; Lua reads its members (`rec.city`, `rec.latitude`, ...) from a
    Lua table built from it."""

    #: What the Lua object of this class offers (trackalert.lua.values builds it; a test checks).
    LUA_METHODS: ClassVar[frozenset[str]] = frozenset({
        "country_code", "country_name", "region", "city", "postal_code", "continent_code",
        "latitude", "longitude",
    })

    country_code: str = ""
    country_name: str = ""
    region: str = ""
    city: str = ""
    postal_code: str = ""
    continent_code: str = ""
    latitude: float = 0.0
    longitude: float = 0.0


_EMPTY_RECORD = GeoIPRecord()


def _float32(value: float) -> float:
    # The C++ record stores latitude/longitude as 32-bit floats; keep the same precision.
    return struct.unpack("f", struct.pack("f", value))[0]


def _address_text(address: Any) -> str:
    tostring = getattr(address, "tostring", None)
    if callable(tostring):
        return tostring()
    if isinstance(address, str):
        return address
    raise TypeError(f"expected a ComboAddress, got {type(address).__name__}")


def _walk(record: Any, path: Iterable[str]) -> Any:
    """The value at `path` (keys, or array indices written as strings), or None."""
    value = record
    for key in path:
        if isinstance(value, dict):
            value = value.get(key)
        elif isinstance(value, list):
            try:
                value = value[int(key)]
            except (ValueError, IndexError):
                return None
        else:
            return None
        if value is None:
            return None
    return value


def _string(value: Any) -> str:
    return value if isinstance(value, str) else ""


def city_record(record: dict | None) -> GeoIPRecord:
    """A `GeoIPRecord` from a City (or Country) database record, as the reference maps it."""
    if not record:
        return _EMPTY_RECORD
    cities = record.get("cities")
    city = cities[0] if isinstance(cities, list) and cities else _walk(record, ("city", "names", "en"))
    location = record.get("location") or {}
    lat, lon = location.get("latitude"), location.get("longitude")
    return GeoIPRecord(
        country_code=_string(_walk(record, ("country", "iso_code"))),
        country_name=_string(_walk(record, ("country", "names", "en"))),
        region=_string(_walk(record, ("subdivisions", "0", "iso_code"))),
        city=_string(city),
        postal_code=_string(_walk(record, ("postal", "code"))),
        continent_code=_string(_walk(record, ("continent", "code"))),
        latitude=_float32(lat) if isinstance(lat, (int, float)) else 0.0,
        longitude=_float32(lon) if isinstance(lon, (int, float)) else 0.0,
    )


class GeoIPDB:
    """The Lua-facing database object; an unknown name gives one with no entry (empty lookups).

    Methods take a ComboAddress (a plain address string is accepted too) and never raise for
    missing data or a bad address: they log a warning and return the empty value, as the
    original does.
    """

    #: What the Lua object of this class offers (trackalert.lua.values builds it; a test checks).
    LUA_METHODS: ClassVar[frozenset[str]] = frozenset({
        "lookupCountry", "lookupISP", "lookupCity", "lookupStringValue", "lookupUIntValue",
        "lookupBoolValue", "lookupDoubleValue",
    })

    def __init__(self, entry: _Entry | None = None) -> None:
        self._entry = entry

    @property
    def name(self) -> str:
        return self._entry.name if self._entry else ""

    @property
    def path(self) -> str:
        """The file it reads: a web worker opens the same file to enrich as the core would."""
        return self._entry.path if self._entry else ""

    def record(self, address: Any) -> dict | None:
        """The raw record for `address`, or None (not found, bad address, no database)."""
        entry = self._entry
        if entry is None:
            return None
        text = _address_text(address)
        reader = entry.reader  # one read: a concurrent reload does not change it under us
        try:
            return reader.get(text)
        except (ValueError, TypeError, maxminddb.InvalidDatabaseError) as exc:
            logger.warning("MMDB_lookup_string(%s) failed: %s", text, exc)
            return None

    def lookupCountry(self, address: Any) -> str:  # noqa: N802 - name fixed by the Lua API
        return _string(_walk(self.record(address), ("country", "iso_code")))

    def lookupISP(self, address: Any) -> str:  # noqa: N802
        return _string(_walk(self.record(address), ("isp",)))

    def lookupCity(self, address: Any) -> GeoIPRecord:  # noqa: N802
        return city_record(self.record(address))

    def lookupStringValue(self, address: Any, path: Any) -> str:  # noqa: N802
        return _string(self._at(address, path))

    def lookupUIntValue(self, address: Any, path: Any) -> int:  # noqa: N802
        value = self._at(address, path)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        return 0

    def lookupBoolValue(self, address: Any, path: Any) -> bool:  # noqa: N802
        value = self._at(address, path)
        return value if isinstance(value, bool) else False

    def lookupDoubleValue(self, address: Any, path: Any) -> float:  # noqa: N802
        value = self._at(address, path)
        return value if isinstance(value, float) else 0.0

    def _at(self, address: Any, path: Any) -> Any:
        return _walk(self.record(address), _path_list(path))


def _path_list(path: Any) -> list[str]:
    """The keys of a lookup path as strings (numbers accepted, as the C++ string conversion does).

    The Lua layer hands a Lua array over as a Python list: this module sits below it."""
    if isinstance(path, (list, tuple)):
        return [str(p) for p in path]
    raise TypeError(f"path must be an array of keys, got {type(path).__name__}")
