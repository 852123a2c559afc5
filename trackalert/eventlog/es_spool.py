"""The local spool of the Elasticsearch log: reports kept on disk while the cluster is away.

A SQLite file (WAL, ``synchronous=FULL``: a commit is fsync'd before `add` returns), because the
200 to wforce promises the report is stored, and the spool is then the only place it is. Rows are
kept in arrival order (the rowid) and forwarded in that order. A row may carry the seq and
`_id` it was given before its bulk was sent (`assign`): a forward retried after a crash sends
the same `_id` again, which the cluster stores once. The file also keeps the last known policy
cursors and seq counter (`state`), so a node can start with the cluster unreachable and still
know where its policy runner was.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterable

import aiosqlite

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS spooled (id INTEGER PRIMARY KEY, received REAL NOT NULL, "
    "doc TEXT NOT NULL, delivery_id TEXT, fp BLOB, seq INTEGER, doc_id TEXT)",
    "CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)


@dataclass(slots=True)
class Spooled:
    """One spooled report: its event document (without seq yet) and what keys it."""

    received: float
    doc: dict[str, Any]
    delivery_id: str | None = None
    fp: bytes | None = None
    #: Given by `assign` just before the forward's bulk (None until then).
    seq: int | None = None
    doc_id: str | None = None
    #: The row's position in the spool (set by `add` and `head`).
    rowid: int = 0


class Spool:
    def __init__(self, path: str) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        #: Reports in the spool, and when the oldest of them was received (None: empty).
        self.depth = 0
        self.oldest: float | None = None
        #: One connection, several tasks (appends, the forwarder, state): one transaction at a time.
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        db = await aiosqlite.connect(self.path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        for statement in _SCHEMA:
            await db.execute(statement)
        self._db = db
        async with db.execute("SELECT count(*) FROM spooled") as cursor:
            (self.depth,) = await cursor.fetchone()  # type: ignore[misc]
        await self._find_oldest()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def is_open(self) -> bool:
        return self._db is not None

    def _conn(self) -> aiosqlite.Connection:
        assert self._db is not None, "the spool is not open"
        return self._db

    async def add(self, entries: list[Spooled]) -> None:
        """Append `entries` in one fsync'd transaction; returns once they are on disk."""
        async with self._transaction() as db:
            for entry in entries:
                cursor = await db.execute(
                    "INSERT INTO spooled (received, doc, delivery_id, fp, seq, doc_id) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (entry.received, json.dumps(entry.doc, separators=(",", ":")),
                     entry.delivery_id, entry.fp, entry.seq, entry.doc_id))
                entry.rowid = cursor.lastrowid or 0
        if entries:
            self.depth += len(entries)
            if self.oldest is None:
                self.oldest = entries[0].received

    async def head(self, n: int) -> list[Spooled]:
        """The `n` oldest entries, in arrival order."""
        async with self._conn().execute(
                "SELECT id, received, doc, delivery_id, fp, seq, doc_id FROM spooled "
                "ORDER BY id LIMIT ?", (n,)) as cursor:
            rows = await cursor.fetchall()
        return [Spooled(received, json.loads(doc), delivery_id, fp, seq, doc_id, rowid)
                for rowid, received, doc, delivery_id, fp, seq, doc_id in rows]

    async def assign(self, entries: Iterable[Spooled]) -> None:
        """Record the seq, `_id` and `received` each entry is about to be sent under (fsync'd):
        a forward repeated after a crash sends the very same document."""
        await self._write("UPDATE spooled SET seq = ?, doc_id = ?, received = ? WHERE id = ?",
                          [(e.seq, e.doc_id, e.received, e.rowid) for e in entries])

    async def remove(self, entries: list[Spooled]) -> None:
        """Forget `entries` (the cluster has them)."""
        await self._write("DELETE FROM spooled WHERE id = ?", [(e.rowid,) for e in entries])
        self.depth = max(0, self.depth - len(entries))
        await self._find_oldest()

    async def _find_oldest(self) -> None:
        """`received` never goes back in rowid order: the first row is the oldest (no scan; a
        row being forwarded may hold the later stamp `assign` gave it: the age is that of the
        rows still waiting then)."""
        async with self._conn().execute(
                "SELECT received FROM spooled ORDER BY id LIMIT 1") as cursor:
            row = await cursor.fetchone()
        self.oldest = row[0] if row else None

    async def state(self) -> dict[str, int]:
        async with self._conn().execute("SELECT name, value FROM state") as cursor:
            return {name: value for name, value in await cursor.fetchall()}

    async def save_state(self, values: dict[str, int]) -> None:
        await self._write("INSERT OR REPLACE INTO state (name, value) VALUES (?, ?)",
                          list(values.items()))

    async def _write(self, sql: str, params: list[tuple]) -> None:
        if params:
            async with self._transaction() as db:
                await db.executemany(sql, params)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (fsync'd: synchronous=FULL), or ROLLBACK on an error."""
        async with self._lock:
            db = self._conn()
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            await db.execute("COMMIT")
