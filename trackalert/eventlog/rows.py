"""Rows of the `events` table read back as `Event`s, for the log and its queries alike.

Its own module so that the reading side (eventlog/queries.py) and the backend that owns the
file (eventlog/sqlite.py, which builds the queries object) do not import each other.
"""

from __future__ import annotations

import json
from typing import Any

from trackalert.eventlog.base import Event
from trackalert.report import Enrichment, Report

_loads = json.loads


def _geo_from_columns(country: Any, city: Any, latitude: Any, longitude: Any, asn: Any,
                      isp: Any) -> Enrichment | None:
    if country is None and city is None and latitude is None and asn is None and isp is None:
        return None
    return Enrichment(country or "", city or "", latitude, longitude, asn, isp or "")


def decode_row(row: Any) -> Event:
    """An `Event` from an `events` row in table column order."""
    (seq, received, t, login, remote, pwhash, success, policy_reject, protocol, tls, device_id,
     session_id, fail_type, attrs, attrs_mv, device_attrs, extra, delivery_id) = row[:18]
    report = Report(
        t=t, remote=remote, login=login, pwhash=pwhash, success=bool(success),
        policy_reject=bool(policy_reject), protocol=protocol, tls=bool(tls),
        device_id=device_id, session_id=session_id, fail_type=fail_type,
        attrs=_loads(attrs) if attrs else {},
        attrs_mv={k: tuple(v) for k, v in _loads(attrs_mv).items()} if attrs_mv else {},
        device_attrs=_loads(device_attrs) if device_attrs else {},
        extra=_loads(extra) if extra else {},
        geo=_geo_from_columns(*row[18:24]) if len(row) >= 24 else None,
    )
    return Event(seq, received, report, delivery_id)
