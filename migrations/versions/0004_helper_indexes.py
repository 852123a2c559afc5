"""Indexes for the long-term helpers (countReports, countDistinct, firstSeen, ...).

Each index is a random page write on every append, so there are exactly three, each shaped for
a family of questions policies ask (and each costs appends dearly: see the figures below), and
the query builder (trackalert/eventlog/queries.py) names
the one to use (INDEXED BY) instead of trusting a planner without STAT4:

* ``ix_events_login (login, success, seq, country, ip)`` — everything about one account: its
  successes and failures in seq (= time) order; count/first/last over a window, and the distinct
  countries or addresses of an account, are answered from the index without touching the table
  (measured on 10M events: the table lookups made countDistinct's p99 4.7 ms instead of < 2 ms).
* ``ix_events_ip (ip, seq) WHERE success = 0`` — the failures of one address or one network:
  ``ip`` is the address as bytes behind a version tag (4 or 6), so a netmask is a contiguous
  range of the index. Partial because address questions are about attacks (spraying, accounts
  under attack), and a full index on random addresses cost the most of the three: measured on a
  10M-event log, 128 appenders, 64 MB cache: no helper index 58,800 appends/s, login index only
  20,700/s, all three full 4,500/s, with this one and the pwhash one partial 10,900/s (15,500/s
  with a 256 MB cache).
* ``ix_events_pwhash_failed (pwhash, seq) WHERE success = 0`` — one wrong password tried against
  many accounts; partial, because successful logins are the bulk of the log and never needed.

Time windows are not indexed at all: ``received`` is non-decreasing in seq, so a window is a
seq range found by binary search on the primary key.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from trackalert.eventlog.ipkey import ip_key

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_CHUNK = 10000


def upgrade() -> None:
    op.add_column("events", sa.Column("ip", sa.LargeBinary, nullable=True))
    connection = op.get_bind()
    last = 0
    while True:  # back-fill the derived column for events stored before this revision
        rows = connection.exec_driver_sql(
            "SELECT seq, remote FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (last, _CHUNK)
        ).fetchall()
        if not rows:
            break
        connection.exec_driver_sql(
            "UPDATE events SET ip = ? WHERE seq = ?", [(ip_key(remote), seq) for seq, remote in rows]
        )
        last = rows[-1][0]
    op.execute("CREATE INDEX ix_events_login ON events (login, success, seq, country, ip)")
    op.execute("CREATE INDEX ix_events_ip ON events (ip, seq) WHERE success = 0")
    op.execute("CREATE INDEX ix_events_pwhash_failed ON events (pwhash, seq) WHERE success = 0")


def downgrade() -> None:
    op.execute("DROP INDEX ix_events_pwhash_failed")
    op.execute("DROP INDEX ix_events_ip")
    op.execute("DROP INDEX ix_events_login")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("ip")
