"""The long-term helpers on the SQLite event log: a `Filter` becomes one indexed SQL query.

Why it is built this way:

* Lua calls a helper synchronously from a worker thread, so each thread gets its own read-only
  ``sqlite3`` connection (WAL: readers never block the writer, nor it them); no event loop hop.
* ``received`` is non-decreasing in seq, so a window/since/until becomes a seq range: one seek of
  ix_events_received (migration 0006; an append-order index, cheap for appends) finds each end.
* The index is chosen here, not by the planner (SQLite without STAT4 picks badly, measured at
  233 ms instead of 0.34 ms): ``login`` → ix_events_login, else a failed ``remote``/``netmask``
  → ix_events_ip, else a failed ``pwhash`` → ix_events_pwhash_failed, else the seq range of the
  table itself (NOT INDEXED: cheap for short windows, a scan for long ones). Every other
  condition is a residual filter on those rows. The address and pwhash indexes are partial
  (failures only): see migration 0004 for what each index costs appends.
* Only column names from fixed lists are ever written into SQL; every value, JSON path and limit
  is a bound parameter.
"""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

from trackalert.eventlog.base import REPORT_COLUMNS, Event, EventQueries
from trackalert.eventlog.filters import AsOf, Field, Filter
from trackalert.eventlog.ipkey import V4, ip_key, network_range, prefix_text
from trackalert.eventlog.places import NEAR_SQL, near_params
from trackalert.eventlog.rows import decode_row

BUSY_TIMEOUT_MS = 5000

#: Filter attributes compared for equality with a column of the same name.
_EQUAL_COLUMNS = ("protocol", "country", "asn")


def _json_path(key: str) -> str:
    # filters.py refused keys with quotes/backslashes/control characters, so quoting is exact
    return f'$."{key}"'


class SQLiteQueries(EventQueries):
    def __init__(self, path: str) -> None:
        self._path = path
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ connections

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise RuntimeError("the event log is closed")
            conn = sqlite3.connect(
                f"file:{self._path}?mode=ro", uri=True, check_same_thread=False,
                timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
            )
            conn.execute("PRAGMA query_only=1")
            conn.execute("PRAGMA cache_size=-32768")
            with self._lock:
                self._connections.append(conn)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    # ------------------------------------------------------------------ the helpers

    def count_reports(self, flt: Filter, as_of: AsOf) -> int:
        conn = self._conn()
        source, where, params = self._where(conn, flt, as_of)
        if where is None:
            return 0
        return conn.execute(f"SELECT count(*) FROM {source} WHERE {where}", params).fetchone()[0]

    def count_distinct(self, field: Field, flt: Filter, as_of: AsOf) -> int:
        conn = self._conn()
        source, where, params = self._where(conn, flt, as_of)
        if where is None:
            return 0
        # the address key rather than its text: one-to-one, and in the login index (no table reads)
        expr, expr_params = ("ip", []) if field.name == "remote" else _field_sql(field)
        sql = f"SELECT count(DISTINCT {expr}) FROM {source} WHERE {where}"
        return conn.execute(sql, expr_params + params).fetchone()[0]

    def top_values(self, field: Field, flt: Filter, n: int, as_of: AsOf) -> list[tuple[Any, int]]:
        conn = self._conn()
        source, where, params = self._where(conn, flt, as_of)
        if where is None or n <= 0:
            return []
        expr, expr_params = _field_sql(field)
        sql = (f"SELECT {expr} AS v, count(*) AS c FROM {source} WHERE {where} AND v IS NOT NULL "
               f"GROUP BY 1 ORDER BY c DESC, v LIMIT ?")
        rows = conn.execute(sql, expr_params + params + [n]).fetchall()
        if field.kind == "prefix":
            return [(_prefix_value(v, field.bits), c) for v, c in rows]
        return [(v, c) for v, c in rows]

    def first_seen(self, flt: Filter, as_of: AsOf) -> float | None:
        return self._edge(flt, as_of, "ASC")

    def last_seen(self, flt: Filter, as_of: AsOf) -> float | None:
        return self._edge(flt, as_of, "DESC")

    def recent_reports(self, flt: Filter, n: int, as_of: AsOf) -> list[Event]:
        return [decode_row(row) for row in self._recent("*", flt, n, as_of)]

    def recent_rows(self, flt: Filter, n: int, as_of: AsOf) -> list[tuple]:
        return self._recent(_REPORT_SELECT, flt, n, as_of)

    def recent_columns(self, flt: Filter, n: int, as_of: AsOf,
                       columns: tuple[int, ...]) -> list[tuple]:
        return self._recent(", ".join(REPORT_COLUMNS[i] for i in columns), flt, n, as_of)

    def count_near(self, flt: Filter, n: int, latitude: float, longitude: float, km: float,
                   enough: int | None, as_of: AsOf) -> int:
        """One aggregate over the newest n rows (an account's places are in its login index),
        which stops reading at `enough` (an account's home is in its first few rows); an SQLite
        built without its math functions counts the rows here instead."""
        conn = self._conn()
        if not self._has_math(conn):
            return super().count_near(flt, n, latitude, longitude, km, enough, as_of)
        source, where, params = self._where(conn, flt, as_of)
        if where is None or n <= 0 or (enough is not None and enough <= 0):
            return 0
        rows = (f"SELECT latitude, longitude FROM {source} WHERE {where} "
                f"ORDER BY seq DESC LIMIT ?")
        params += [n] + near_params(latitude, longitude, km)
        if enough is None:
            sql = f"SELECT count(*) FROM ({rows}) WHERE {NEAR_SQL}"
        else:
            sql = f"SELECT count(*) FROM (SELECT 1 FROM ({rows}) WHERE {NEAR_SQL} LIMIT ?)"
            params.append(enough)
        return conn.execute(sql, params).fetchone()[0]

    def _has_math(self, conn: sqlite3.Connection) -> bool:
        """Whether this SQLite has sin() and the rest (SQLITE_ENABLE_MATH_FUNCTIONS, 3.35+)."""
        known = getattr(self._local, "math", None)
        if known is None:
            try:
                conn.execute("SELECT asin(sqrt(pow(sin(0.5), 2))) * cos(0.5)").fetchone()
                known = True
            except sqlite3.OperationalError:
                known = False
            self._local.math = known
        return known

    def _recent(self, columns: str, flt: Filter, n: int, as_of: AsOf) -> list[tuple]:
        conn = self._conn()
        source, where, params = self._where(conn, flt, as_of)
        if where is None or n <= 0:
            return []
        sql = f"SELECT {columns} FROM {source} WHERE {where} ORDER BY seq DESC LIMIT ?"
        return conn.execute(sql, params + [n]).fetchall()

    def _edge(self, flt: Filter, as_of: AsOf, order: str) -> float | None:
        conn = self._conn()
        source, where, params = self._where(conn, flt, as_of)
        if where is None:
            return None
        # min/max(seq) first: answered from the index alone; then one primary-key lookup.
        pick = "min" if order == "ASC" else "max"
        seq = conn.execute(f"SELECT {pick}(seq) FROM {source} WHERE {where}", params).fetchone()[0]
        if seq is None:
            return None
        return conn.execute("SELECT received FROM events WHERE seq = ?", (seq,)).fetchone()[0]

    # ------------------------------------------------------------------ SQL building

    def _where(self, conn: sqlite3.Connection, flt: Filter,
               as_of: AsOf) -> tuple[str, str | None, list[Any]]:
        """(FROM clause with the chosen index, WHERE text or None when nothing can match, params)."""
        low, high = self._seq_range(conn, flt, as_of)
        if high is not None and low is not None and low >= high:
            return "events", None, []
        conds: list[str] = []
        params: list[Any] = []
        if flt.login is not None:
            index = "events INDEXED BY ix_events_login"
            conds.append("login = ?")
            params.append(flt.login)
        elif (flt.remote is not None or flt.netmask is not None) and flt.success is False:
            index = "events INDEXED BY ix_events_ip"
        elif flt.pwhash is not None and flt.success is False:
            index = "events INDEXED BY ix_events_pwhash_failed"
        else:
            index = "events NOT INDEXED"  # rowid (seq) range scan
        if flt.success is not None:
            # a literal, not a parameter: the partial indexes need `success = 0` verbatim
            conds.append("success = 1" if flt.success else "success = 0")
        if flt.remote is not None:
            key = ip_key(flt.remote)
            conds.append("ip = ?")
            params.append(key)
        if flt.netmask is not None:
            lo_key, hi_key = network_range(flt.netmask)
            conds.append("ip BETWEEN ? AND ?")
            params += [lo_key, hi_key]
        if flt.pwhash is not None:
            conds.append("pwhash = ?")
            params.append(flt.pwhash)
        for name in _EQUAL_COLUMNS:
            value = getattr(flt, name)
            if value is not None:
                conds.append(f"{name} = ?")
                params.append(value)
        for column, pairs in (("device_attrs", flt.device_attrs), ("attrs", flt.attrs)):
            for key, value in pairs:
                conds.append(f"json_extract({column}, ?) = ?")
                params += [_json_path(key), value]
        if low is not None:
            conds.append("seq >= ?")
            params.append(low)
        if high is not None:
            conds.append("seq < ?")
            params.append(high)
        return index, " AND ".join(conds) if conds else "1", params

    def _seq_range(self, conn: sqlite3.Connection, flt: Filter,
                   as_of: AsOf) -> tuple[int | None, int | None]:
        """[low, high) in seq for the as-of point and the time conditions (None: unbounded)."""
        high = as_of.before_seq
        now = as_of.now
        if now is None and high is not None and flt.window is not None:
            # lt's own event; should retention have removed it meanwhile, the newest one before
            row = conn.execute(
                "SELECT received FROM events WHERE seq <= ? ORDER BY seq DESC LIMIT 1", (high,)
            ).fetchone()
            now = row[0] if row else None
        start = None
        if flt.window is not None and now is not None:
            start = now - flt.window
        if flt.since is not None:
            start = flt.since if start is None else max(start, flt.since)
        end = flt.until
        if as_of.before_seq is None and as_of.now is not None:
            end = as_of.now if end is None else min(end, as_of.now)
        low = self._first_seq(conn, start, strict=False) if start is not None else None
        if end is not None:
            after_end = self._first_seq(conn, end, strict=True)
            high = after_end if high is None else min(high, after_end)
        return low, high

    def _first_seq(self, conn: sqlite3.Connection, when: float, strict: bool) -> int:
        """The smallest seq received at/after `when` (after, if `strict`); last seq + 1 if none.

        One seek of ix_events_received (migration 0006): `received` never decreases in seq,
        so the first index entry at/after `when` (ties in rowid order) is the smallest such seq.
        """
        row = conn.execute(_FIRST_AFTER if strict else _FIRST_FROM, (when,)).fetchone()
        if row is not None:
            return row[0]
        tail = conn.execute("SELECT seq FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        return tail[0] + 1 if tail else 0


_REPORT_SELECT = ", ".join(REPORT_COLUMNS)

_FIRST_FROM = ("SELECT seq FROM events INDEXED BY ix_events_received WHERE received >= ? "
               "ORDER BY received, seq LIMIT 1")
_FIRST_AFTER = ("SELECT seq FROM events INDEXED BY ix_events_received WHERE received > ? "
                "ORDER BY received, seq LIMIT 1")


def _field_sql(field: Field) -> tuple[str, list[Any]]:
    if field.kind == "column":
        return field.name, []
    if field.kind == "prefix":
        return "substr(ip, 1, ?)", [1 + field.bits // 8]
    return f"json_extract({field.kind}, ?)", [_json_path(field.key)]


def _prefix_value(key: bytes, bits: int) -> str:
    width = 4 if key[:1] == V4 else 16
    body = key[1:] + bytes(width - len(key) + 1)
    return prefix_text(key[:1] + body[:width], bits)
