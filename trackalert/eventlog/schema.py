"""The SQL schema of the event log, as SQLAlchemy Core tables.

This is the *current* shape (what the newest migration produces); the migrations in
``trackalert/migrations/versions`` are the history and spell their DDL out themselves, so that
changing this file never changes what an old migration does.

Why the shape is what it is:

* ``events.seq`` is ``INTEGER PRIMARY KEY`` — the rowid — and the ONLY index on ``events``.
  Every extra index is another random page write per append, and ingest rate is the whole
  point. Queries go by seq range; ``received`` is non-decreasing in seq, so time cut-offs are
  found by binary search on seq rather than through an index. ``AUTOINCREMENT`` makes SQLite
  remember the highest seq ever stored, so a seq is never reused even after retention empties
  the table.
* Report fields are real columns so that later tools can filter with plain SQL; the open-ended maps
  are compact JSON text (NULL when empty, which is both smaller and lossless).
* ``deliveries`` is a separate, small, ``WITHOUT ROWID`` table keyed by delivery id: it is the
  idempotency index, pruned to the retry window so that it stays small and in cache, instead of a
  second random-key index on the ever-growing ``events`` table.
* Enrichment columns (country, city, lat, lon, asn, isp) will arrive with a later migration.
"""

from __future__ import annotations

from sqlalchemy import Boolean, Column, Float, Integer, MetaData, Table, Text

metadata = MetaData()

events = Table(
    "events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("received", Float, nullable=False),
    Column("t", Float, nullable=False),
    Column("login", Text, nullable=False),
    Column("remote", Text, nullable=False),
    Column("pwhash", Text, nullable=False),
    Column("success", Boolean, nullable=False),
    Column("policy_reject", Boolean, nullable=False),
    Column("protocol", Text, nullable=False),
    Column("tls", Boolean, nullable=False),
    Column("device_id", Text, nullable=False),
    Column("session_id", Text, nullable=False),
    Column("fail_type", Text, nullable=False),
    Column("attrs", Text, nullable=True),
    Column("attrs_mv", Text, nullable=True),
    Column("device_attrs", Text, nullable=True),
    Column("extra", Text, nullable=True),
    Column("delivery_id", Text, nullable=True),
    sqlite_autoincrement=True,
)

cursors = Table(
    "cursors",
    metadata,
    Column("name", Text, primary_key=True),
    Column("seq", Integer, nullable=False),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("delivery_id", Text, primary_key=True),
    Column("seq", Integer, nullable=False),
    Column("received", Float, nullable=False),
    sqlite_with_rowid=False,
)

#: Column order of `events`; the SQLite writer builds its row tuples in exactly this order.
EVENT_COLUMNS: tuple[str, ...] = tuple(c.name for c in events.columns)
