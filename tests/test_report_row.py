"""A web worker's fast path (trackalert.frontend.report_row) hands the core exactly what the
general path (`parse_report`, `delivery_of`, `Handover`) hands it, to the type, for randomised
bodies, odd ones included, and raises the same ReportError, in the same order; wforce's own
reports take the fast way."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from test_export_rows import T0, random_report

from trackalert.devices import DeviceParser
from trackalert.enrich import Enricher
from trackalert.frontend import report_row
from trackalert.frontend.report_row import hand_over
from trackalert.geoip import GeoIPRegistry
from trackalert.ingest import Handover
from trackalert.report import ReportError, decode_body, parse_report
from trackalert.web import delivery_of

GEOIP = Path(__file__).parent / "data" / "geoip"
#: GeoIP knows the first ones (city, ASN); IPv4-mapped and odd spellings are normalised.
REMOTES = ["81.2.69.142", "89.160.20.112", "216.160.83.56", "2001:218::1", "::ffff:81.2.69.142",
           "2001:0218:0:0:0:0:0:1", "192.0.2.7", "not an address", "1.2.3.4.5"]
DEVICES = [("http", "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:121.0) Gecko/20100101 "
                    "Firefox/121.0"),
           ("imap", '"name" "Thunderbird" "version" "115.5.0"'), ("http", ""), ("ftp", "x")]


def enrichment_settings(devices: bool) -> dict[str, Any]:
    registry = GeoIPRegistry()
    registry.open("City", str(GEOIP / "GeoIP2-City-Test.mmdb"))
    registry.open("ASN", str(GEOIP / "GeoLite2-ASN-Test.mmdb"))
    enricher = Enricher(registry, {"city": "City", "asn": "ASN"}, DeviceParser() if devices else None)
    return {"enrichment": enricher.snapshot()}


def random_body(rng: random.Random) -> bytes:
    report = random_report(rng)
    if "remote" in report and rng.random() < 0.8:
        report["remote"] = rng.choice(REMOTES)
    if "device_id" in report and rng.random() < 0.5:
        report["protocol"], report["device_id"] = rng.choice(DEVICES)
        if rng.random() < 0.7:
            report["device_attrs"] = {}
    odd = rng.random()
    if odd < 0.03:
        report["t"] = 10 ** 400  # an int no float holds
    elif odd < 0.06:
        report["t"] = rng.choice([0, -5, 2 ** 70])
    elif odd < 0.08:
        report["attrs"] = {"n": ["a", "b"], "s": "x", "m": []}
    text = json.dumps(report, separators=(",", ":"), ensure_ascii=rng.random() < 0.2)
    if rng.random() < 0.03:  # a lone surrogate, only an escape can carry it
        text = text.replace('"login":"', '"login":"\\udc80', 1)
    if rng.random() < 0.02:
        text = text[:rng.randrange(len(text))]  # not JSON
    return text.encode()


def outcome(call: Any) -> tuple:
    try:
        payload, delivery_id, digest = call()
    except ReportError as exc:
        return ("error", str(exc), exc.reason)
    # repr: the same values of the same types (True is not 1, 1.0 is not 1, a tuple no list).
    return (repr(payload), delivery_id, digest)


def test_the_fast_path_hands_over_what_the_general_path_hands_over() -> None:
    rng = random.Random(20261202)
    fast = errors = 0
    for devices in (True, False):
        settings = enrichment_settings(devices)
        general_handover, fast_handover = Handover(), Handover()
        for i in range(3000):
            body = random_body(rng)
            header = rng.choice([None, f"d{i}", " ", "", "caf\udce9"])  # not UTF-8: refused
            general = outcome(lambda: general_handover(
                parse_report(body, T0), *delivery_of(header, body), settings))
            assert outcome(lambda: hand_over(body, T0, header, fast_handover, settings)) == general, body
            errors += general[0] == "error"
            try:
                fast += report_row.report_fields(decode_body(body), T0) is not None
            except ReportError:
                pass
    # Both ways were taken often: the comparison is not between one path and itself.
    assert fast > 2500 and errors > 300 and 6000 - fast > 1000


def test_without_an_enricher_the_report_goes_as_plain_fields() -> None:
    """A worker that cannot open the databases hands over the fields, for the core to enrich."""
    body = json.dumps({"t": T0, "remote": "192.0.2.7", "login": "a", "pwhash": "", "success": True,
                       "policy_reject": False, "protocol": "", "tls": False, "device_id": "",
                       "session_id": "", "fail_type": "", "attrs": {}, "device_attrs": {}}).encode()
    settings = {"enrichment": {"databases": {"city": "/nonexistent.mmdb"}, "generation": 1,
                               "devices": False, "regexes": ""}}
    payload, delivery_id, digest = hand_over(body, T0, "d1", Handover(), settings)
    assert payload[0] is None and payload[1] == parse_report(body, T0).fields()
    assert delivery_id == "d1" and digest is not None


def test_wforce_reports_take_the_fast_way() -> None:
    """The bodies wforce sends (every member, `type` as an unknown one) skip the Report."""
    for success, t in ((True, 1700000000.5), (False, 1700000000)):
        doc = {"login": "user1@example.com", "remote": "2001:218::1", "success": success,
               "pwhash": "5f4dcc", "protocol": "http", "t": t, "tls": True,
               "attrs": {"cos": "basic", "groups": ["a", "b"]}, "device_id": DEVICES[0][1],
               "session_id": "", "fail_type": "", "policy_reject": False, "device_attrs": {},
               "type": "wforce_report"}
        fields = report_row.report_fields(decode_body(json.dumps(doc).encode()), T0)
        assert fields is not None and fields[0] == float(t)
