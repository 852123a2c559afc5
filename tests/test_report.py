"""parse_report: wforce's real webhook bodies, every field rule, and every rejection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trackalert.report import Report, ReportError, fingerprint, parse_delivery_id, parse_report

CAPTURES = json.loads((Path(__file__).parent / "data" / "wforce-webhook-captures.json").read_text())
NOW = 1_800_000_000.0


@pytest.mark.parametrize("capture", CAPTURES, ids=lambda c: c["headers"].get("X-Wforce-Delivery", "")[:8])
def test_every_captured_wforce_body_parses(capture: dict) -> None:
    doc = json.loads(capture["body"])
    report = parse_report(capture["body"].encode(), NOW)
    assert report.login == doc["login"]
    assert report.t == doc["t"]
    assert report.success is doc["success"]
    assert report.extra == {"type": "wforce_report"}
    assert report.to_json_dict() == doc


def test_imap_capture_splits_attrs() -> None:
    report = parse_report(CAPTURES[0]["body"], NOW)
    assert report.attrs == {"cos": "basic"}
    assert report.attrs_mv == {"groups": ("g1", "g2")}
    assert report.remote == "192.0.2.55"
    assert report.device_attrs["imapc.family"] == ""
    assert report.protocol == "imap" and report.tls is True


def test_empty_object_gets_defaults_and_received_time() -> None:
    report = parse_report(b"{}", NOW)
    assert report == Report(t=NOW)
    assert report.remote == "0.0.0.0"


@pytest.mark.parametrize(
    ("remote", "stored"),
    [
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("192.0.2.7:4444", "192.0.2.7"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        ("127.1", "127.0.0.1"),
    ],
)
def test_remote_is_normalised(remote: str, stored: str) -> None:
    assert parse_report(json.dumps({"remote": remote}), NOW).remote == stored


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not valid JSON"),
        (b'{"login": "a"} trailing', "not valid JSON"),
        (b"null", "must be a JSON object, got null"),
        (b"[1, 2]", "must be a JSON object, got an array"),
        (b'{"t": NaN}', "not valid JSON"),
        (b"\xff\xfe", "not valid UTF-8"),
        (b'{"login": 5}', "field 'login' must be a string, got a number"),
        (b'{"success": 1}', "field 'success' must be a boolean, got a number"),
        (b'{"success": "true"}', "field 'success' must be a boolean, got a string"),
        (b'{"tls": null}', "field 'tls' must be a boolean, got null"),
        (b'{"t": "yesterday"}', "field 't' must be a number, got a string"),
        (b'{"t": true}', "field 't' must be a number, got a boolean"),
        (b'{"t": 1e999}', "number 1e999 is out of range"),
        (b'{"remote": 17}', "field 'remote' must be a string, got a number"),
        (b'{"remote": "mail.example.com"}', "Unable to convert presentation address 'mail.example.com'"),
        (b'{"remote": "1.2.3.4:"}', "Unable to convert presentation address"),
        (b'{"attrs": []}', "field 'attrs' must be an object, got an array"),
        (b'{"attrs": {"n": 5}}', "field 'attrs.n' must be a string or an array of strings, got a number"),
        (b'{"attrs": {"g": ["a", 1]}}', "field 'attrs.g' must be a string or an array of strings"),
        (b'{"device_attrs": {"os.major": 10}}', "field 'device_attrs.os.major' must be a string"),
    ],
)
def test_bad_input_is_rejected_with_a_reason(body: bytes, message: str) -> None:
    with pytest.raises(ReportError) as raised:
        parse_report(body, NOW)
    assert message in str(raised.value)


#: Bodies that used to raise something else than ReportError (a 500 with a traceback); shared
#: with tests/test_ingest.py, which sends each to a real daemon.
BAD_BODIES = {
    "nested 1000 deep": b'{"attrs": ' + b"[" * 1000 + b"]" * 1000 + b"}",
    "nested 201 deep in an extra": b'{"x": ' + b"[" * 201 + b"]" * 201 + b"}",
    "integer of 5000 digits": b'{"login": "x", "n": ' + b"7" * 5000 + b"}",
    "t overflowing a float": b'{"t": 1' + b"0" * 400 + b"}",
    "1e309": b'{"login": "x", "score": 1e309}',
    "surrogate in a value": b'{"login": "\\udc00x"}',
    "surrogate in an extra": b'{"extra": ["ok", {"k": "\\ud800"}]}',
    "surrogate in a field name": b'{"\\ud800": "x"}',
    "surrogate in an attrs name": b'{"attrs": {"\\ud800": 1}}',
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bodies_that_broke_the_parser_are_report_errors(body: bytes) -> None:
    with pytest.raises(ReportError) as raised:
        parse_report(body, NOW)
    reason = str(raised.value)
    reason.encode("utf-8")  # a 400 body can always carry it
    assert reason.isprintable()
    assert raised.value.reason in ("json", "field")


def test_a_surrogate_is_quoted_as_an_escape() -> None:
    with pytest.raises(ReportError, match=r"field 'login' contains \\ud800"):
        parse_report(b'{"login": "a\\ud800"}', NOW)


def test_nesting_up_to_the_limit_and_surrogate_pairs_are_fine() -> None:
    deep = b'{"x": ' + b"[" * 199 + b"]" * 199 + b', "login": "\\ud83d\\ude00"}'
    report = parse_report(deep, NOW)
    assert report.login == "\U0001f600"


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, None), ("", None), ("  \t", None), ("abc", "abc"), (" a b ", " a b ")],
)
def test_delivery_id_of_a_header(header: str | None, expected: str | None) -> None:
    assert parse_delivery_id(header) == expected


def test_a_delivery_header_that_is_not_utf8_is_bad_input() -> None:
    raw = b"id-\xff\xfe".decode("utf-8", "surrogateescape")  # as HTTP servers hand it over
    with pytest.raises(ReportError, match="not valid UTF-8"):
        parse_delivery_id(raw)


def test_fingerprint_is_of_the_raw_bytes() -> None:
    assert fingerprint(b'{"login":"a"}') == fingerprint(b'{"login":"a"}')
    assert fingerprint(b'{"login":"a"}') != fingerprint(b'{"login": "a"}')
    assert len(fingerprint(b"")) == 16


def test_duplicate_keys_last_wins_and_unknown_fields_are_kept() -> None:
    report = parse_report(b'{"login": "a", "login": "b", "custom": {"x": [1, null]}}', NOW)
    assert report.login == "b"
    assert report.extra == {"custom": {"x": [1, None]}}
    assert report.to_json_dict()["custom"] == {"x": [1, None]}


def test_unicode_passes_through() -> None:
    report = parse_report('{"login": "jürgen@exämple.de", "attrs": {"name": "日本"}}'.encode(), NOW)
    assert report.login == "jürgen@exämple.de"
    assert report.attrs == {"name": "日本"}
