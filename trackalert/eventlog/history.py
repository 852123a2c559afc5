"""Moving history around: a log as NDJSON (export), NDJSON or wforce report lines into a log
(import), and an export read back as events (replay).

Why the formats and rules are what they are:

* An export line carries everything the log holds (seq, `received`, the delivery id, the report
  with its unknown fields, the enrichment frozen at ingest, nulls included), and is written
  deterministically, so export → import → export is byte-identical and a replay of either names
  the same events by the same seqs.
* Export reads one SQLite snapshot (one read transaction) on a read-only connection: WAL lets it
  run beside a daemon that keeps writing, and neither waits for the other.
* Import writes through the log's own writer (`SQLiteEventLog.submit_history`), a transaction per
  chunk with two chunks in flight, so parsing the next chunk overlaps committing the last one.
  A file is all or nothing: if it cannot be imported whole (a bad line without `skip_bad`,
  `received` out of order without `sort`), what was committed of it is taken out again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import sqlite3
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterable, Iterator, Sequence

from trackalert.eventlog.base import Event
from trackalert.eventlog.rows import (
    DELIVERY_COLUMN, GEO_COLUMNS, _geo_from_columns, decode_row, encode_enriched, encode_row,
)
from trackalert.eventlog.schema import EVENT_COLUMNS
from trackalert.eventlog.sqlite import BUSY_TIMEOUT_MS, SQLiteEventLog
from trackalert.report import Report, ReportError, fingerprint, parse_delivery_id, report_from_dict

#: The enrichment members of an export line, in the order of the log's columns.
GEO_KEYS = ("country", "city", "latitude", "longitude", "asn", "isp")
_GEO_TYPES: dict[str, tuple[type, ...]] = {
    "country": (str,), "city": (str,), "latitude": (int, float), "longitude": (int, float),
    "asn": (int,), "isp": (str,),
}
#: Where the enrichment sits in a whole `events` row (after seq and received).
_TABLE_GEO = slice(GEO_COLUMNS.start + 2, GEO_COLUMNS.stop + 2)
EXPORT_KEYS = ("seq", "received", "delivery_id", "report", "enrichment")
#: Events per import transaction: enough that its commit (an fsync) is a small part of the cost,
#: few enough that the writer's two queued chunks stay a small part of the import's memory.
CHUNK = 10_000
#: How many bad or out-of-order line numbers an import lists (it counts them all).
MAX_LISTED = 20

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON constant {name}")


_decode = json.JSONDecoder(parse_constant=_reject_constant).decode


class HistoryError(Exception):
    """The input or the log cannot be used as asked; the message is for the operator."""


class ImportRefused(HistoryError):
    """Nothing of the file was imported (or it was taken out again); `lines` are the culprits."""

    def __init__(self, message: str, lines: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.lines = list(lines)


# --------------------------------------------------------------------------- export


def open_snapshot(log_path: str | os.PathLike[str]) -> sqlite3.Connection:
    """A read-only connection on a log file, inside one read transaction (a consistent view).

    Read-only by URI, so it can never take the write lock of a running daemon's file, and a
    missing file is an error instead of a new empty database.
    """
    log_path = os.fspath(log_path)
    uri = "file:" + urllib.parse.quote(log_path) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None,
                               timeout=BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error as exc:
        raise HistoryError(f"cannot open the event log {log_path}: {exc}") from None
    try:
        conn.execute("BEGIN")
        names = {row[1] for row in conn.execute("PRAGMA table_info(events)")}
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise HistoryError(f"{log_path} is not a trackalert event log: {exc}") from None
    if not set(EVENT_COLUMNS) <= names:
        conn.close()
        raise HistoryError(f"{log_path} is not a trackalert event log (no events table of ours)")
    return conn


def export_line(row: Sequence[Any]) -> str:
    """One `events` row (EVENT_COLUMNS order) as an export line, without the newline."""
    event = decode_row(row[:_TABLE_GEO.start])
    return _dumps({
        "seq": event.seq,
        "received": event.received,
        "delivery_id": event.delivery_id,
        "report": event.report.to_json_dict(),
        "enrichment": dict(zip(GEO_KEYS, row[_TABLE_GEO])),
    })


def export_events(
    log_path: str | os.PathLike[str],
    out: IO[str],
    from_: float | None = None,
    to: float | None = None,
    logins: Iterable[str] = (),
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write the events with `from_ <= received < to` (and one of `logins`, if any), in seq
    order, as export lines; returns how many. `log_path` is a log file, or an
    ``elasticsearch://`` URL (read through `es_snapshot`, the same rows)."""
    count = 0
    for rows in _export_rows(log_path, from_, to, list(logins)):
        out.write("".join(export_line(row) + "\n" for row in rows))
        count += len(rows)
        if progress is not None:
            progress(count)
    return count


def _export_rows(log_path: str | os.PathLike[str], from_: float | None, to: float | None,
                 logins: list[str]) -> Iterator[Sequence[Sequence[Any]]]:
    """The selected `events` rows in seq order, a chunk at a time, from one consistent snapshot.
    In a file, the time bounds become a seq range with one seek each of the `received` index
    (received is non-decreasing in seq)."""
    if os.fspath(log_path).lower().startswith("elasticsearch://"):
        from trackalert.eventlog.es_snapshot import ElasticSnapshot, SnapshotError

        try:
            with ElasticSnapshot(os.fspath(log_path)) as snapshot:
                yield from snapshot.rows(from_, to, logins)
        except SnapshotError as exc:
            raise HistoryError(str(exc)) from None
        return
    conn = open_snapshot(log_path)
    try:
        where, params = _export_filter(from_, to, logins)
        columns = ", ".join(EVENT_COLUMNS)
        cursor = conn.execute(f"SELECT {columns} FROM events {where} ORDER BY seq", params)
        while rows := cursor.fetchmany(2000):
            yield rows
    finally:
        conn.close()


_FIRST_AT = ("(SELECT seq FROM events INDEXED BY ix_events_received WHERE received >= ? "
             "ORDER BY received, seq LIMIT 1)")


def _export_filter(from_: float | None, to: float | None,
                   logins: list[str]) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if from_ is not None:
        clauses.append(f"seq >= coalesce({_FIRST_AT}, 9223372036854775807)")
        params.append(from_)
    if to is not None:
        clauses.append(f"seq < coalesce({_FIRST_AT}, 9223372036854775807)")
        params.append(to)
    if logins:
        clauses.append(f"login IN ({', '.join('?' * len(logins))})")
        params.extend(logins)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


# --------------------------------------------------------------------------- reading lines


@dataclass(slots=True)
class Parsed:
    """One input line, ready for the log: `row` from encode_row with the enrichment in it."""

    line: int
    received: float
    seq: int | None
    row: tuple
    key: tuple | None
    #: The report the row stores (an import drops it once encoded: --sort holds every line).
    report: Report | None


def parse_line(text: bytes, line: int,
               enrich: Callable[[Report], Report] | None = None) -> Parsed:
    """An export line, or a plain wforce report (itself, or as an Elasticsearch/Logstash hit's
    `_source`) whose `received` is its `t`. Plain reports are enriched with `enrich`; an export
    line keeps the enrichment it was stored with. Raises ReportError saying why not."""
    try:
        decoded = text.decode("utf-8")
        doc = _decode(decoded)
    except UnicodeDecodeError as exc:
        raise ReportError(f"not valid UTF-8: {exc.reason}") from None
    except (ValueError, RecursionError) as exc:
        raise ReportError(f"not valid JSON: {exc}") from None
    if type(doc) is not dict:
        raise ReportError("not a JSON object")
    # Strict UTF-8 and no escapes: every text is valid Unicode (only an escape can smuggle a
    # lone surrogate in), so encoding the row needs no proof of it.
    proven = "\\u" not in decoded
    if "report" in doc and "received" in doc:
        return _parse_export(doc, line, proven)
    source = doc.get("_source")
    body = source if type(source) is dict else doc
    t = body.get("t")
    if type(t) not in (int, float) or not math.isfinite(t):
        raise ReportError("a wforce report needs a number 't' (it becomes received)")
    report = report_from_dict(body, float(t))
    if enrich is not None:
        report = enrich(report)
    return Parsed(line, float(t), None, encode_row(report, None), None, report)


def _parse_export(doc: dict[str, Any], line: int, proven: bool) -> Parsed:
    if len(doc) != len(EXPORT_KEYS):
        unknown = [key for key in doc if key not in EXPORT_KEYS]
        raise ReportError(f"unknown member(s) of an export line: {', '.join(unknown)}"
                          if unknown else "an export line needs seq, received, delivery_id, "
                          "report and enrichment")
    seq, received, report_doc = doc["seq"], doc["received"], doc["report"]
    if type(seq) is not int or seq < 1:
        raise ReportError("'seq' must be a positive integer")
    if type(received) not in (int, float) or not math.isfinite(received):
        raise ReportError("'received' must be a finite number")
    if type(report_doc) is not dict:
        raise ReportError("'report' must be an object")
    delivery_id = doc["delivery_id"]
    if delivery_id is not None and type(delivery_id) is not str:
        raise ReportError("'delivery_id' must be a string or null")
    delivery_id = parse_delivery_id(delivery_id)
    geo = _enrichment_columns(doc["enrichment"])
    report = report_from_dict(report_doc, float(received))
    row = encode_enriched(report, delivery_id, report.device_attrs, None, None,
                          text_proven=proven)
    row = row[:GEO_COLUMNS.start] + geo + row[GEO_COLUMNS.stop:]
    # The stored row stands for the body: the same id with the same event is a retry.
    key = (delivery_id, fingerprint(repr(row).encode())) if delivery_id is not None else None
    return Parsed(line, float(received), seq, row, key, report)


_NO_GEO = (None,) * len(GEO_KEYS)


def _enrichment_columns(value: Any) -> tuple:
    """The six columns of an export line's enrichment; "" is stored as NULL, as ingest does."""
    if value is None:
        return _NO_GEO
    if type(value) is not dict:
        raise ReportError("'enrichment' must be an object or null")
    if len(value) > len(GEO_KEYS) or not value.keys() <= _GEO_TYPES.keys():
        unknown = [key for key in value if key not in _GEO_TYPES]
        raise ReportError(f"unknown member(s) of 'enrichment': {', '.join(unknown)}")
    get = value.get
    columns = (get("country"), get("city"), get("latitude"), get("longitude"), get("asn"),
               get("isp"))
    if columns == _NO_GEO:
        return _NO_GEO
    for key, item in zip(GEO_KEYS, columns):
        if item is not None and type(item) not in _GEO_TYPES[key]:
            raise ReportError(f"'enrichment.{key}' has the wrong type")
    country, city, latitude, longitude, asn, isp = columns
    return (country or None, city or None,
            float(latitude) if latitude is not None else None,
            float(longitude) if longitude is not None else None, asn, isp or None)


def read_export(path: str | os.PathLike[str]) -> Iterator[Event]:
    """The events of an export file, in file order (for replay); a line that is not a valid
    export line raises HistoryError naming it."""
    with open(path, "rb") as source:
        for number, text in enumerate(source, 1):
            if not text.strip():
                continue
            try:
                parsed = parse_line(text, number)
            except ReportError as exc:
                raise HistoryError(f"{path}:{number}: {exc}") from None
            if parsed.seq is None:
                raise HistoryError(f"{path}:{number}: a wforce report, not an export line "
                                   "(import it into a log first)")
            row = parsed.row
            assert parsed.report is not None
            report = dataclasses.replace(parsed.report, geo=_geo_from_columns(*row[GEO_COLUMNS]))
            yield Event(parsed.seq, parsed.received, report, row[DELIVERY_COLUMN])


# --------------------------------------------------------------------------- import


@dataclass
class ImportResult:
    """What one file's import did, for the operator."""

    name: str
    imported: int = 0
    duplicates: int = 0
    renumbered: int = 0
    bad: int = 0
    bad_lines: list[int] = field(default_factory=list)
    #: Lines whose received was earlier than the line before them (moved by `sort`).
    out_of_order: int = 0
    sorted: bool = False
    first_seq: int = 0
    last_seq: int = 0

    def summary(self) -> str:
        seqs = f" (seq {self.first_seq}-{self.last_seq})" if self.imported else ""
        order = (f"sorted by received ({self.out_of_order} line(s) were out of order)"
                 if self.sorted and self.out_of_order else "already in received order")
        return (f"{self.name}: {self.imported} event(s) imported{seqs}, {self.duplicates} "
                f"duplicate deliveries skipped, {self.bad} bad line(s) skipped, "
                f"{self.renumbered} renumbered; {order}")


BadLine = Callable[[str, int, str], None]


async def import_file(
    log: SQLiteEventLog,
    source: IO[bytes],
    name: str,
    *,
    enrich: Callable[[Report], Report] | None = None,
    skip_bad: bool = False,
    sort: bool = False,
    on_bad: BadLine | None = None,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    """Import one input into an open log, whole or not at all (see the module docstring).

    Raises ImportRefused (the log left as it was) for a bad line without `skip_bad`, `received`
    out of order without `sort`, or input older than what the log already holds."""
    result = ImportResult(name)
    lines = _parsed_lines(source, name, enrich, skip_bad, result, on_bad)
    start_seq = await log.last_seq()
    newest = (await log.describe())["newest_received"]
    if sort:
        lines = iter(_sorted(list(lines), result))
    writer = _ChunkWriter(log, result, progress)
    try:
        await _write_in_order(lines, writer, newest, result, name)
    except BaseException:
        await writer.drain(ignore_errors=True)
        await log.discard_history(start_seq)
        raise
    await writer.drain()
    return result


def _parsed_lines(source: IO[bytes], name: str, enrich: Callable[[Report], Report] | None,
                  skip_bad: bool, result: ImportResult, on_bad: BadLine | None) -> Iterator[Parsed]:
    for number, text in enumerate(source, 1):
        if not text.strip():
            continue
        try:
            parsed = parse_line(text, number, enrich)
        except ReportError as exc:
            if not skip_bad:
                raise ImportRefused(f"{name}:{number}: {exc}", [number]) from None
            if on_bad is not None:
                on_bad(name, number, str(exc))
            result.bad += 1
            if len(result.bad_lines) < MAX_LISTED:
                result.bad_lines.append(number)
        else:
            parsed.report = None
            yield parsed


def _sorted(parsed: list[Parsed], result: ImportResult) -> list[Parsed]:
    """Stable sort by received, counting the lines that stepped back."""
    previous = -math.inf
    for item in parsed:
        if item.received < previous:
            result.out_of_order += 1
        else:
            previous = item.received
    result.sorted = True
    if result.out_of_order:
        parsed.sort(key=lambda item: item.received)
    return parsed


async def _write_in_order(lines: Iterator[Parsed], writer: "_ChunkWriter",
                          newest: float | None, result: ImportResult, name: str) -> None:
    previous = -math.inf
    late: list[int] = []
    for item in lines:
        if newest is not None and previous == -math.inf and item.received < newest:
            raise ImportRefused(
                f"{name}:{item.line}: received {item.received!r} is before the newest event "
                f"already in the log ({newest!r}): received would step back. Import into a new "
                "log file (or merge both exports, import with --sort into a new one).",
                [item.line])
        if item.received < previous:
            late.append(item.line)
            continue
        previous = item.received
        if not late:
            await writer.add(item)
    if late:
        listed = ", ".join(map(str, late[:MAX_LISTED])) + (", ..." if len(late) > MAX_LISTED else "")
        raise ImportRefused(
            f"{name}: {len(late)} line(s) received before the line above them (lines {listed}): "
            "received must not step back in seq order; use --sort to import them sorted",
            late)


class _ChunkWriter:
    """Groups parsed lines into chunks and keeps at most two of them in the writer's queue."""

    def __init__(self, log: SQLiteEventLog, result: ImportResult,
                 progress: Callable[[int], None] | None) -> None:
        self.log, self.result, self.progress = log, result, progress
        self.chunk: list[tuple] = []
        self.in_flight: list[asyncio.Future[Any]] = []

    async def add(self, item: Parsed) -> None:
        self.chunk.append((item.row, item.seq, item.key, item.received))
        if len(self.chunk) >= CHUNK:
            await self._flush()

    async def _flush(self) -> None:
        if self.chunk:
            self.in_flight.append(self.log.submit_history(self.chunk))
            self.chunk = []
        while len(self.in_flight) > 1:
            self._count(await self.in_flight.pop(0))

    def _count(self, done: Any) -> None:
        result = self.result
        result.imported += done.stored
        result.duplicates += done.duplicates
        result.renumbered += done.renumbered
        if done.stored:
            result.first_seq = result.first_seq or done.first_seq
            result.last_seq = done.last_seq
        if self.progress is not None:
            self.progress(result.imported + result.duplicates)

    async def drain(self, ignore_errors: bool = False) -> None:
        if not ignore_errors:
            await self._flush()
        while self.in_flight:
            future = self.in_flight.pop(0)
            try:
                self._count(await future)
            except Exception:
                if not ignore_errors:
                    raise


class Progress:
    """A one-line counter on a terminal (stderr), redrawn at most a few times a second."""

    def __init__(self, stream: IO[str], what: str) -> None:
        self.stream, self.what = stream, what
        self.started = self.shown = time.monotonic()
        self.count = 0

    def __call__(self, count: int) -> None:
        self.count = count
        now = time.monotonic()
        if now - self.shown >= 0.25:
            self.shown = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.count / max(now - self.started, 1e-9)
        self.stream.write(f"\r{self.what}: {self.count:,} events, {rate:,.0f}/s ")
        self.stream.flush()

    def close(self) -> None:
        self._draw(time.monotonic())
        self.stream.write("\n")
        self.stream.flush()
