"""Lua globals for MaxMind GeoIP2 databases (reference §4.6) and ingest enrichment."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from trackalert import log
from trackalert.geoip import GeoIPDB, GeoIPError
from trackalert.lua.convert import scalar_text, table_items
from trackalert.lua.registry import Where, lua_global

if TYPE_CHECKING:
    from trackalert.lua.state import LuaState


@lua_global(
    "newGeoIP2DB", Where.CONFIG | Where.CLIENT, "newGeoIP2DB(name, file)",
    """Open a MaxMind DB file (City, Country, ISP, ASN, Anonymous-IP, ...) and register it under
    `name` for every Lua state; an existing name is not replaced. A file that cannot be opened is
    logged (`newGeoIPDB(): Error initialising GeoIP2DB (...)`) and reported on the console, and
    is not fatal. `reloadGeoIPDBs()` reopens all files without a restart.""",
    example='newGeoIP2DB("City", "/usr/share/GeoIP/GeoLite2-City.mmdb")', topic="geoip",
)
def _new_db(state: "LuaState") -> Callable[[Any, Any], None]:
    def new_db(name: Any, path: Any) -> None:
        name_text = scalar_text(name, "name")
        path_text = scalar_text(path, "file")
        try:
            state.host.geoip.open(name_text, path_text)
        except GeoIPError as exc:
            log.logger.error("newGeoIPDB(): Error initialising GeoIP2DB (%s)", exc)
            state.host.console_append(f"newGeoIP2DB(): Error loading GeoIP2 DB ({exc})\n")

    return new_db


@lua_global(
    "getGeoIP2DB", Where.EVERYWHERE, "getGeoIP2DB(name) -> db",
    """The database opened as `name`. Methods (argument: a ComboAddress): `db:lookupCountry(ca)`
    (ISO code), `db:lookupISP(ca)`, `db:lookupCity(ca)` (a record with `country_code`,
    `country_name`, `region`, `city`, `postal_code`, `continent_code`, `latitude`, `longitude`),
    and by path (`{"city","names","en"}`): `lookupStringValue`, `lookupUIntValue`,
    `lookupBoolValue`, `lookupDoubleValue`. Missing data gives `""`, 0 or false; an unknown name
    logs an error and gives a database whose lookups are all empty.""",
    example='local db = getGeoIP2DB("City")\nlocal cc = db:lookupCountry(lt.remote)',
    topic="geoip",
)
def _get_db(state: "LuaState") -> Callable[[Any], GeoIPDB]:
    def get_db(name: Any) -> GeoIPDB:
        name_text = scalar_text(name, "name")
        db = state.host.geoip.get(name_text)
        if db is None:
            log.logger.error("getGeoIP2DB(): Could not find database named %s", name_text)
            return GeoIPDB()
        return db

    return get_db


ENRICHMENT_KEYS = ("city", "country", "asn", "isp")


@lua_global(
    "setEnrichment", Where.CONFIG, "setEnrichment({city=name, country=name, asn=name, isp=name})",
    """Which GeoIP databases (by their `newGeoIP2DB` name) enrich every report when it is
    stored: `city` gives country, city and latitude/longitude; `country` the country only (when
    no City DB is given); `asn` the AS number and organisation; `isp` the ISP name (and the AS
    number when no ASN DB is given). The values are frozen in the event log, so policies and
    replays see them even after the mmdb files change; `lt.country`, `lt.city`, `lt.latitude`,
    `lt.longitude`, `lt.asn` and `lt.isp` expose them. Read once at start.""",
    example='setEnrichment({city="City", asn="ASN", isp="ISP"})', topic="geoip",
)
def _set_enrichment(state: "LuaState") -> Callable[[Any], None]:
    def set_enrichment(config: Any) -> None:
        chosen: dict[str, str] = {}
        for key, value in table_items(config, "enrichment"):
            if key not in ENRICHMENT_KEYS:
                raise ValueError(
                    f"unknown enrichment key {key!r} (expected one of {', '.join(ENRICHMENT_KEYS)})"
                )
            chosen[key] = scalar_text(value, f"enrichment {key}")
        state.host.settings.enrichment = chosen

    return set_enrichment
