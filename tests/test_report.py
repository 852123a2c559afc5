"""parse_report: wforce's real webhook bodies, every field rule, and every rejection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trackalert.report import Report, ReportError, parse_report

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
        (b'{"t": 1e999}', "field 't' must be a finite number"),
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


def test_duplicate_keys_last_wins_and_unknown_fields_are_kept() -> None:
    report = parse_report(b'{"login": "a", "login": "b", "custom": {"x": [1, null]}}', NOW)
    assert report.login == "b"
    assert report.extra == {"custom": {"x": [1, None]}}
    assert report.to_json_dict()["custom"] == {"x": [1, None]}


def test_unicode_passes_through() -> None:
    report = parse_report('{"login": "jürgen@exämple.de", "attrs": {"name": "日本"}}'.encode(), NOW)
    assert report.login == "jürgen@exämple.de"
    assert report.attrs == {"name": "日本"}
