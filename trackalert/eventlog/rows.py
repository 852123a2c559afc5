"""Rows of the `events` table: reports encoded for the insert, and read back as `Event`s.

Its own module so that the reading side (eventlog/queries.py) and the backend that owns the
file (eventlog/sqlite.py, which builds the queries object) do not import each other, and so that
a web worker can encode the row its report will be stored as without importing the backend (and
SQLAlchemy): the core process then only inserts it.
"""

from __future__ import annotations

import functools
import json
import json.encoder
from typing import Any, Callable, Mapping

from trackalert.eventlog.base import REPORT_COLUMNS, Event, new_event, positional_builder
from trackalert.eventlog.ipkey import ip_key
from trackalert.report import Enrichment, Report, ReportError, printable

_loads = json.loads
#: Report(*all its fields), built without the frozen __init__'s per-field calls (base.py).
_new_report: Callable[..., Report] = positional_builder(Report)


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


#: Compact JSON, UTF-8 text kept as is, no NaN/inf: the C encoder that
#: `json.JSONEncoder(...).encode` rebuilds on every call (~2 µs of a report's 3 maps each), built
#: once. Without circular-reference markers: a cyclic value ends in RecursionError, caught below.
_encoder = json.encoder.c_make_encoder(
    None, _not_json, json.encoder.encode_basestring, None, ":", ",", False, False, False,
) if json.encoder.c_make_encoder is not None else None
_slow_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode

#: Position of the delivery id in an encoded row, and of the six enrichment columns.
DELIVERY_COLUMN = 15
GEO_COLUMNS = slice(16, 22)


# --------------------------------------------------------------------------- encoding


def json_or_null(mapping: Any) -> str | None:
    """Compact JSON for a non-empty mapping; NULL for an empty one (smaller; read back as {})."""
    if not mapping:
        return None
    value = mapping if type(mapping) is dict else dict(mapping)
    if _encoder is None:  # pragma: no cover - CPython always has the C encoder
        return _slow_dumps(value)
    return "".join(_encoder(value, 0))


def encode_row(report: Report, delivery_id: str | None) -> tuple:
    """The `events` columns after (seq, received), in table order.

    Done on the caller's side, not in the writer, so that a report that cannot be stored fails
    its own append (a ReportError) instead of the whole batch it would have been committed
    with: every text column is encoded as UTF-8 here, strictly, as SQLite will need it.
    """
    return encode_enriched(report, delivery_id, report.device_attrs, None, report.geo)


def encode_enriched(
    report: Report, delivery_id: str | None, device_attrs: Mapping[str, str],
    device_json: str | None, geo: Enrichment | None, *, text_proven: bool = False,
) -> tuple:
    """`encode_row` of the report as enriched with `device_attrs` and `geo`, without building
    that enriched report: ingest only needs the row (and `device_json`, the attributes' JSON
    when the enricher already has it, spares encoding the same few devices again and again).

    `text_proven`: the caller knows every text is valid Unicode (a report from `parse_report`,
    which decoded the body strictly and checked the escapes; enrichment decoded from the
    databases; a delivery id from `parse_delivery_id`), so the UTF-8 proof is skipped. A text
    that is not still fails alone, when SQLite binds it."""
    r = report
    t = float(r.t)
    if t != t:
        raise ReportError("report time 't' is NaN")
    try:
        maps = (json_or_null(r.attrs), json_or_null(r.attrs_mv),
                device_json if device_json is not None else json_or_null(device_attrs),
                json_or_null(r.extra))
    except (TypeError, ValueError, RecursionError) as exc:  # not JSON, inf/NaN, a cycle
        raise ReportError(f"report cannot be stored as JSON: {exc}") from None
    row = (
        t, r.login, r.remote, r.pwhash, r.success, r.policy_reject, r.protocol, r.tls,
        r.device_id, r.session_id, r.fail_type,
    ) + maps + (delivery_id,) + geo_columns(geo) + (ip_key(r.remote),)
    if None in row[:11]:
        raise ReportError("report has a missing (None) field")
    if not text_proven:
        _check_text(row)
    return row


#: Positions of the text columns in an encoded row (the JSON maps and the delivery id included).
_TEXT_COLUMNS = (1, 2, 3, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 21)


def _check_text(row: tuple) -> None:
    """Prove every text column encodes as UTF-8 (one encode of them all; a lone surrogate fails)."""
    texts = [row[i] for i in _TEXT_COLUMNS if row[i] is not None]
    try:
        "".join(texts).encode("utf-8")
    except TypeError:
        raise ReportError("report has a text field that is not a string") from None
    except UnicodeEncodeError:
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ReportError(
                    f"report cannot be stored: {printable(text)[:200]} is not valid UTF-8 text "
                    f"({exc.reason})"
                ) from None


NO_GEO = (None,) * 6


def geo_columns(geo: Enrichment | None) -> tuple:
    """The enrichment columns (country, city, latitude, longitude, asn, isp); NULL = unknown."""
    if geo is None:
        return NO_GEO
    return (geo.country or None, geo.city or None, geo.latitude, geo.longitude, geo.asn,
            geo.isp or None)


# --------------------------------------------------------------------------- decoding


@functools.lru_cache(maxsize=65536)
def _geo_from_columns(country: Any, city: Any, latitude: Any, longitude: Any, asn: Any,
                      isp: Any) -> Enrichment | None:
    # Cached (Enrichment is frozen, so one object can stand for every row of a place): reports
    # come from a limited set of places, and building the object costs more than looking it up.
    if country is None and city is None and latitude is None and asn is None and isp is None:
        return None
    return Enrichment(country or "", city or "", latitude, longitude, asn, isp or "")


def report_from_row(
    row: tuple, attrs: Mapping[str, str], attrs_mv: Mapping[str, tuple[str, ...]],
    device_attrs: Mapping[str, str], extra: Mapping[str, Any],
) -> Report:
    """The report an encoded row (`encode_row`, without seq/received) stores, given its maps.

    The maps come as values because their JSON columns would cost more to decode than to carry:
    the core process rebuilds the report a web worker encoded from the row and these alone.
    """
    return _new_report(
        row[0], row[2], row[1], row[3], row[4], row[5], row[6], row[7], row[8], row[9], row[10],
        attrs, attrs_mv, device_attrs, extra, _geo_from_columns(*row[GEO_COLUMNS]),
    )


def decode_row(row: Any, loads: Callable[[str], Any] = _loads) -> Event:
    """An `Event` from an `events` row in table column order.

    `loads` parses the JSON maps; the replay passes a memoizing one (most rows repeat a few
    texts, and nothing it reads is ever changed)."""
    (seq, received, t, login, remote, pwhash, success, policy_reject, protocol, tls, device_id,
     session_id, fail_type, attrs, attrs_mv, device_attrs, extra, delivery_id) = row[:18]
    report = _new_report(  # Report's field order: t, remote, login, pwhash, success, ...
        t, remote, login, pwhash, bool(success), bool(policy_reject), protocol, bool(tls),
        device_id, session_id, fail_type,
        loads(attrs) if attrs else {},
        {k: tuple(v) for k, v in loads(attrs_mv).items()} if attrs_mv else {},
        loads(device_attrs) if device_attrs else {},
        loads(extra) if extra else {},
        _geo_from_columns(*row[18:24]) if len(row) >= 24 else None,
    )
    return new_event(seq, received, report, delivery_id)


# --------------------------------------------------------------------------- the runner's rows


#: What `EventLog.read_stored` selects: REPORT_COLUMNS, then the address's `ip` key.
STORED_COLUMNS = REPORT_COLUMNS + ("ip",)


class StoredEvent:
    """An event as the policy runner reads it back from the log: its REPORT_COLUMNS row and `ip`.

    Why not an `Event`: the policy process reads every event it judges from the log, and
    decoding each row into a Report (three JSON maps parsed, two dataclasses built) only for the
    Lua call to rebuild those maps as tables, and for the projections to encode them back to
    the stored JSON, cost more than judging the event. This keeps the stored values: lt is built
    in Lua from them (lua/convert.py, maps decoded once per distinct text), the window projection
    keys `fields`, and the recent rows keep `columns`, which are what SQL returns. `report`
    decodes it (without `extra`, not selected; lt has none) for whoever needs one: the runner
    naming a failed event."""

    __slots__ = ("seq", "received", "columns", "fields", "_report")

    delivery_id = None

    def __init__(self, row: tuple) -> None:
        self.seq, self.received = row[0], row[1]
        self.columns = row[:22]
        # keys.event_fields' order: seq, received, login, success, ip, pwhash, country,
        # protocol, asn, device_attrs, attrs (the maps as stored JSON, as read_fields has them)
        self.fields = (row[0], row[1], row[4], row[6], row[22], row[5], row[16], row[8], row[20],
                       row[15], row[13])
        self._report: Report | None = None

    @property
    def report(self) -> Report:
        if self._report is None:
            (_, _, t, remote, login, pwhash, success, policy_reject, protocol, tls, device_id,
             session_id, fail_type, attrs, attrs_mv, device_attrs) = self.columns[:16]
            self._report = Report(
                t=t, remote=remote, login=login, pwhash=pwhash, success=bool(success),
                policy_reject=bool(policy_reject), protocol=protocol, tls=bool(tls),
                device_id=device_id, session_id=session_id, fail_type=fail_type,
                attrs=_loads(attrs) if attrs else {},
                attrs_mv={k: tuple(v) for k, v in _loads(attrs_mv).items()} if attrs_mv else {},
                device_attrs=_loads(device_attrs) if device_attrs else {},
                geo=_geo_from_columns(*self.columns[16:22]),
            )
        return self._report
