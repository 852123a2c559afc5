"""The import's fast path (trackalert.eventlog.export_rows) stores exactly what the general path
(`report_from_dict` + `encode_enriched`) stores, for randomised report objects, odd ones
included; a line it is not sure about goes the general way (and its error names the line)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import sqlite3
from pathlib import Path

import pytest
from test_history import T0, export_text, import_text, write_log

from trackalert.eventlog.export_rows import export_row
from trackalert.eventlog.history import ImportRefused, parse_line
from trackalert.report import Enrichment, ReportError, parse_report

TEXTS = ["", "alice@example.com", "jöhn 🙂", "a\u0000b", "tab\there", "\u2028x", "ẞ" * 40,
         "quote\"back\\slash", "\U0010ffff"]
REMOTES = ["192.0.2.7", "2001:db8::5", "2001:DB8:0:0:0:0:0:2", "::ffff:198.51.100.7", "::1",
           "fe80::1%eth0", "10.0.0.1", "not an address"]


def random_report(rng: random.Random) -> dict:
    """A report object as an export line may hold it: mostly what `export_line` writes, often
    with something the fast path must leave to the general one."""
    report = {
        "t": T0 + rng.random(), "remote": rng.choice(REMOTES), "login": rng.choice(TEXTS),
        "pwhash": f"{rng.randrange(4096):03x}", "success": rng.random() < 0.5,
        "policy_reject": rng.random() < 0.2, "protocol": rng.choice(["imap", "http", ""]),
        "tls": rng.random() < 0.5, "device_id": rng.choice(TEXTS),
        "session_id": rng.choice(TEXTS), "fail_type": rng.choice(["", "expired", "ö"]),
        "attrs": {}, "device_attrs": {},
    }
    for _ in range(rng.randrange(4)):  # single-valued, multi-valued attributes, in any order
        report["attrs"][rng.choice(["cos", "groups", "ö", "x"]) + str(rng.randrange(9))] = (
            rng.choice(TEXTS) if rng.random() < 0.5
            else [rng.choice(TEXTS) for _ in range(rng.randrange(3))])
    for _ in range(rng.randrange(3)):
        report["device_attrs"][rng.choice(["os.family", "imapc.family", "é"])] = rng.choice(TEXTS)
    for _ in range(rng.randrange(3)):  # unknown fields, before or after the known ones
        value = rng.choice(["wforce_report", 1, 2.5, None, True, [1, "a"], {"n": {"m": [None]}}])
        if rng.random() < 0.5:
            report = {f"zz{rng.randrange(9)}": value, **report}
        else:
            report[f"aa{rng.randrange(9)}"] = value
    odd = rng.random()
    if odd < 0.04:
        del report[rng.choice(list(report))]  # a member missing: its default
    elif odd < 0.08:
        report["t"] = int(report["t"])
    elif odd < 0.12:
        report[rng.choice(["success", "login", "attrs", "device_attrs", "remote", "t"])] = \
            rng.choice(["yes", 1, None, [], {"a": 1}, 1.5])
    elif odd < 0.14:
        report["attrs"]["bad"] = [1, 2]
    elif odd < 0.16:
        report["device_attrs"]["bad"] = ["a"]
    return report


def export_line_of(rng: random.Random, seq: int, report: dict) -> bytes:
    enrichment = rng.choice([
        None, {"country": "SE", "city": "Malmö", "latitude": 55.6, "longitude": 13,
               "asn": 64500, "isp": "ISP"},
        {"country": "", "city": None, "latitude": None, "longitude": None, "asn": None,
         "isp": ""}])
    line = json.dumps({"seq": seq, "received": report.get("t", T0) if type(report.get("t"))
                       in (int, float) else T0, "delivery_id": rng.choice([None, f"d{seq}", " "]),
                       "report": report, "enrichment": enrichment},
                      separators=(",", ":"), ensure_ascii=rng.random() < 0.2)
    if rng.random() < 0.03:  # a lone surrogate, only an escape can carry it
        line = line.replace('"login":"', '"login":"\\ud800', 1)
    return line.encode()


def outcome(text: bytes, keep_report: bool) -> tuple:
    try:
        parsed = parse_line(text, 7, keep_report=keep_report)
    except ReportError as exc:
        return ("error", str(exc))
    # repr: the same values of the same types (True is not 1, 1.0 is not 1).
    return (repr(parsed.row), parsed.key, parsed.seq, repr(parsed.received))


def test_the_fast_path_stores_what_the_general_path_stores() -> None:
    rng = random.Random(20261202)
    fast = errors = 0
    for seq in range(1, 4001):
        report = random_report(rng)
        text = export_line_of(rng, seq, report)
        general = outcome(text, keep_report=True)
        assert outcome(text, keep_report=False) == general, text
        errors += general[0] == "error"
        with contextlib.suppress(ReportError):  # a bad remote: the same error either way
            fast += export_row(json.loads(text)["report"], None, (None,) * 6, False) is not None
    # Both ways were taken often: the comparison is not between one path and itself.
    assert fast > 2000 and errors > 100 and 4000 - fast > 500


def test_the_fast_path_takes_what_export_line_writes(tmp_path: Path) -> None:
    """Every line of an export of reports as the daemon stores them goes the fast way."""
    rng = random.Random(5)
    reports = []
    for i in range(200):
        body = random_report(rng)
        if body.get("remote") == "not an address":
            body["remote"] = "192.0.2.1"
        try:
            report = parse_report(json.dumps(body), T0)
        except ReportError:
            continue
        reports.append((dataclasses.replace(report, t=T0 + i), None))
    asyncio.run(write_log(tmp_path / "a.db", reports))
    lines = export_text(tmp_path / "a.db").encode().splitlines()
    assert len(lines) == len(reports) > 100
    for line in lines:
        doc = json.loads(line)
        assert export_row(doc["report"], doc["delivery_id"], (None,) * 6, False) is not None


def all_columns(path: Path) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT * FROM events ORDER BY seq").fetchall()


async def test_an_imported_log_is_the_daemons_log_in_every_column(tmp_path: Path) -> None:
    """Reports through the daemon's own append path (enriched, with delivery ids, retried and
    colliding), exported, imported (fast path): every column of every row the same, and the
    export of the import byte-identical."""
    rng = random.Random(11)
    places = [None, Enrichment("GB", "London", 51.5, -0.09, 64500, "Example ISP"),
              Enrichment(country="SE"), Enrichment(latitude=0.0, longitude=0.0, asn=1)]
    reports = []
    for i in range(300):
        body = random_report(rng)
        try:
            report = parse_report(json.dumps(body), T0)
        except ReportError:
            continue
        report = dataclasses.replace(report, t=T0 + i, geo=rng.choice(places))
        reports.append((report, rng.choice([None, f"d{i}", f"d{i - i % 3}"])))
    reports.append(reports[-1])  # a retried delivery
    await write_log(tmp_path / "daemon.db", reports)
    exported = export_text(tmp_path / "daemon.db")
    await import_text(tmp_path / "imported.db", exported)
    assert all_columns(tmp_path / "imported.db") == all_columns(tmp_path / "daemon.db")
    assert len(all_columns(tmp_path / "daemon.db")) > 200
    assert export_text(tmp_path / "imported.db") == exported


async def test_bad_lines_among_fast_ones_are_named_by_their_line_numbers(tmp_path: Path) -> None:
    rng = random.Random(3)
    lines = []
    for seq in range(1, 21):
        report = random_report(rng)
        report.update(remote="192.0.2.9", t=T0 + seq, login="x", attrs={}, device_attrs={})
        lines.append(export_line_of(rng, seq, report).decode().replace("\\ud800", ""))
    lines[4] = lines[4].replace('"remote":"192.0.2.9"', '"remote":"999.1.1.1"')
    lines[11] = lines[11].replace('"login":"x"', '"login":7')
    text = "\n".join(lines) + "\n"
    with pytest.raises(ImportRefused) as refused:
        await import_text(tmp_path / "a.db", text)
    assert refused.value.lines == [5] and "field 'remote'" in str(refused.value)
    result = await import_text(tmp_path / "b.db", text, skip_bad=True)
    assert (result.bad, result.bad_lines, result.imported) == (2, [5, 12], 18)
