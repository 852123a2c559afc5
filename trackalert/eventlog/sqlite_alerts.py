"""The alerts of a SQLite event log: the `alerts` table of the same file (migration 0007).

A connection of its own rather than a trip through the log's writer thread: an alert is written
from a Lua worker thread, which waits for it anyway (runCustomWebHook returns once it is
recorded), and alerts are few next to reports, so a short transaction of its own, waiting for
the writer's group commit at worst (busy timeout), costs less than coupling the two. One
connection behind a lock: the workers and the webhook sender's thread share it.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import urllib.parse
from typing import Any

from trackalert.eventlog.alerts import Alert, AlertFilter, AlertStore, time_bounds
from trackalert.eventlog.filters import AsOf
from trackalert.eventlog.base import EventLogError

BUSY_TIMEOUT_MS = 5000
_COLUMNS = ("delivery_id, time, created, seq, hook, policy, login, remote, outcome, attempts, "
            "error, settled, body")


class SQLiteAlerts(AlertStore):
    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            # mode=rw: a mistyped path is an error, not a new empty file
            uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=rw"
            try:
                db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            except sqlite3.OperationalError as exc:
                raise EventLogError(f"cannot open the event log {self.path}: {exc}") from None
            db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA synchronous=FULL")  # recorded means on disk, as the outbox
            if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'alerts'").fetchone() is None:
                db.close()
                raise EventLogError(f"event log {self.path} has no alerts table (migration 0007): "
                                    f"open it once with this trackalert to upgrade it")
            self._db = db
        return self._db

    def _execute(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._connection().execute(sql, args).fetchall()

    def _change(self, sql: str, args: tuple) -> int:
        with self._lock:
            return self._connection().execute(sql, args).rowcount

    def record(self, alert: Alert) -> bool:
        return 1 == self._change(
            f"INSERT INTO alerts ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (delivery_id) DO NOTHING",
            (alert.delivery_id, alert.time, alert.created, alert.seq, alert.hook, alert.policy,
             alert.login, alert.remote, alert.outcome, alert.attempts, alert.error, alert.settled,
             alert.body),
        )

    def settle(self, delivery_id: str, outcome: str, attempts: int, error: str,
               at: float | None) -> None:
        self._change("UPDATE alerts SET outcome = ?, attempts = ?, error = ?, settled = ? "
                      "WHERE delivery_id = ?", (outcome, attempts, error, at, delivery_id))

    def count(self, flt: AlertFilter, as_of: AsOf) -> int:
        where, args = _where(flt, as_of)
        return int(self._execute(f"SELECT count(*) FROM alerts WHERE {where}", args)[0][0])

    def recent(self, flt: AlertFilter, n: int, as_of: AsOf) -> list[Alert]:
        where, args = _where(flt, as_of)
        rows = self._execute(f"SELECT {_COLUMNS} FROM alerts WHERE {where} "
                             "ORDER BY time DESC, delivery_id DESC LIMIT ?", (*args, max(0, n)))
        return [_alert(row) for row in rows]

    def prune(self, older_than: float) -> int:
        return self._change("DELETE FROM alerts WHERE time < ?", (older_than,))

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def _where(flt: AlertFilter, as_of: AsOf) -> tuple[str, tuple]:
    """The SQL of alerts.matches; values bound, never spliced."""
    terms, args = ["1"], []  # type: list[str], list[Any]
    if as_of.before_seq is not None:
        terms.append("seq < ?")  # NULL (no causing event) is never < anything: not seen
        args.append(as_of.before_seq)
    low, high = time_bounds(flt, as_of)
    if low is not None:
        terms.append("time >= ?")
        args.append(low)
    if high is not None:
        terms.append("time <= ?")
        args.append(high)
    for key in ("policy", "login", "remote", "hook", "outcome"):
        value = getattr(flt, key)
        if value is not None:
            terms.append(f"{key} = ?")
            args.append(value)
    return " AND ".join(terms), tuple(args)


def _alert(row: tuple) -> Alert:
    (delivery_id, time, created, seq, hook, policy, login, remote, outcome, attempts, error,
     settled, body) = row
    return Alert(delivery_id=delivery_id, hook=hook, body=bytes(body), time=float(time),
                 created=float(created), seq=None if seq is None else int(seq), policy=policy,
                 login=login, remote=remote, outcome=outcome, attempts=int(attempts), error=error,
                 settled=None if settled is None else float(settled))
