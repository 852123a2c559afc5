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
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from dataclasses import dataclass, field, replace
from typing import Collection

__all__ = ["Delivery", "Outbox", "OutboxFull", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1

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
    last_error   TEXT    NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS deliveries_next_attempt ON deliveries (next_attempt, row);
"""

_COLUMNS = (
    "row, delivery_id, hook_id, hook_name, url, body, headers, created, attempts, next_attempt, "
    "last_error"
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
    expanded them at send time. `row` is 0 until the delivery is stored.
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
                db.executescript(_SCHEMA)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
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
                "created, attempts, next_attempt, last_error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    delivery.delivery_id, delivery.hook_id, delivery.hook_name, delivery.url,
                    delivery.body, json.dumps(delivery.headers), delivery.created,
                    delivery.attempts, delivery.next_attempt, delivery.last_error,
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

    def pending(self) -> list[Delivery]:
        """Every stored delivery, oldest first (for inspection and tests)."""
        with self._lock:
            rows = self._connection().execute(
                f"SELECT {_COLUMNS} FROM deliveries ORDER BY row"
            ).fetchall()
        return [_delivery(r) for r in rows]

    def depth(self) -> int:
        """How many deliveries wait (kept in memory: read on every scrape and enqueue)."""
        return self._depth

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.ProgrammingError(f"the webhook outbox {self.path} is not open")
        return self._db


def _delivery(row: tuple) -> Delivery:
    (number, delivery_id, hook_id, hook_name, url, body, headers, created, attempts,
     next_attempt, last_error) = row
    return Delivery(
        delivery_id=delivery_id, hook_id=int(hook_id), hook_name=hook_name, url=url,
        body=bytes(body), headers=json.loads(headers), created=float(created),
        attempts=int(attempts), next_attempt=float(next_attempt), last_error=last_error,
        row=int(number),
    )

