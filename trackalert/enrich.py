"""Enrichment at ingest: what a report needs that must be frozen when it arrives (DESIGN §3).

Applied where reports enter the log (the web layer's report handler, and the core process for
reports validated by web workers), before the append, so the stored event already carries
country/city/location/ASN/ISP and derived device attributes. Policies then read the same values
live and in a replay months later, even after the mmdb files were updated.

Cheap by construction: results are cached per remote address (GeoIP) and per device id (ua-parser,
with the attributes' JSON), and the GeoIP cache is dropped whenever the databases are reloaded.

With web workers, each worker enriches the reports it parsed (`Enricher.from_snapshot`: the same
database files and regexes as the core's enricher), so the core only stores them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Mapping

from trackalert.devices import DeviceParser
from trackalert.eventlog.rows import json_or_null
from trackalert.geoip import GeoIPDB, GeoIPRegistry
from trackalert.report import Enrichment, Report

logger = logging.getLogger("trackalert")

#: Distinct remote addresses whose GeoIP answer is remembered.
GEO_CACHE_SIZE = 200_000
#: Distinct (protocol, device id) pairs whose derived attributes (and their JSON) are remembered.
DEVICE_CACHE_SIZE = 100_000


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
        self._device = functools.lru_cache(maxsize=DEVICE_CACHE_SIZE)(self._device_attrs)

    @classmethod
    def from_snapshot(
        cls, snapshot: Mapping[str, Any], previous: "Enricher | None" = None
    ) -> "Enricher":
        """The enricher `snapshot()` describes, on databases of its own (a web worker's).

        The device parser of `previous` is kept when the regexes are the same: loading them is
        the slow part, and a GeoIP reload does not change them. Raises GeoIPError when a
        database file cannot be opened here."""
        registry = GeoIPRegistry()
        for path in snapshot["databases"].values():
            registry.open(path, path)  # named by file: two roles on one file share a reader
        devices = None
        if snapshot["devices"]:
            kept = previous._devices if previous is not None else None
            same = kept is not None and kept.regexes_file == snapshot["regexes"]
            devices = kept if same else DeviceParser(snapshot["regexes"])
        return cls(registry, dict(snapshot["databases"]), devices)

    def snapshot(self) -> dict[str, Any]:
        """What another process needs to enrich exactly as this enricher does (builtins only).

        The generation changes with every reload, so a worker knows to reopen the files."""
        return {
            "databases": {role: db.path for role, db in self._dbs.items()},
            "generation": self._registry.generation,
            "devices": self._devices is not None,
            "regexes": self._devices.regexes_file if self._devices is not None else "",
        }

    @property
    def geo_enabled(self) -> bool:
        return bool(self._dbs)

    def enrich(self, report: Report) -> Report:
        """The report with its enrichment; the same object when there is nothing to add."""
        device_attrs, _, geo = self.lookup(report)
        changes: dict = {}
        if device_attrs is not report.device_attrs:
            changes["device_attrs"] = device_attrs
        if geo is not report.geo:
            changes["geo"] = geo
        return dataclasses.replace(report, **changes) if changes else report

    def lookup(self, report: Report) -> tuple[Mapping[str, str], str | None, Enrichment | None]:
        """(device_attrs, their JSON or None, geo) of the enriched report, without building it:
        ingest encodes the row straight from these. The attributes are the report's own objects
        when there is nothing to add; derived ones are a fresh dict (callers may keep it)."""
        return self.lookup_fields(
            report.protocol, report.device_id, report.device_attrs, report.remote, report.geo
        )

    def lookup_fields(
        self, protocol: str, device_id: str, device_attrs: Mapping[str, str], remote: str,
        geo: Enrichment | None = None,
    ) -> tuple[Mapping[str, str], str | None, Enrichment | None]:
        """`lookup` of a report given as the fields it reads: a web worker encodes the row
        straight from the decoded body, without a Report (frontend/report_row.py)."""
        device_json = None
        if self._devices is not None and device_id and not device_attrs:
            attrs, text = self._device(protocol, device_id)
            if attrs:
                device_attrs, device_json = dict(attrs), text
        if self._dbs:
            if self._registry.generation != self._generation:  # reloaded: answers may differ
                self._generation = self._registry.generation
                self._lookup.cache_clear()
            found = self._lookup(remote)
            if found is not None:
                geo = found
        return device_attrs, device_json, geo

    def _device_attrs(self, protocol: str, device_id: str) -> tuple[dict[str, str], str | None]:
        assert self._devices is not None
        attrs = self._devices.attributes(protocol, device_id)
        return attrs, json_or_null(attrs)

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
