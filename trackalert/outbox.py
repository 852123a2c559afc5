"""The persisted outbox of custom webhook deliveries: an alert is on disk before it is sent.

The C++ daemon kept webhooks in a memory queue: a full queue, a receiver that was down or a
restart lost alerts without a trace. Here `runCustomWebHook` writes the finished request (URL
template, body, headers with its `X-Wforce-Delivery` id) to a small SQLite file before it
returns, and the sender deletes it only once a receiver accepted it. A retry, even after a
restart, therefore sends the very same request with the same delivery id, which lets receivers
deduplicate.

The file is separate from the event log on purpose: webhooks then work whatever the log backend
(SQLite or Elasticsearch), and the outbox stays tiny (it only holds what is in flight). It is
written from Lua worker threads and read by the sender, so one connection is shared behind a
lock; every statement is its own transaction, durable on return (WAL, `synchronous=FULL`).

Being a file of its own, it keeps its schema version in `PRAGMA user_version` and upgrades itself
on open (no Alembic: that is the event log's). Version 2 added `seq`, the event whose `report`
call sent the alert, so that an alert waiting or failing can be traced to its report.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from dataclasses import dataclass, field, replace
from typing import Collection

__all__ = ["Delivery", "Outbox", "OutboxFull", "SCHEMA_VERSION"]

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    row          INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id  TEXT    NOT NULL UNIQUE,
    hook_id      INTEGER NOT NULL,
    hook_name    TEXT    NOT NULL,
    url          TEXT    NOT NULL,
    body         BLOB    NOT NULL,
    headers      TEXT    NOT NULL,
    created      REAL    NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL    NOT NULL,
    last_error   TEXT    NOT NULL DEFAULT '',
    seq          INTEGER
);
CREATE INDEX IF NOT EXISTS deliveries_next_attempt ON deliveries (next_attempt, row);
"""

_COLUMNS = (
    "row, delivery_id, hook_id, hook_name, url, body, headers, created, attempts, next_attempt, "
    "last_error, seq"
)


class OutboxFull(Exception):
    """The outbox already holds as many deliveries as allowed (`setWebHookQueueSize`)."""

    def __init__(self, depth: int) -> None:
        super().__init__(f"webhook outbox full ({depth} deliveries)")
        self.depth = depth


@dataclass(frozen=True)
class Delivery:
    """One request to send: everything needed to send it again, identically, after a restart.

    `url` is the hook's URL template: date macros are expanded at each attempt, as the original
    expanded them at send time. `row` is 0 until the delivery is stored. `seq` is the event
    whose `report(lt)` call sent it; None for background functions, custom endpoints and the
    console, which judge no single event.
    """

    delivery_id: str
    hook_id: int
    hook_name: str
    url: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    row: int = 0
    seq: int | None = None


class Outbox:
    """A bounded, durable FIFO of deliveries keyed by when each may next be attempted."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._depth = 0

    # -- lifecycle -------------------------------------------------------------------------------

    def open(self) -> None:
        """Create or open the file (mode 0600: stored headers may carry credentials)."""
        with self._lock:
            if self._db is not None:
                return
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, exist_ok=True)
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise sqlite3.DatabaseError(
                        f"outbox {self.path} has schema version {version}, newer than this "
                        f"trackalert understands ({SCHEMA_VERSION})"
                    )
                _upgrade(db, version)
                self._depth = db.execute("SELECT count(*) FROM deliveries").fetchone()[0]
            except BaseException:
                db.close()
                raise
            self._db = db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @property
    def is_open(self) -> bool:
        return self._db is not None

    # -- writes ----------------------------------------------------------------------------------

    def enqueue(self, delivery: Delivery, capacity: int) -> Delivery:
        """Store a delivery durably; raise `OutboxFull` rather than grow past `capacity`.

        A delivery whose id is already waiting is the same alert again (a policy re-run after
        a crash, or the same body twice from one cause): the stored one stands for both."""
        with self._lock:
            db = self._connection()
            waiting = db.execute(
                "SELECT row FROM deliveries WHERE delivery_id = ?", (delivery.delivery_id,)
            ).fetchone()
            if waiting is not None:
                return replace(delivery, row=int(waiting[0]))
            if self._depth >= capacity:
                raise OutboxFull(self._depth)
            cursor = db.execute(
                "INSERT INTO deliveries (delivery_id, hook_id, hook_name, url, body, headers, "
                "created, attempts, next_attempt, last_error, seq) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    delivery.delivery_id, delivery.hook_id, delivery.hook_name, delivery.url,
                    delivery.body, json.dumps(delivery.headers), delivery.created,
                    delivery.attempts, delivery.next_attempt, delivery.last_error, delivery.seq,
                ),
            )
            self._depth += 1
            row = cursor.lastrowid
        return replace(delivery, row=row or 0)

    def remove(self, row: int) -> None:
        """Forget a delivery: sent, refused for good or expired."""
        with self._lock:
            removed = self._connection().execute("DELETE FROM deliveries WHERE row = ?", (row,)).rowcount
            self._depth -= removed

    def reschedule(self, row: int, attempts: int, next_attempt: float, error: str) -> None:
        """Record a failed attempt and when to try again."""
        with self._lock:
            self._connection().execute(
                "UPDATE deliveries SET attempts = ?, next_attempt = ?, last_error = ? WHERE row = ?",
                (attempts, next_attempt, error, row),
            )

    # -- reads -----------------------------------------------------------------------------------

    def due(self, now: float, limit: int, exclude: Collection[int] = ()) -> list[Delivery]:
        """Up to `limit` deliveries whose time has come, oldest due first, skipping `exclude`
        (the ones being sent right now)."""
        if limit <= 0:
            return []
        with self._lock:
            rows = self._connection().execute(
                f"SELECT {_COLUMNS} FROM deliveries WHERE next_attempt <= ? "
                "ORDER BY next_attempt, row LIMIT ?",
                (now, limit + len(exclude)),
            ).fetchall()
        return [d for d in map(_delivery, rows) if d.row not in exclude][:limit]

    def next_due(self, exclude: Collection[int] = ()) -> float | None:
        """When the earliest delivery not in `exclude` may be attempted (None: nothing waits)."""
        with self._lock:
            rows = self._connection().execute(
                "SELECT row, next_attempt FROM deliveries ORDER BY next_attempt, row LIMIT ?",
                (len(exclude) + 1,),
            ).fetchall()
        for row, next_attempt in rows:
            if row not in exclude:
                return float(next_attempt)
        return None

    def pending(self, limit: int = -1) -> list[Delivery]:
        """The stored deliveries, oldest first, at most `limit` (-1: all) for the console's
        listing, which must stay small however deep the outbox is."""
        with self._lock:
            rows = self._connection().execute(
                f"SELECT {_COLUMNS} FROM deliveries ORDER BY row LIMIT ?", (limit,)
            ).fetchall()
        return [_delivery(r) for r in rows]

    def depth(self) -> int:
        """How many deliveries wait (kept in memory: read on every scrape and enqueue)."""
        return self._depth

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.ProgrammingError(f"the webhook outbox {self.path} is not open")
        return self._db


def _upgrade(db: sqlite3.Connection, version: int) -> None:
    """Bring a file of schema `version` (0: new) to SCHEMA_VERSION in one transaction, so a
    crash mid-upgrade leaves the old version, not half of the new one. Deliveries stored by
    version 1 keep no seq (NULL: not known)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if version == 1:
            db.execute("ALTER TABLE deliveries ADD COLUMN seq INTEGER")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _delivery(row: tuple) -> Delivery:
    (number, delivery_id, hook_id, hook_name, url, body, headers, created, attempts,
     next_attempt, last_error, seq) = row
    return Delivery(
        delivery_id=delivery_id, hook_id=int(hook_id), hook_name=hook_name, url=url,
        body=bytes(body), headers=json.loads(headers), created=float(created),
        attempts=int(attempts), next_attempt=float(next_attempt), last_error=last_error,
        row=int(number), seq=None if seq is None else int(seq),
    )

