"""Enrichment at ingest: what a report needs that must be frozen when it arrives (DESIGN §3).

Applied where reports enter the log (the web layer's report handler, and the core process for
reports validated by web workers), before the append, so the stored event already carries
country/city/location/ASN/ISP and derived device attributes. Policies then read the same values
live and in a replay months later, even after the mmdb files were updated.

Cheap by construction: results are cached per remote address (GeoIP) and per device id (ua-parser),
and the GeoIP cache is dropped whenever the databases are reloaded.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Mapping

from trackalert.devices import DeviceParser
from trackalert.geoip import GeoIPDB, GeoIPRegistry
from trackalert.report import Enrichment, Report

logger = logging.getLogger("trackalert")

#: Distinct remote addresses whose GeoIP answer is remembered.
GEO_CACHE_SIZE = 200_000


class Enricher:
    """Adds `Report.geo` (from the databases named in `setEnrichment`) and derived device_attrs."""

    def __init__(
        self,
        geoip: GeoIPRegistry,
        databases: Mapping[str, str],
        devices: DeviceParser | None = None,
    ) -> None:
        self._registry = geoip
        self._devices = devices
        self._dbs: dict[str, GeoIPDB] = {}
        for role, name in databases.items():
            db = geoip.get(name)
            if db is None:
                logger.error(
                    "setEnrichment(): no GeoIP database named %s (open it with newGeoIP2DB); "
                    "reports will not get %s data", name, role,
                )
            else:
                self._dbs[role] = db
        self._generation = geoip.generation
        self._lookup = functools.lru_cache(maxsize=GEO_CACHE_SIZE)(self._geo)

    @property
    def geo_enabled(self) -> bool:
        return bool(self._dbs)

    def enrich(self, report: Report) -> Report:
        """The report with its enrichment; the same object when there is nothing to add."""
        changes: dict = {}
        devices = self._devices
        if devices is not None and report.device_id and not report.device_attrs:
            attrs = devices.attributes(report.protocol, report.device_id)
            if attrs:
                changes["device_attrs"] = attrs
        if self._dbs:
            if self._registry.generation != self._generation:  # reloaded: answers may differ
                self._generation = self._registry.generation
                self._lookup.cache_clear()
            geo = self._lookup(report.remote)
            if geo is not None:
                changes["geo"] = geo
        return dataclasses.replace(report, **changes) if changes else report

    def _geo(self, remote: str) -> Enrichment | None:
        dbs = self._dbs
        country = city = isp = ""
        latitude = longitude = None
        asn: int | None = None
        if "city" in dbs:
            record = dbs["city"].record(remote)
            if record:
                rec = dbs["city"].lookupCity(remote)
                country, city = rec.country_code, rec.city
                location = record.get("location") or {}
                if isinstance(location.get("latitude"), (int, float)):
                    latitude = float(location["latitude"])
                    longitude = float(location.get("longitude") or 0.0)
        if not country and "country" in dbs:
            country = dbs["country"].lookupCountry(remote)
        if "asn" in dbs:
            asn = dbs["asn"].lookupUIntValue(remote, ["autonomous_system_number"]) or None
        if "isp" in dbs:
            isp = dbs["isp"].lookupISP(remote)
            if asn is None:
                asn = dbs["isp"].lookupUIntValue(remote, ["autonomous_system_number"]) or None
        if not (country or city or isp) and latitude is None and asn is None:
            return None
        return Enrichment(country, city, latitude, longitude, asn, isp)
