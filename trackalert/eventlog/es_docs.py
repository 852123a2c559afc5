"""Events as Elasticsearch documents, and back (the mapping is elasticqueries/templates/).

Why the document looks like this:

* The report's own fields are top-level keywords/booleans/doubles under their wforce names, so
  Kibana and the sample queries read naturally; `ip` is the address as an ``ip`` field (what the
  remote/netmask filters and remote/<bits> prefixes use), `remote` its text as stored.
* The maps (`attrs`, `attrs_mv`, `device_attrs`) and unknown fields (`extra`) are kept in
  `_source` only (mapped ``enabled: false``): with dynamic object mappings a report with keys
  ``os`` and ``os.family`` is *refused* by the cluster (measured on osmem-server:
  "Existing mapping for [device_attrs.os] must be of type object"), and a refused report is a
  lost one. Their filterable form is `attrs_kv`/`device_attrs_kv`: ``key=value`` keywords, the
  key's ``\\`` and ``=`` escaped, so one exact term answers ``attrs.<key>=value``.
* Enrichment values that are unknown ("" or None) are left out, as SQLite stores NULL: the same
  filters and counts then match the same events on both backends.
"""

from __future__ import annotations

import hashlib
from typing import Any

from trackalert.eventlog.base import DeliveryKey, Event
from trackalert.eventlog.ipkey import ip_key
from trackalert.eventlog.rows import geo_columns, json_or_null
from trackalert.report import Enrichment, Report

#: The top-level text/flag fields copied as they are (the order of Report's fields).
_PLAIN = ("login", "remote", "pwhash", "success", "policy_reject", "protocol", "tls",
          "device_id", "session_id", "fail_type")
_GEO = ("country", "city", "latitude", "longitude", "asn", "isp")


def kv_term(key: str, value: str) -> str:
    """The `attrs_kv`/`device_attrs_kv` term of one map entry."""
    return key.replace("\\", "\\\\").replace("=", "\\=") + "=" + value


def kv_split(term: str) -> tuple[str, str]:
    """The (key, value) of a `kv_term` (the first unescaped ``=`` ends the key)."""
    key: list[str] = []
    i = 0
    while i < len(term):
        c = term[i]
        if c == "\\" and i + 1 < len(term):
            key.append(term[i + 1])
            i += 2
            continue
        if c == "=":
            return "".join(key), term[i + 1:]
        key.append(c)
        i += 1
    return "".join(key), ""


def kv_prefix(key: str) -> str:
    """What every term of `key` starts with."""
    return kv_term(key, "")


def event_doc_id(seq: int, key: DeliveryKey | None, variant: bool = False) -> str:
    """The `_id` an event is stored under: stable across retries of one bulk, so a retried
    bulk stores nothing twice (a second create of the same `_id` is a 409).

    An event with a delivery id is keyed by it (`delivery_ids`), so the cluster itself tells a
    retried wforce delivery (from any node) from a new report; others by their seq.
    """
    if key is None:
        return f"s{seq}"
    first, other = delivery_ids(key)
    return other if variant else first


def delivery_ids(key: DeliveryKey) -> tuple[str, str]:
    """The two `_id`s a delivery can be stored under: the id's first body takes the first; a
    later, different body under the same id (a wforce id collision) the second, which names the
    body's fingerprint too. One mget of both tells retry, collision and first delivery apart."""
    delivery_id, fp = key
    digest = hashlib.sha256(delivery_id.encode("utf-8")).hexdigest()[:32]
    return f"d{digest}", f"d{digest}.{hashlib.sha256(fp).hexdigest()[:32]}"


def fingerprint_text(fp: bytes) -> str:
    return fp.hex()


def to_doc(seq: int, received: float, report: Report, delivery_id: str | None,
           fp: bytes | None, node: str | None = None) -> dict[str, Any]:
    """The document of one event (the report was checked storable by `encode_row` before);
    `node` is the node that stored it (whose policy runner runs it)."""
    r = report
    doc: dict[str, Any] = {
        "seq": seq, "received": received, "@timestamp": round(received * 1000), "t": float(r.t),
    }
    if node is not None:
        doc["node"] = node
    for name in _PLAIN:
        doc[name] = getattr(r, name)
    if ip_key(r.remote) is not None:
        doc["ip"] = r.remote
    for name, mapping in (("attrs", r.attrs), ("device_attrs", r.device_attrs)):
        if mapping:
            doc[name] = dict(mapping)
            doc[name + "_kv"] = [kv_term(k, v) for k, v in mapping.items()]
    if r.attrs_mv:
        doc["attrs_mv"] = {k: list(v) for k, v in r.attrs_mv.items()}
    if r.extra:
        doc["extra"] = dict(r.extra)
    for name, value in zip(_GEO, geo_columns(r.geo)):
        if value is not None:
            doc[name] = value
    if r.geo is not None and r.geo.latitude is not None and r.geo.longitude is not None:
        doc["location"] = {"lat": r.geo.latitude, "lon": r.geo.longitude}
    if delivery_id is not None:
        doc["delivery_id"] = delivery_id
    if fp is not None:
        doc["delivery_fp"] = fingerprint_text(fp)
    return doc


def from_doc(source: dict[str, Any]) -> Event:
    """The `Event` a document stores."""
    get = source.get
    geo_values = [get(name) for name in _GEO]
    geo = None if all(v is None for v in geo_values) else Enrichment(
        geo_values[0] or "", geo_values[1] or "", geo_values[2], geo_values[3], geo_values[4],
        geo_values[5] or "")
    report = Report(
        t=source["t"], remote=source["remote"], login=source["login"], pwhash=source["pwhash"],
        success=source["success"], policy_reject=source["policy_reject"],
        protocol=source["protocol"], tls=source["tls"], device_id=source["device_id"],
        session_id=source["session_id"], fail_type=source["fail_type"],
        attrs=get("attrs") or {},
        attrs_mv={k: tuple(v) for k, v in (get("attrs_mv") or {}).items()},
        device_attrs=get("device_attrs") or {}, extra=get("extra") or {}, geo=geo,
    )
    return Event(source["seq"], source["received"], report, get("delivery_id"))


def to_report_row(source: dict[str, Any]) -> tuple:
    """A document as a row of REPORT_COLUMNS, exactly as SQLite returns it (maps as compact JSON
    text or None, flags as 0/1, unknown enrichment as None)."""
    get = source.get
    return (
        source["seq"], source["received"], source["t"], source["remote"], source["login"],
        source["pwhash"], int(source["success"]), int(source["policy_reject"]), source["protocol"],
        int(source["tls"]), source["device_id"], source["session_id"], source["fail_type"],
        json_or_null(get("attrs")), json_or_null(get("attrs_mv")), json_or_null(get("device_attrs")),
    ) + tuple(get(name) for name in _GEO)
