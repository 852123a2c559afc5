"""Moving history around (trackalert.eventlog.history and the log's bulk path): the export line
carries everything the log holds, export → import → export is byte-identical, an import is whole
or nothing, history keeps its own `received`, export reads one snapshot beside a daemon that
writes, and a log file alone holds every event after a graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import random
import shutil
import sqlite3
from pathlib import Path

import pytest
from test_daemon import hammer

from trackalert.clock import VirtualClock
from trackalert.eventlog.base import Event
from trackalert.eventlog.history import (
    BLOCK, ImportRefused, export_events, import_file, parse_line, read_export,
)
from trackalert.eventlog.rows import encode_row
from trackalert.eventlog.sqlite import HistoryOrderError, SQLiteEventLog
from trackalert.report import Enrichment, Report, parse_report
from trackalert.testing import DaemonProcess, listener_config, wait_for

T0 = 1_795_000_000.0

# --------------------------------------------------------------------------- a varied log

LONDON = Enrichment("GB", "London", 51.5142, -0.0931, 64500, "Example ISP")


def parsed(body: dict, geo: Enrichment | None = None) -> Report:
    """A report as ingest stores it: through the daemon's parser, then enriched."""
    return dataclasses.replace(parse_report(json.dumps(body), T0), geo=geo)


def varied_reports() -> list[tuple[Report, str | None]]:
    """Reports with everything an export must carry, and the delivery id each comes with."""
    base = dict(t=T0, login="alice@example.com", remote="192.0.2.55", pwhash="0a1b2c",
                protocol="imap", tls=True, device_id="IMAP client")
    retried = parsed({**base, "success": True, "type": "wforce_report",
                      "attrs": {"cos": "basic", "groups": ["g1", "g2"]},
                      "device_attrs": {"imapc.family": "Thunderbird", "os.family": ""},
                      "nested": {"a": [1, 2.5, None, True]}}, LONDON)
    return [
        (retried, "d-retry"),
        (retried, "d-retry"),  # a retried delivery: stored once
        (parsed({**base, "remote": "2001:db8::1"}, Enrichment(country="SE")), "d-twice"),
        (parsed({**base, "login": "bob", "t": T0 + 1}), "d-twice"),  # same id, another body
        (parsed({"t": T0 + 2, "login": "jöhn 🙂", "remote": "::ffff:198.51.100.7",
                 "fail_type": "x", "zz": "last", "aa": "first"}), None),
        (parsed({"t": T0 + 3, "login": "carol", "remote": "2001:db8:0:0:0:0:0:2"},
                Enrichment(latitude=0.0, longitude=0.0, asn=1)), None),
    ]


async def write_log(path: Path, reports: list[tuple[Report, str | None]]) -> list[Event]:
    """The reports through the log's ordinary append path, a second of virtual time apart."""
    clock = VirtualClock(T0 + 10)
    log = SQLiteEventLog(path, clock)
    await log.open()
    try:
        for report, delivery_id in reports:
            await log.append(report, delivery_id)
            await clock.advance(1.0)
        return await log.read(0, 1000)
    finally:
        await log.close()


def export_text(path: Path, **filters) -> str:
    out = io.StringIO()
    export_events(str(path), out, **filters)
    return out.getvalue()


async def import_text(path: Path, text: str | bytes, name: str = "input", **options):
    """As `trackalert import` does: the log opened (created, migrated) and closed, then the
    input imported into the file."""
    log = SQLiteEventLog(path, VirtualClock(T0))
    await log.open()
    await log.close()
    data = text.encode() if isinstance(text, str) else text
    return await asyncio.to_thread(import_file, path, io.BytesIO(data), name, **options)


def stored(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT seq, received, login FROM events ORDER BY seq").fetchall()


# --------------------------------------------------------------------------- export format


async def test_an_export_line_carries_everything_the_log_holds(tmp_path: Path) -> None:
    events = await write_log(tmp_path / "a.db", varied_reports())
    lines = [json.loads(line) for line in export_text(tmp_path / "a.db").splitlines()]
    assert [line["seq"] for line in lines] == [1, 2, 3, 4, 5]  # the retry was not stored
    assert [list(line) for line in lines] == [["seq", "received", "delivery_id", "report",
                                                "enrichment"]] * 5
    first = lines[0]
    assert first["received"] == events[0].received == T0 + 10
    assert first["delivery_id"] == "d-retry"
    assert first["report"]["type"] == "wforce_report"  # unknown fields kept
    assert first["report"]["nested"] == {"a": [1, 2.5, None, True]}
    assert first["report"]["attrs"] == {"cos": "basic", "groups": ["g1", "g2"]}
    assert first["report"]["device_attrs"] == {"imapc.family": "Thunderbird", "os.family": ""}
    assert first["enrichment"] == {"country": "GB", "city": "London", "latitude": 51.5142,
                                   "longitude": -0.0931, "asn": 64500, "isp": "Example ISP"}
    assert lines[1]["enrichment"] == {"country": "SE", "city": None, "latitude": None,
                                      "longitude": None, "asn": None, "isp": None}
    assert lines[1]["report"]["remote"] == "2001:db8::1"
    assert lines[3]["report"]["login"] == "jöhn 🙂"
    assert lines[4]["enrichment"]["latitude"] == 0.0 and lines[4]["enrichment"]["asn"] == 1


async def test_export_import_export_is_byte_identical(tmp_path: Path) -> None:
    await write_log(tmp_path / "a.db", varied_reports())
    first = export_text(tmp_path / "a.db")
    result = await import_text(tmp_path / "b.db", first)
    assert (result.imported, result.duplicates, result.renumbered) == (5, 0, 0)
    second = export_text(tmp_path / "b.db")
    assert second.encode() == first.encode()
    with sqlite3.connect(tmp_path / "b.db") as db:  # both bodies of the colliding id, once each
        assert db.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 3


async def test_read_export_gives_the_events_of_the_log(tmp_path: Path) -> None:
    events = await write_log(tmp_path / "a.db", varied_reports())
    (tmp_path / "a.ndjson").write_text(export_text(tmp_path / "a.db"), encoding="utf-8")
    assert list(read_export(str(tmp_path / "a.ndjson"))) == events


async def test_export_filters_by_received_and_login(tmp_path: Path) -> None:
    events = await write_log(tmp_path / "a.db", varied_reports())
    received = [e.received for e in events]

    def seqs(**filters) -> list[int]:
        return [json.loads(line)["seq"] for line in export_text(tmp_path / "a.db", **filters).splitlines()]

    assert seqs(from_=received[1], to=received[3]) == [2, 3]  # from inclusive, to exclusive
    assert seqs(from_=received[4] + 1) == []
    assert seqs(to=received[0]) == []
    assert seqs(logins=["bob", "carol"]) == [3, 5]
    assert seqs(logins=["alice@example.com"], from_=received[1]) == [2]


# --------------------------------------------------------------------------- import


def export_lines(count: int, start_seq: int = 1, step: float = 0.001,
                 start: float = T0) -> list[str]:
    return [json.dumps({"seq": start_seq + i, "received": start + i * step, "delivery_id": None,
                        "report": {"t": T0, "login": f"u{i}", "remote": "192.0.2.1"},
                        "enrichment": None}) for i in range(count)]


async def test_a_bad_line_refuses_the_whole_file_even_after_chunks_were_committed(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    await import_text(path, "\n".join(export_lines(3)) + "\n", "before")
    lines = export_lines(25_000, start_seq=10, start=T0 + 1)
    lines[24_000] = lines[24_000][:-20]  # truncated
    with pytest.raises(ImportRefused) as refused:
        await import_text(path, "\n".join(lines) + "\n", "big.ndjson")
    assert refused.value.lines == [24_001]
    assert str(refused.value).startswith("big.ndjson:24001: not valid JSON")
    assert [row[0] for row in stored(path)] == [1, 2, 3], "nothing of that file is left"
    # the seqs it had used are given back: the next event continues the log without a gap
    later = json.dumps({"t": T0 + 100, "login": "next", "remote": "192.0.2.9"})
    result = await import_text(path, later)
    assert (result.first_seq, stored(path)[-1]) == (4, (4, T0 + 100, "next"))


async def test_skip_bad_goes_on_and_counts_them(tmp_path: Path) -> None:
    lines = export_lines(6)
    lines[1] = '{"seq": 2, "received": "yesterday", "delivery_id": null, "report": {}, "enrichment": null}'
    lines[4] = '{"login": "no time here"}'
    bad: list[tuple[str, int, str]] = []
    result = await import_text(tmp_path / "log.db", "\n".join(lines), "f", skip_bad=True,
                               on_bad=lambda *args: bad.append(args))
    assert (result.imported, result.bad, result.bad_lines) == (4, 2, [2, 5])
    assert [(name, line) for name, line, _ in bad] == [("f", 2), ("f", 5)]
    assert "'received' must be a finite number" in bad[0][2]
    assert "needs a number 't'" in bad[1][2]
    assert [row[2] for row in stored(tmp_path / "log.db")] == ["u0", "u2", "u3", "u5"]


async def test_received_out_of_order_is_refused_with_its_line_numbers(tmp_path: Path) -> None:
    lines = [json.dumps({"t": t, "login": f"u{i}", "remote": "192.0.2.1"})
             for i, t in enumerate([T0, T0 + 5, T0 + 1, T0 + 6, T0 + 2, T0 + 7])]
    with pytest.raises(ImportRefused) as refused:
        await import_text(tmp_path / "log.db", "\n".join(lines))
    assert refused.value.lines == [3, 5]
    assert "use --sort" in str(refused.value)
    assert stored(tmp_path / "log.db") == []


async def test_sort_imports_them_sorted_and_stable_and_says_so(tmp_path: Path) -> None:
    times = [T0 + 5, T0 + 1, T0 + 5, T0, T0 + 1]
    lines = [json.dumps({"t": t, "login": f"u{i}", "remote": "192.0.2.1"}) for i, t in enumerate(times)]
    result = await import_text(tmp_path / "log.db", "\n".join(lines), sort=True)
    assert [row[1:] for row in stored(tmp_path / "log.db")] == [
        (T0, "u3"), (T0 + 1, "u1"), (T0 + 1, "u4"), (T0 + 5, "u0"), (T0 + 5, "u2")]
    assert (result.sorted, result.out_of_order) == (True, 3)
    assert "sorted by received (3 line(s) were out of order)" in result.summary()


async def test_a_log_that_holds_later_events_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    await import_text(path, json.dumps({"t": T0 + 50, "login": "late", "remote": "192.0.2.1"}))
    with pytest.raises(ImportRefused) as refused:
        await import_text(path, "\n".join(export_lines(3)), "old.ndjson")
    assert "before the newest event already in the log" in str(refused.value)
    assert "received would step back" in str(refused.value)
    assert [row[2] for row in stored(path)] == ["late"]


async def test_duplicated_deliveries_are_stored_once_and_collisions_twice(tmp_path: Path) -> None:
    events = await write_log(tmp_path / "a.db", varied_reports())
    text = export_text(tmp_path / "a.db")
    lines = text.splitlines()
    again = "\n".join([lines[0], lines[0].replace('"seq":1,', '"seq":2,')] + lines[1:])
    result = await import_text(tmp_path / "b.db", again)
    assert (result.imported, result.duplicates) == (len(events), 1)
    assert export_text(tmp_path / "b.db") == text


async def test_seqs_are_kept_when_above_the_log_and_renumbered_when_not(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    await import_text(path, "\n".join(export_lines(2, start_seq=100)))
    result = await import_text(path, "\n".join(export_lines(3, start_seq=50, start=T0 + 9)))
    assert [row[0] for row in stored(path)] == [100, 101, 102, 103, 104]
    assert result.renumbered == 3


def test_wforce_report_lines_take_received_from_t_also_as_elasticsearch_hits() -> None:
    body = {"t": T0 + 0.25, "login": "x", "remote": "192.0.2.1", "type": "wforce_report"}
    bare = parse_line(json.dumps(body).encode(), 1)
    hit = parse_line(json.dumps({"_index": "logstash", "_id": "1", "_source": body}).encode(), 2)
    assert bare.received == hit.received == T0 + 0.25
    assert bare.row == hit.row == encode_row(Report(t=T0 + 0.25, login="x", remote="192.0.2.1",
                                                    extra={"type": "wforce_report"}), None)
    assert bare.seq is None and bare.key is None


# --------------------------------------------------------------------------- the bulk path


async def test_history_keeps_its_own_received_one_transaction_per_chunk(tmp_path: Path) -> None:
    clock = VirtualClock(T0 + 1000)
    log = SQLiteEventLog(tmp_path / "log.db", clock)
    await log.open()
    try:
        row = encode_row(Report(login="h"), None)
        chunk = await log.append_history([(row, None, None, T0 + i) for i in range(5)])
        assert (chunk.stored, chunk.first_seq, chunk.last_seq) == (5, 1, 5)
        with pytest.raises(HistoryOrderError):
            await log.append_history([(row, None, None, T0 + 9), (row, None, None, T0 + 3)])
        assert await log.last_seq() == 5
    finally:
        await log.close()
    assert [row[1] for row in stored(tmp_path / "log.db")] == [T0 + i for i in range(5)]


async def test_history_and_live_appends_interleave_without_losing_or_reusing_a_seq(tmp_path: Path) -> None:
    """Live appends and history chunks queued together at scale: each history chunk commits
    alone, in queue order, and every item is stored once with received non-decreasing."""
    clock = VirtualClock(T0)
    log = SQLiteEventLog(tmp_path / "log.db", clock)
    await log.open()
    try:
        futures, expected = [], []
        for chunk_no in range(40):
            for i in range(50):
                login = f"live{chunk_no}-{i}"
                futures.append(log.submit(Report(login=login)))
                expected.append(login)
            rows = [(encode_row(Report(login=f"hist{chunk_no}-{i}"), None), None, None,
                     T0 + chunk_no + 1) for i in range(100)]
            futures.append(log.submit_history(rows))
            expected.extend(f"hist{chunk_no}-{i}" for i in range(100))
        await asyncio.gather(*futures)
        assert await log.last_seq() == len(expected)
    finally:
        await log.close()
    rows = stored(tmp_path / "log.db")
    assert [row[0] for row in rows] == list(range(1, len(expected) + 1))
    assert sorted(row[2] for row in rows) == sorted(expected)
    received = [row[1] for row in rows]
    assert received == sorted(received)


# --------------------------------------------------------------------------- beside a daemon

COUNTING_POLICY = listener_config() + """
setNumLuaStates(2)
setReport(function(lt) local n = countReports({login = lt.login}) end)
"""


async def post_reports(process: DaemonProcess, total: int, concurrency: int) -> list[str]:
    """`total` reports over `concurrency` connections; the acknowledged logins."""
    acked: list[str] = []
    await hammer(process, "user", total, concurrency, acked)
    return acked


async def test_after_a_graceful_stop_the_log_file_alone_holds_every_acknowledged_event(
        tmp_path: Path) -> None:
    with DaemonProcess(tmp_path / "d", COUNTING_POLICY) as process:
        acked = await post_reports(process, 3000, 32)
        assert process.stop() == 0
    copy = tmp_path / "copy.db"
    shutil.copyfile(tmp_path / "d" / "trackalert-events.db", copy)  # without -wal and -shm
    with sqlite3.connect(copy) as db:
        logins = {row[0] for row in db.execute("SELECT login FROM events")}
    assert len(acked) == 3000
    assert logins == set(acked)


async def test_export_while_the_daemon_ingests_is_a_consistent_prefix(tmp_path: Path) -> None:
    db = tmp_path / "d" / "trackalert-events.db"
    with DaemonProcess(tmp_path / "d", COUNTING_POLICY + "setNumWebProcesses(2)\n") as process:
        acked: list[str] = []
        ingest = asyncio.create_task(hammer(process, "user", 6000, 32, acked))
        assert await wait_for(lambda: len(acked) >= 100 or ingest.done())
        exports: list[str] = []
        for _ in range(10_000):  # bounded: export again and again until ingestion is over
            exports.append(await asyncio.to_thread(export_text, db))
            if ingest.done():
                break
        await ingest
        assert process.stop() == 0
    final = export_text(db).splitlines()
    assert len(acked) == 6000
    assert {json.loads(line)["report"]["login"] for line in final} == set(acked)
    for text in exports:
        lines = text.splitlines()
        assert lines == final[:len(lines)], "each export is the log as it was at one moment"
    assert sum(0 < len(text.splitlines()) < len(final) for text in exports) >= 2, \
        "exports overlapped ingestion"


# --------------------------------------------------------------------------- at scale, in parallel


def varied_export(count: int, seed: int) -> list[str]:
    """Export lines with random fields, enrichment and delivery ids, received non-decreasing;
    among them retried deliveries (the same line again, later) and colliding ids."""
    rng = random.Random(seed)
    lines: list[str] = []
    received = T0
    for i in range(count):
        received += rng.choice([0.0, 0.001, 0.5])
        if lines and rng.random() < 0.01:  # a retry: the same event under the same id again
            again = json.loads(rng.choice(lines[-50:]))
            if again["delivery_id"] is not None:
                again["seq"], again["received"] = i + 1, received
                lines.append(json.dumps(again, separators=(",", ":"), ensure_ascii=False))
                continue
        report = {"t": received - rng.random(), "login": f"user{rng.randrange(300)}@ex.org",
                  "remote": rng.choice(["192.0.2.7", "2001:db8::5", f"198.51.100.{i % 250}"]),
                  "pwhash": f"{rng.randrange(99):02x}", "success": rng.random() < 0.6,
                  "device_id": rng.choice(["", "IMAP client", "Mozilla/5.0 Firefox/121"]),
                  "attrs": {"cos": rng.choice(["basic", "gold"]), "groups": ["g1", "g2"]}}
        if rng.random() < 0.3:
            report["type"] = "wforce_report"
        enrichment = ({"country": "SE", "city": None, "latitude": 55.6, "longitude": 13.0,
                       "asn": rng.randrange(1, 9), "isp": "ISP ö"} if rng.random() < 0.5 else None)
        delivery = rng.choice([None, f"d{i}", f"d{i - i % 7}"])  # some ids used by two bodies
        lines.append(json.dumps({"seq": i + 1, "received": received, "delivery_id": delivery,
                                 "report": report, "enrichment": enrichment},
                                separators=(",", ":"), ensure_ascii=False))
    return lines


def index_sql(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [row[0] for row in db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL ORDER BY name")]


def log_state(path: Path) -> tuple[str, str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return (db.execute("PRAGMA integrity_check").fetchone()[0],
                db.execute("PRAGMA journal_mode").fetchone()[0])


async def test_a_file_of_many_blocks_parsed_by_workers_gives_the_log_one_process_gives(
        tmp_path: Path) -> None:
    """60,000 random lines (four parse blocks, so two worker processes take them) into an
    empty log: the same log, byte for byte in its export, as parsing them here; the helper
    indexes dropped for the load are back exactly as the migrations make them."""
    lines = varied_export(60_000, seed=7)
    text = "\n".join(lines) + "\n"
    assert len(text.encode()) > 3 * BLOCK
    results = {}
    for workers in (0, 2):
        results[workers] = await import_text(tmp_path / f"w{workers}.db", text, workers=workers)
    assert results[0] == results[2]
    assert results[2].imported + results[2].duplicates == len(lines)
    assert results[2].duplicates > 100
    await write_log(tmp_path / "fresh.db", [])
    assert index_sql(tmp_path / "w2.db") == index_sql(tmp_path / "fresh.db")
    assert len(index_sql(tmp_path / "fresh.db")) >= 4
    assert log_state(tmp_path / "w2.db") == ("ok", "wal")
    exported = export_text(tmp_path / "w2.db")
    assert exported == export_text(tmp_path / "w0.db")
    retried = {json.dumps(json.loads(line)["report"]) for line in exported.splitlines()}
    assert len(exported.splitlines()) == results[2].imported and len(retried) > 1000
    again = await import_text(tmp_path / "again.db", exported, workers=2)
    assert export_text(tmp_path / "again.db") == exported  # export → import → export


async def test_a_bad_line_in_a_late_block_leaves_nothing_and_the_indexes_in_place(
        tmp_path: Path) -> None:
    lines = varied_export(40_000, seed=3)
    lines[33_333] = lines[33_333][:-30]
    text = "\n".join(lines) + "\n"
    path = tmp_path / "log.db"
    with pytest.raises(ImportRefused) as refused:
        await import_text(path, text, "big", workers=2)
    assert refused.value.lines == [33_334]
    assert stored(path) == []
    await write_log(tmp_path / "fresh.db", [])
    assert index_sql(path) == index_sql(tmp_path / "fresh.db")
    assert log_state(path) == ("ok", "wal")
    result = await import_text(path, text, "big", workers=2, skip_bad=True)
    assert (result.bad, result.bad_lines) == (1, [33_334])
    assert result.imported + result.duplicates == len(lines) - 1


async def test_order_is_checked_across_blocks_and_sorted_across_them(tmp_path: Path) -> None:
    lines = [json.loads(line) for line in varied_export(40_000, seed=5)]
    late = [5, 25_000, 39_000]  # one in the first block, one in the second, one in the last
    for number in late:
        lines[number]["received"] = lines[number - 1]["received"] - 100
    text = "\n".join(json.dumps(line) for line in lines) + "\n"
    with pytest.raises(ImportRefused) as refused:
        await import_text(tmp_path / "a.db", text, workers=2)
    assert refused.value.lines == [number + 1 for number in late]
    assert stored(tmp_path / "a.db") == []
    result = await import_text(tmp_path / "b.db", text, workers=2, sort=True)
    assert (result.sorted, result.out_of_order) == (True, 3)
    received = [row[1] for row in stored(tmp_path / "b.db")]
    assert received == sorted(received) and len(received) == result.imported


async def test_with_another_connection_open_the_import_stays_in_wal_and_is_still_whole(
        tmp_path: Path) -> None:
    """Leaving WAL needs the only connection to the file; with a reader open the import runs
    in WAL, refusing as wholly as in rollback mode."""
    path = tmp_path / "log.db"
    await write_log(path, [])
    lines = export_lines(30)
    with contextlib.closing(sqlite3.connect(path)) as reader:
        reader.execute("SELECT count(*) FROM events").fetchone()
        bad = lines[:20] + ["{oops"] + lines[20:]
        with pytest.raises(ImportRefused):
            await import_text(path, "\n".join(bad))
        assert reader.execute("SELECT count(*) FROM events").fetchone() == (0,)
        result = await import_text(path, "\n".join(lines))
        assert reader.execute("SELECT count(*) FROM events").fetchone() == (30,)
        assert reader.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert result.imported == 30
