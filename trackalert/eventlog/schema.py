"""The SQL schema of the event log, as SQLAlchemy Core tables.

This is the *current* shape (what the newest migration produces); the migrations in
``migrations/versions`` are the history and spell their DDL out themselves, so that
changing this file never changes what an old migration does.

Why the shape is what it is:

* ``events.seq`` is ``INTEGER PRIMARY KEY`` — the rowid. Every extra index is another random
  page write per append, and ingest rate is the whole point, so the only other indexes are the
  three the long-term helpers need (migration 0004: per login, per address, per failed pwhash). Queries go by seq range; ``received`` is non-decreasing in seq, so time cut-offs are
  found by one seek of ix_events_received (0006), an index that grows at its right edge only. ``AUTOINCREMENT`` makes SQLite
  remember the highest seq ever stored, so a seq is never reused even after retention empties
  the table.
* Report fields are real columns so that later tools can filter with plain SQL; the open-ended maps
  are compact JSON text (NULL when empty, which is both smaller and lossless).
* ``deliveries`` is a separate, small, ``WITHOUT ROWID`` table keyed by (delivery id, body
  fingerprint): it is the idempotency index, pruned to the retry window so that it stays small
  and in cache, instead of a second random-key index on the ever-growing ``events`` table.
* Enrichment columns (country, city, latitude, longitude, asn, isp) are real columns too, so
  that the long-term helpers can filter on them without json_extract.
"""

from __future__ import annotations

from sqlalchemy import Boolean, Column, Float, Index, Integer, LargeBinary, MetaData, Table, Text

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
    # Enrichment at ingest (migration 0003; NULL = unknown or stored before enrichment).
    Column("country", Text, nullable=True),
    Column("city", Text, nullable=True),
    Column("latitude", Float, nullable=True),
    Column("longitude", Float, nullable=True),
    Column("asn", Integer, nullable=True),
    Column("isp", Text, nullable=True),
    # The address as sortable bytes (eventlog/ipkey.py), for remote/netmask filters (0004).
    Column("ip", LargeBinary, nullable=True),
    sqlite_autoincrement=True,
)

# The helper indexes (migration 0004; why these three: see its docstring; 0008 added the places).
Index("ix_events_login", events.c.login, events.c.success, events.c.seq, events.c.country,
      events.c.ip, events.c.latitude, events.c.longitude)  # the places: 0008
Index("ix_events_ip", events.c.ip, events.c.seq,
      sqlite_where=events.c.success == False)  # noqa: E712 - SQL, not Python
Index("ix_events_pwhash_failed", events.c.pwhash, events.c.seq,
      sqlite_where=events.c.success == False)  # noqa: E712 - SQL, not Python
# Append-order, hence cheap: a window's start in one seek (migration 0006).
Index("ix_events_received", events.c.received)

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
    # A digest of the body the id came with (migration 0005): wforce's ids are not unique, so
    # only the same id with the same body is a retry.
    Column("fingerprint", LargeBinary, primary_key=True),
    Column("seq", Integer, nullable=False),
    Column("received", Float, nullable=False),
    sqlite_with_rowid=False,
)

#: Column order of `events`; the SQLite writer builds its row tuples in exactly this order.
EVENT_COLUMNS: tuple[str, ...] = tuple(c.name for c in events.columns)
