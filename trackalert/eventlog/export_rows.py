"""The fast path of `trackalert import`: the `report` object of an export line straight to the
`events` row the daemon stores for it, without building a `Report` on the way.

Why: an import of our own export spends most of its CPU validating each report
(`report_from_dict`, a dataclass built only to be encoded again) although the line was written
by `export_line` from a row that passed that validation once already. Such a report has all the
members, each of its exact type, so checking them in one expression and encoding the row from
the decoded values directly saves about a quarter of the parse (20.7 -> 15.2 µs per line of
bench/import_bench.py's export, docs/history.md).

It must store exactly what the general path (`report_from_dict` + `encode_enriched`) stores, in
every column: anything this path is not sure about (a member missing, a type it does not
expect, an attribute that is not a plain string, a time that is not a finite float) answers
None, and the caller takes the general path, which also words the errors.
tests/test_export_rows.py compares both paths over randomised reports.
"""

from __future__ import annotations

import math
from typing import Any

from trackalert.eventlog.ipkey import ip_key
from trackalert.eventlog.rows import _check_text, json_or_null
from trackalert.report import normalise_remote

#: The members `Report.to_json_dict` always writes; any other member is an unknown field.
KNOWN = frozenset(("t", "remote", "login", "pwhash", "success", "policy_reject", "protocol",
                   "tls", "device_id", "session_id", "fail_type", "attrs", "device_attrs"))
_COUNT = len(KNOWN)


def export_row(doc: dict[str, Any], delivery_id: str | None, geo: tuple,
               text_proven: bool) -> tuple | None:
    """The stored row (as `encode_enriched` makes it, `geo` as the enrichment columns) of an
    export line's decoded `report`, or None when the general path must decide. Raises
    ReportError only where the general path would raise the same (a text that is not UTF-8)."""
    try:
        t, remote, login, pwhash = doc["t"], doc["remote"], doc["login"], doc["pwhash"]
        success, policy_reject, protocol = doc["success"], doc["policy_reject"], doc["protocol"]
        tls, device_id, session_id = doc["tls"], doc["device_id"], doc["session_id"]
        fail_type, attrs, device_attrs = doc["fail_type"], doc["attrs"], doc["device_attrs"]
    except KeyError:
        return None
    if not (type(t) is float and type(remote) is str and type(login) is str
            and type(pwhash) is str and type(success) is bool and type(policy_reject) is bool
            and type(protocol) is str and type(tls) is bool and type(device_id) is str
            and type(session_id) is str and type(fail_type) is str and type(attrs) is dict
            and type(device_attrs) is dict and math.isfinite(t)):
        return None
    str_ = str
    single_json, multi_json = _attrs_columns(attrs)
    if single_json is False:
        return None
    for value in device_attrs.values():
        if type(value) is not str_:
            return None
    if len(doc) == _COUNT:
        extra = None
    else:
        unknown = {key: value for key, value in doc.items() if key not in KNOWN}
        try:
            extra = json_or_null(unknown)
        except (TypeError, ValueError, RecursionError):
            return None
    remote = normalise_remote(remote)
    row = (t, login, remote, pwhash, success, policy_reject, protocol, tls, device_id,
           session_id, fail_type, single_json, multi_json, json_or_null(device_attrs),
           extra, delivery_id) + geo + (ip_key(remote),)
    if not text_proven:
        _check_text(row)
    return row


def _attrs_columns(attrs: dict[str, Any]) -> tuple[Any, Any]:
    """The attrs and attrs_mv columns of `attrs` (split as `split_attrs` does: the strings, then
    the arrays of strings, each in their order), or (False, False) for the general path."""
    multi: dict[str, Any] | None = None
    for key, value in attrs.items():
        if type(value) is not str:
            if type(value) is not list or not all(type(item) is str for item in value):
                return False, False
            if multi is None:
                multi = {}
            multi[key] = value  # a list encodes as the general path's tuple does
    if multi is None:
        return json_or_null(attrs), None
    single = {key: value for key, value in attrs.items() if type(value) is str}
    return json_or_null(single), json_or_null(multi)
