"""The login report: the one record everything else in trackalert is about.

`parse_report` is a pure function (JSON bytes in, `Report` out, no I/O) so that the web layer, the
NDJSON importer and the replay tool all validate reports the same way. Unlike the C++ daemon, which
silently turns a mistyped field into its default, we reject a report whose fields have the wrong
type: a report that cannot be trusted must not enter a log that policies will read for months.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from trackalert.netaddr import AddressError, parse_combo

#: Fields of a wforce LoginTuple, with the JSON type each must have.
_STRING_FIELDS = ("login", "pwhash", "protocol", "device_id", "session_id", "fail_type")
_BOOL_FIELDS = ("success", "policy_reject", "tls")


class ReportError(ValueError):
    """The body is not an acceptable report; the message says why, for the 400 body.

    `reason` is a short category for metrics: ``json`` (not a JSON object), ``field`` (a field of
    the wrong type) or ``remote`` (an address that does not parse).
    """

    def __init__(self, message: str, reason: str = "field") -> None:
        # The message goes into a JSON body and a log line: it may quote what the client sent,
        # so anything unprintable (lone surrogates, newlines) is spelled as an escape instead.
        super().__init__(message if message.isprintable() else printable(message))
        self.reason = reason


def printable(text: str) -> str:
    """`text` with every unprintable character (control, lone surrogate) as a `\\uXXXX` escape."""
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


@dataclass(frozen=True, slots=True)
class Enrichment:
    """What ingest adds from the GeoIP databases (trackalert.enrich), stored with the report.

    Frozen in the event log so that policies and replays see the values of the day the report
    arrived, whatever happened to the mmdb files since. Unknown values are "" or None.
    """

    country: str = ""
    city: str = ""
    latitude: float | None = None
    longitude: float | None = None
    asn: int | None = None
    isp: str = ""


@dataclass(frozen=True, slots=True)
class Report:
    """One validated login report, as wforce's LoginTuple plus whatever unknown fields it carried."""

    t: float = 0.0
    remote: str = "0.0.0.0"
    login: str = ""
    pwhash: str = ""
    success: bool = False
    policy_reject: bool = False
    protocol: str = ""
    tls: bool = False
    device_id: str = ""
    session_id: str = ""
    fail_type: str = ""
    attrs: Mapping[str, str] = field(default_factory=dict)
    attrs_mv: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    device_attrs: Mapping[str, str] = field(default_factory=dict)
    #: Unknown top-level JSON members (e.g. wforce's ``"type": "wforce_report"``), kept losslessly.
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: Added at ingest by trackalert.enrich (not part of `fields()`: the core process enriches
    #: after a web worker handed the report over).
    geo: Enrichment | None = None

    def fields(self) -> tuple[Any, ...]:
        """The field values in declaration order: `Report(*r.fields())` rebuilds the report.

        A plain tuple of builtins crosses a process boundary (marshal) far cheaper than the
        dataclass itself.
        """
        return (
            self.t, self.remote, self.login, self.pwhash, self.success, self.policy_reject,
            self.protocol, self.tls, self.device_id, self.session_id, self.fail_type,
            dict(self.attrs), dict(self.attrs_mv), dict(self.device_attrs), dict(self.extra),
        )

    def to_json_dict(self) -> dict[str, Any]:
        """The report as wforce would send it (attrs merged back into one object), plus extras."""
        attrs: dict[str, Any] = dict(self.attrs)
        attrs.update({k: list(v) for k, v in self.attrs_mv.items()})
        body: dict[str, Any] = dict(self.extra)
        body.update(
            t=self.t,
            remote=self.remote,
            login=self.login,
            pwhash=self.pwhash,
            success=self.success,
            policy_reject=self.policy_reject,
            protocol=self.protocol,
            tls=self.tls,
            device_id=self.device_id,
            session_id=self.session_id,
            fail_type=self.fail_type,
            attrs=attrs,
            device_attrs=dict(self.device_attrs),
        )
        return body


#: Deepest nesting a report may have (the C++ daemon's json11 allows 200 as well). Deeper bodies
#: are refused up front: stored, they would only fail later, when decoded again or handed to Lua.
MAX_DEPTH = 200


def parse_report(body: bytes | str, received: float) -> Report:
    """Validate a report body; `received` stands in for a missing ``t`` (the C++ daemon used 0).

    Every failure of a body is a ReportError (a 400), whatever in the decoder gave up on it:
    a body cannot be a reason for a 500.
    """
    return report_from_dict(decode_body(body), received)


def decode_body(body: bytes | str) -> dict[str, Any]:
    """The JSON object of a report body, proven Unicode and at most MAX_DEPTH deep, or
    ReportError: `parse_report` without building the Report (a web worker encodes the row
    straight from this dict, frontend/report_row.py)."""
    try:
        # Decode ourselves: json.loads would guess UTF-16/32 from a BOM; RFC 8259 says UTF-8.
        text = body.decode("utf-8") if isinstance(body, bytes) else body
        doc = _decode(text)
    except UnicodeDecodeError as exc:
        raise ReportError(f"body is not valid UTF-8: {exc.reason}", "json") from None
    except json.JSONDecodeError as exc:
        raise ReportError(f"body is not valid JSON: {exc}", "json") from None
    except RecursionError:
        raise ReportError(f"body is nested more than {MAX_DEPTH} levels deep", "json") from None
    except ValueError as exc:  # e.g. an integer over the int-conversion digit limit
        raise ReportError(f"body is not acceptable JSON: {exc}", "json") from None
    if not isinstance(doc, dict):
        raise ReportError(f"body must be a JSON object, got {_json_type(doc)}", "json")
    _check_depth(text, doc)
    if "\\u" in text:  # only an escape can smuggle a lone surrogate past strict UTF-8
        _check_surrogates(doc)
    return doc


def _check_depth(text: str, doc: Any) -> None:
    """Refuse bodies nested deeper than MAX_DEPTH (counting brackets first: almost always enough)."""
    if text.count("{") + text.count("[") <= MAX_DEPTH:
        return
    level = [(doc, 1)]
    while level:
        value, depth = level.pop()
        if depth > MAX_DEPTH:
            raise ReportError(f"body is nested more than {MAX_DEPTH} levels deep", "json")
        children = value.values() if type(value) is dict else value if type(value) is list else ()
        level.extend((child, depth + 1) for child in children if type(child) in (dict, list))


def _check_surrogates(doc: Mapping[str, Any]) -> None:
    """Refuse text that is not Unicode (a lone surrogate): it cannot be stored as UTF-8."""
    for key, value in doc.items():
        try:
            _dumps_unescaped([key, value]).encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = printable(exc.object[exc.start:exc.end])
            raise ReportError(
                f"field '{key}' contains {bad}, a lone surrogate that is not Unicode text"
            ) from None


_dumps_unescaped = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def report_from_dict(doc: Mapping[str, Any], received: float) -> Report:
    """Validate an already-decoded JSON object (shared by the web layer and NDJSON import).

    One pass over the members with exact type checks: this runs for every report on the event
    loop, so it is written for speed (`type(v) is str` rather than isinstance, no re-lookups).
    """
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in doc.items():
        kind = _FIELD_KINDS.get(key)
        if kind is None:
            extra[key] = value
        elif type(value) is kind:
            values[key] = value
        elif kind is _Time:
            values[key] = _parse_time(value)
        elif kind is _Remote:
            values[key] = normalise_remote(_expect(key, value, str, "a string"))
        elif kind is _Attrs:
            values["attrs"], values["attrs_mv"] = split_attrs(_expect(key, value, dict, "an object"))
        elif kind is _DeviceAttrs:
            values[key] = _parse_device_attrs(_expect(key, value, dict, "an object"))
        else:
            _expect(key, value, kind, "a string" if kind is str else "a boolean")
    if "t" not in values:
        values["t"] = received
    return Report(extra=extra, **values)


class _Time:
    """Marker kinds for the members that need more than a type check."""


class _Remote:
    pass


class _Attrs:
    pass


class _DeviceAttrs:
    pass


_FIELD_KINDS: dict[str, type] = {
    **{name: str for name in _STRING_FIELDS},
    **{name: bool for name in _BOOL_FIELDS},
    "t": _Time,
    "remote": _Remote,
    "attrs": _Attrs,
    "device_attrs": _DeviceAttrs,
}


def split_attrs(attrs: Mapping[str, Any], where: str = "attrs") -> tuple[dict, dict]:
    """Split an attrs object into single-valued and multi-valued attributes (reference §5.3)."""
    single: dict[str, str] = {}
    multi: dict[str, tuple[str, ...]] = {}
    for key, value in attrs.items():
        if isinstance(value, str):
            single[key] = value
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            multi[key] = tuple(value)
        else:
            raise ReportError(
                f"field '{where}.{key}' must be a string or an array of strings, "
                f"got {_json_type(value)}"
            )
    return single, multi


def _parse_device_attrs(attrs: Mapping[str, Any]) -> dict[str, str]:
    for key, value in attrs.items():
        if not isinstance(value, str):
            raise ReportError(
                f"field 'device_attrs.{key}' must be a string, got {_json_type(value)}"
            )
    return dict(attrs)


def _parse_time(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReportError(f"field 't' must be a number, got {_json_type(value)}")
    try:
        t = float(value)  # an int too big for a float raises OverflowError
    except OverflowError:
        t = math.inf
    if not math.isfinite(t):
        raise ReportError("field 't' must be a finite number")
    return t


@functools.lru_cache(maxsize=65536)
def normalise_remote(text: str) -> str:
    """A report's `remote` as stored (IPv4-mapped IPv6 unmapped, canonical text), or
    ReportError. Public for the import's fast path (eventlog/export_rows.py), which must store
    the same text."""
    # Cached: the same client addresses report over and over, and normalising through
    # `ipaddress` costs more than the rest of the validation.
    try:
        address = parse_combo(text)
    except AddressError as exc:
        raise ReportError(f"field 'remote': {exc}", "remote") from None
    return address.unmapped().tostring()


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; RFC 8259 (and wforce) do not.
    raise json.JSONDecodeError(f"invalid constant {name}", name, 0)


def _finite_float(text: str) -> float:
    # 1e309 is valid JSON but becomes inf, which no JSON column can hold: refuse it here.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


# Built once: json.loads(..., parse_constant=...) would build a new decoder for every report.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_scan = _DECODER.scan_once


def _decode(text: str) -> Any:
    """`_DECODER.decode(text)`, a microsecond cheaper for a body without blanks around it (all
    of wforce's): the C scanner alone, without decode's two Python frames and two regex
    matches. Anything else, failures included, goes through `decode`, which words the error."""
    try:
        doc, end = _scan(text, 0)
    except Exception:  # StopIteration, a JSONDecodeError, RecursionError, ...: decode says
        return _DECODER.decode(text)
    return doc if end == len(text) else _DECODER.decode(text)


def parse_delivery_id(header: str | None) -> str | None:
    """The `X-Wforce-Delivery` id of a request: None when absent or blank (no id at all).

    HTTP servers hand over bytes that are not UTF-8 as surrogate escapes; such an id could never
    be stored, so it is refused as bad input rather than failing later in the log.
    """
    if header is None or not header.strip():
        return None
    try:
        header.encode("utf-8")
    except UnicodeEncodeError:
        raise ReportError(
            f"header X-Wforce-Delivery is not valid UTF-8: {printable(header)[:200]}"
        ) from None
    return header


def fingerprint(body: bytes) -> bytes:
    """What tells a retried delivery (same id, same bytes) from another report under the same id.

    The raw body, not the parsed report: a report without `t` gets the time it was received, so
    two copies of one body would parse into different reports.
    """
    return hashlib.blake2b(body, digest_size=16).digest()


def _expect(name: str, value: Any, kind: type, described: str) -> Any:
    # bool is a subclass of int in Python; JSON keeps them apart, so must we.
    if type(value) is not kind:
        raise ReportError(f"field '{name}' must be {described}, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
