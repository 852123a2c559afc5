"""Moving history around: a log as NDJSON (export), NDJSON or wforce report lines into a log
(import), and an export read back as events (replay).

Why the formats and rules are what they are:

* An export line carries everything the log holds (seq, `received`, the delivery id, the report
  with its unknown fields, the enrichment frozen at ingest, nulls included), and is written
  deterministically, so export → import → export is byte-identical and a replay of either names
  the same events by the same seqs.
* Export reads one SQLite snapshot (one read transaction) on a read-only connection: WAL lets it
  run beside a daemon that keeps writing, and neither waits for the other.
* Import holds each input in one write transaction of its own connection (rollback journal):
  a file is all or nothing by construction (a bad line without `skip_bad`, `received` out of
  order without `sort`, a crash: the transaction is rolled back), and into an empty log each
  page is written once and the helper indexes are built once, after the load.
* Parsing (JSON, the daemon's validation, encoding the row) is most of an import's work, so
  worker processes parse blocks of the input while this one writes (docs/history.md, Speed).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import itertools
import json
import math
import multiprocessing
import os
import sqlite3
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterable, Iterator, Sequence

from trackalert.eventlog.base import Event
from trackalert.eventlog.export_rows import export_row
from trackalert.eventlog.rows import (
    DELIVERY_COLUMN, GEO_COLUMNS, _geo_from_columns, decode_row, encode_enriched, encode_row,
)
from trackalert.eventlog.schema import EVENT_COLUMNS
from trackalert.eventlog.sqlite import (
    BUSY_TIMEOUT_MS, STATEMENT_CACHE, _immediate, log_end, store_history,
)
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
               enrich: Callable[[Report], Report] | None = None, *,
               keep_report: bool = True) -> Parsed:
    """An export line, or a plain wforce report (itself, or as an Elasticsearch/Logstash hit's
    `_source`) whose `received` is its `t`. Plain reports are enriched with `enrich`; an export
    line keeps the enrichment it was stored with. Raises ReportError saying why not.

    Without `keep_report` (an import needs only the row) an export line usually takes the fast
    path (eventlog/export_rows.py) and `report` is None."""
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
        return _parse_export(doc, line, proven, keep_report)
    source = doc.get("_source")
    body = source if type(source) is dict else doc
    t = body.get("t")
    if type(t) not in (int, float) or not math.isfinite(t):
        raise ReportError("a wforce report needs a number 't' (it becomes received)")
    report = report_from_dict(body, float(t))
    if enrich is not None:
        report = enrich(report)
    return Parsed(line, float(t), None, encode_row(report, None), None, report)


def _parse_export(doc: dict[str, Any], line: int, proven: bool, keep_report: bool) -> Parsed:
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
    row = None if keep_report else export_row(report_doc, delivery_id, geo, proven)
    report = None
    if row is None:
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
#: Makes the function that enriches a wforce report line (the config's GeoIP databases), or
#: None. Called once in every process that parses, so it must pickle: the parse workers are
#: spawned, not forked (the caller may have threads).
EnrichFactory = Callable[[], "Callable[[Report], Report] | None"]
#: A parsed block: history items (as for `store_history`), their line numbers, bad lines.
_Block = tuple[list[tuple], list[int], list[tuple[int, str]]]

#: Bytes of input one parse task takes (cut after a line end): about 5,000 export lines, so
#: that handing it to a worker and its rows back (pickled) is a small part of parsing it.
BLOCK = 4 << 20
#: Parse tasks queued per worker: enough to keep it busy, few enough to bound the memory.
AHEAD = 2
#: The import connection's page cache: the deferred index builds sort in it.
IMPORT_CACHE_MB = 256


def import_file(
    log_path: str | os.PathLike[str],
    source: IO[bytes],
    name: str,
    *,
    enrich: EnrichFactory | None = None,
    skip_bad: bool = False,
    sort: bool = False,
    on_bad: BadLine | None = None,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> ImportResult:
    """Import one input into a log file (created and migrated already), whole or not at all.

    `workers` parse processes (default: one per CPU; 0 parses here, as does an input of one
    block). Raises ImportRefused (the log left as it was) for a bad line without `skip_bad`,
    `received` out of order without `sort`, or input older than what the log already holds;
    sqlite3.Error when the log cannot be written (another process holds its write lock)."""
    result = ImportResult(name)
    blocks = _parsed_blocks(source, enrich, workers)
    try:
        with _import_transaction(log_path) as conn:
            _Load(conn, result, name, progress).run(blocks, skip_bad, sort, on_bad)
    finally:
        blocks.close()
    return result


@contextlib.contextmanager
def _import_transaction(log_path: str | os.PathLike[str]) -> Iterator[sqlite3.Connection]:
    """One write transaction over the whole input, in rollback-journal mode when it can be.

    Why: a refusal or a crash at any point leaves the log as it was (SQLite rolls the
    transaction back, after a crash when the file is next opened), with no clean-up of our own.
    A rollback journal holds only pages that were in the file before, so a load into an empty
    log writes each page once, where WAL writes it twice (the log, then the checkpoint).
    Leaving WAL needs the only connection to the file; when another one has it open (a reader,
    a daemon) the import stays in WAL, as slow as before but as whole. WAL comes back after."""
    path = os.fspath(log_path)
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000,
                           cached_statements=STATEMENT_CACHE)
    mode = "wal"
    try:
        try:
            mode = str(conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]).lower()
        except sqlite3.OperationalError:  # locked by another process's transaction
            pass
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA cache_size={-1024 * IMPORT_CACHE_MB}")
        with _immediate(conn), _none_bound_fast():
            yield conn
    finally:
        if mode != "wal":
            try:  # committed or rolled back already: a failure here must not say otherwise
                conn.execute("PRAGMA journal_mode=WAL")
            except sqlite3.Error:  # pragma: no cover - the daemon sets WAL when it opens it
                pass
        conn.close()


_NONE_ADAPTER = (type(None), sqlite3.PrepareProtocol)


@contextlib.contextmanager
def _none_bound_fast() -> Iterator[None]:
    """While importing, bind None (a third of a row's values) through a registered adapter
    that returns it unchanged: without one, sqlite3 looks for `__adapt__` and `__conform__`
    on every None (two failed attribute lookups, ~170 ns each time; CPython 3.11). A no-op for
    what is stored, so harmless to anyone else in the process meanwhile."""
    added = _NONE_ADAPTER not in sqlite3.adapters
    if added:
        sqlite3.register_adapter(type(None), {}.get)  # {}.get(None) is None, in C
    try:
        yield
    finally:
        if added:
            sqlite3.adapters.pop(_NONE_ADAPTER, None)


class _Load:
    """One input's items into the import transaction, in line order: the order checks, the
    counts, chunks through `store_history`; into an empty log, the helper indexes are dropped
    first and built once at the end (one sort instead of a random B-tree insert per event)."""

    def __init__(self, conn: sqlite3.Connection, result: ImportResult, name: str,
                 progress: Callable[[int], None] | None) -> None:
        self.conn, self.result, self.name, self.progress = conn, result, name, progress
        self.seq, self.floor, nonempty = log_end(conn)
        self.newest = self.floor if nonempty else None
        self.indexes = [] if nonempty else _drop_indexes(conn)
        self.previous = -math.inf
        self.late: list[int] = []
        self.chunk: list[tuple] = []

    def run(self, blocks: Iterator[_Block], skip_bad: bool, sort: bool,
            on_bad: BadLine | None) -> None:
        if sort:
            items, lines = [], []
            for block_items, block_lines, bad in blocks:
                self._bad(bad, skip_bad, on_bad)
                items += block_items
                lines += block_lines
            self._add(*_sorted(items, lines, self.result))
        else:
            for block_items, block_lines, bad in blocks:
                self._bad(bad, skip_bad, on_bad)
                self._add(block_items, block_lines)
        if self.late:
            late = self.late
            listed = (", ".join(map(str, late[:MAX_LISTED]))
                      + (", ..." if len(late) > MAX_LISTED else ""))
            raise ImportRefused(
                f"{self.name}: {len(late)} line(s) received before the line above them (lines "
                f"{listed}): received must not step back in seq order; use --sort to import "
                "them sorted", late)
        self._flush()
        for sql in self.indexes:
            self.conn.execute(sql)

    def _bad(self, bad: list[tuple[int, str]], skip_bad: bool, on_bad: BadLine | None) -> None:
        result = self.result
        for number, why in bad:
            if not skip_bad:
                raise ImportRefused(f"{self.name}:{number}: {why}", [number])
            if on_bad is not None:
                on_bad(self.name, number, why)
            result.bad += 1
            if len(result.bad_lines) < MAX_LISTED:
                result.bad_lines.append(number)

    def _add(self, items: list[tuple], lines: list[int]) -> None:
        previous, late, chunk = self.previous, self.late, self.chunk
        if previous == -math.inf and items and self.newest is not None \
                and items[0][3] < self.newest:
            raise ImportRefused(
                f"{self.name}:{lines[0]}: received {items[0][3]!r} is before the newest event "
                f"already in the log ({self.newest!r}): received would step back. Import into "
                "a new log file (or merge both exports, import with --sort into a new one).",
                lines[:1])
        for item, line in zip(items, lines):
            received = item[3]
            if received < previous:
                late.append(line)
            else:
                previous = received
                if not late:
                    chunk.append(item)
        self.previous = previous
        if len(chunk) >= CHUNK:
            self._flush()
        if self.progress is not None:
            self.progress(self.result.imported + self.result.duplicates + len(self.chunk))

    def _flush(self) -> None:
        if not self.chunk:
            return
        done, self.floor = store_history(self.conn, self.chunk, self.seq, self.floor)
        self.chunk = []
        self.seq = done.last_seq
        result = self.result
        result.imported += done.stored
        result.duplicates += done.duplicates
        result.renumbered += done.renumbered
        if done.stored:
            result.first_seq = result.first_seq or done.first_seq
            result.last_seq = done.last_seq


def _drop_indexes(conn: sqlite3.Connection) -> list[str]:
    """Drop the events table's own indexes (not the primary key); returns their CREATE
    statements, exactly as the migrations made them, to build them again."""
    found = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND "
                         "tbl_name = 'events' AND sql IS NOT NULL").fetchall()
    for index, _ in found:
        conn.execute(f'DROP INDEX "{index}"')
    return [sql for _, sql in found]


def _sorted(items: list[tuple], lines: list[int],
            result: ImportResult) -> tuple[list[tuple], list[int]]:
    """Stable sort by received, counting the lines that stepped back."""
    previous = -math.inf
    for item in items:
        if item[3] < previous:
            result.out_of_order += 1
        else:
            previous = item[3]
    result.sorted = True
    if not result.out_of_order:
        return items, lines
    order = sorted(range(len(items)), key=lambda i: items[i][3])
    return [items[i] for i in order], [lines[i] for i in order]


# --------------------------------------------------------------------------- parsing, in parallel


def _parsed_blocks(source: IO[bytes], enrich: EnrichFactory | None,
                   workers: int | None) -> Iterator[_Block]:
    """The input's blocks parsed, in order: by a pool of worker processes (the parse is most
    of an import's work, and the interpreter lock keeps threads from sharing it), here when
    the input is one block or `workers` is 0. At most AHEAD blocks per worker are read ahead."""
    blocks = _blocks(source)
    head = list(itertools.islice(blocks, 2))
    count = (_cpus() if workers is None else workers) if len(head) > 1 else 0
    if count <= 0:
        enrich_one = enrich() if enrich is not None else None
        for first, data in itertools.chain(head, blocks):
            yield _parse_block(first, data, enrich_one)
        return
    pool = multiprocessing.get_context("spawn").Pool(count, _start_worker, (enrich,))
    try:
        pending: collections.deque[Any] = collections.deque()
        for block in itertools.chain(head, blocks):
            pending.append(pool.apply_async(_parse_in_worker, block))
            if len(pending) >= count * AHEAD:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        pool.terminate()
        pool.join()


def _cpus() -> int:
    """The CPUs this process may run on (a container's or taskset's share, where known)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # pragma: no cover - not Linux


def _blocks(source: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """(number of its first line, bytes) of about BLOCK bytes each, cut after a newline."""
    line, rest = 1, b""
    while True:
        data = source.read(BLOCK)
        if not data:
            if rest:
                yield line, rest
            return
        data = rest + data if rest else data
        cut = data.rfind(b"\n") + 1
        if not cut:
            rest = data
            continue
        block, rest = data[:cut], data[cut:]
        yield line, block
        line += block.count(b"\n")


_worker_enrich: "Callable[[Report], Report] | None" = None


def _start_worker(enrich: EnrichFactory | None) -> None:
    global _worker_enrich
    # Parsing makes no reference cycles: the collector would only rescan the block's objects.
    gc.disable()
    _worker_enrich = enrich() if enrich is not None else None


def _parse_in_worker(first: int, data: bytes) -> _Block:
    return _parse_block(first, data, _worker_enrich)


def _parse_block(first: int, data: bytes,
                 enrich: "Callable[[Report], Report] | None") -> _Block:
    items: list[tuple] = []
    lines: list[int] = []
    bad: list[tuple[int, str]] = []
    texts = data.split(b"\n")
    if not texts[-1]:
        texts.pop()
    for number, text in enumerate(texts, first):
        if not text.strip():
            continue
        try:
            parsed = parse_line(text, number, enrich, keep_report=False)
        except ReportError as exc:
            bad.append((number, str(exc)))
        else:
            row = parsed.row
            # success, policy_reject and tls as the integers SQLite stores them as: a bool is
            # bound through sqlite3's adapter lookup, eight times slower than an int.
            row = row[:4] + (int(row[4]), int(row[5]), row[6], int(row[7])) + row[8:]
            items.append((row, parsed.seq, parsed.key, parsed.received))
            lines.append(number)
    return items, lines, bad


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
