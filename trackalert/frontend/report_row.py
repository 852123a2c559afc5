"""A web worker's fast path: a decoded report body straight to the payload the core stores,
without building a `Report` on the way.

Why: a web worker's CPU per report bounds the daemon's ingest as much as the core's does (issue
9), and of what a worker spends on the report itself, validating it into a frozen dataclass
(`report_from_dict`, ~16 attribute sets) only for `ingest.prepare` to take it apart into a row
again was the largest part. A wforce report has every member, each of its exact type, so this
path checks them in one expression and builds the row (and the maps the core rebuilds its
`Report` from) from the decoded values directly, as eventlog/export_rows.py does for an import.

It must hand over exactly what the general path (`report_from_dict`, then `ingest.prepare`)
hands over, to the type (a multi-valued attribute is a tuple): anything it is not sure about
(a member missing, a type it does not expect, an attribute that is not a plain string, a time
that is not a finite number, a map that will not encode) answers None, and the caller takes
the general path, which also words the errors. tests/test_report_row.py compares both paths
over randomised reports and the fuzz corpus.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Mapping

from trackalert.eventlog.ipkey import ip_key
from trackalert.eventlog.rows import geo_columns, json_or_null
from trackalert.ingest import Handover, Prepared
from trackalert.report import (
    ReportError, decode_body, fingerprint, normalise_remote, parse_delivery_id, report_from_dict,
)

if TYPE_CHECKING:
    from trackalert.enrich import Enricher  # GeoIP and ua-parser: imported where they are used

#: The members of a LoginTuple as wforce sends it; any other member is an unknown field (extra).
KNOWN = frozenset(("t", "remote", "login", "pwhash", "success", "policy_reject", "protocol",
                   "tls", "device_id", "session_id", "fail_type", "attrs", "device_attrs"))
#: What a missing `attrs` or `device_attrs` reads as (replaced by a fresh dict once validated).
_EMPTY: dict[str, Any] = {}

#: A validated report before its delivery id and enrichment: see `report_fields`.
Fields = tuple
#: What a worker sends the core for a report: (payload, delivery id, body fingerprint).
Handed = tuple[Any, "str | None", "bytes | None"]


def hand_over(
    body: bytes, received: float, delivery_header: str | None, handover: Handover,
    settings: Mapping[str, Any],
) -> Handed:
    """What goes to the core for a report body: `handover(parse_report(body, received),
    *web.delivery_of(delivery_header, body), settings)`, or the ReportError those raise, in
    that order, but a wforce-shaped report goes straight from the decoded body to its row."""
    doc = decode_body(body)
    fields = report_fields(doc, received)
    report = report_from_dict(doc, received) if fields is None else None
    delivery_id = parse_delivery_id(delivery_header)
    digest = fingerprint(body) if delivery_id is not None else None
    if fields is not None:
        enricher = handover.enricher(settings)
        payload = prepared(fields, delivery_id, enricher) if enricher is not None else None
        if payload is not None:
            return payload, delivery_id, digest
        report = report_from_dict(doc, received)
    assert report is not None
    return handover(report, delivery_id, digest, settings)


def report_fields(doc: dict[str, Any], received: float) -> Fields | None:
    """The validated values of a decoded body (`report.decode_body`), or None when the general
    path must decide. Raises nothing: a report this path accepts, `report_from_dict` accepts
    with the same values (a member missing gets the same default: `received` for `t`)."""
    get = doc.get
    t, remote = get("t", received), get("remote", "0.0.0.0")
    login, pwhash = get("login", ""), get("pwhash", "")
    success, policy_reject = get("success", False), get("policy_reject", False)
    protocol, tls, device_id = get("protocol", ""), get("tls", False), get("device_id", "")
    session_id, fail_type = get("session_id", ""), get("fail_type", "")
    attrs, device_attrs = get("attrs", _EMPTY), get("device_attrs", _EMPTY)
    str_ = str
    if type(t) is not float:
        if type(t) is not int:
            return None
        try:
            t = float(t)
        except OverflowError:  # refused by the general path, which says so
            return None
    if not (type(remote) is str_ and type(login) is str_ and type(pwhash) is str_
            and type(success) is bool and type(policy_reject) is bool
            and type(protocol) is str_ and type(tls) is bool and type(device_id) is str_
            and type(session_id) is str_ and type(fail_type) is str_ and type(attrs) is dict
            and type(device_attrs) is dict and math.isfinite(t)):
        return None
    single, multi = _split(attrs)
    if single is None:
        return None
    for value in device_attrs.values():
        if type(value) is not str_:
            return None
    extra = {key: value for key, value in doc.items() if key not in KNOWN}
    if attrs is _EMPTY:
        single = {}
    if device_attrs is _EMPTY:
        device_attrs = {}
    address = _address(remote)
    if address is None:
        return None
    return (t, address[0], login, pwhash, success, policy_reject, protocol, tls, device_id,
            session_id, fail_type, single, multi, device_attrs, extra, address[1])


def prepared(fields: Fields, delivery_id: str | None, enricher: "Enricher") -> Prepared | None:
    """What `ingest.prepare(enricher, report_from_dict(doc), delivery_id)` returns for the
    report `fields` stands for (`delivery_id` as `parse_delivery_id` returned it), or None when
    a map will not encode (the general path raises the ReportError for that)."""
    (t, remote, login, pwhash, success, policy_reject, protocol, tls, device_id, session_id,
     fail_type, single, multi, device_attrs, extra, key) = fields
    device_attrs, device_json, geo = enricher.lookup_fields(protocol, device_id, device_attrs, remote)
    try:
        maps = (json_or_null(single), json_or_null(multi),
                device_json if device_json is not None else json_or_null(device_attrs),
                json_or_null(extra))
    except (TypeError, ValueError, RecursionError):
        return None
    row = (t, login, remote, pwhash, success, policy_reject, protocol, tls, device_id,
           session_id, fail_type) + maps + (delivery_id,) + geo_columns(geo) + (key,)
    return row, (single, multi, device_attrs, extra)


def _split(attrs: dict[str, Any]) -> tuple[Any, Any]:
    """`report.split_attrs` of `attrs` (the strings, then the arrays of strings as tuples, each
    in their order), or (None, None) for the general path (which words the error)."""
    multi: dict[str, tuple[str, ...]] | None = None
    for key, value in attrs.items():
        if type(value) is not str:
            if type(value) is not list or not all(type(item) is str for item in value):
                return None, None
            if multi is None:
                multi = {}
            multi[key] = tuple(value)
    if multi is None:
        return attrs, {}  # the decoded dict itself: nothing else holds it
    return {key: value for key, value in attrs.items() if type(value) is str}, multi


@functools.lru_cache(maxsize=65536)
def _address(remote: str) -> tuple[str, bytes | None] | None:
    """(the stored `remote`, its ip_key), or None when it does not parse. Cached as
    `normalise_remote` is: the same client addresses report over and over, and `ip_key` parses
    the text with `ipaddress` again."""
    try:
        normal = normalise_remote(remote)
    except ReportError:
        return None
    return normal, ip_key(normal)
