"""Delivery ids keyed with the body they came with.

wforce builds `X-Wforce-Delivery` from the microsecond clock, the hook id and the event name, so
two different reports stamped in the same microsecond share an id: keyed by id alone, the second
one was taken for a retry and silently dropped. A retry is the same id *and* the same body, so the
index now keys on (delivery_id, fingerprint), the fingerprint being a digest of the raw body.

SQLite cannot change a primary key in place, hence a new table. The bodies of the deliveries
stored before this revision are unknown: they get an empty fingerprint, which no real digest
equals, so a report arriving under one of those ids is stored (and logged as a collision) rather
than dropped. wforce never retries a webhook, so nothing is stored twice in practice; the old ids
age out of the table with the delivery window.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _create(name: str, with_fingerprint: bool) -> None:
    columns = [sa.Column("delivery_id", sa.Text, nullable=False)]
    key = ["delivery_id"]
    if with_fingerprint:
        columns.append(sa.Column("fingerprint", sa.LargeBinary, nullable=False))
        key.append("fingerprint")
    op.create_table(
        name,
        *columns,
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("received", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint(*key),
        sqlite_with_rowid=False,
    )


def upgrade() -> None:
    _create("deliveries_new", with_fingerprint=True)
    op.execute(
        "INSERT INTO deliveries_new (delivery_id, fingerprint, seq, received) "
        "SELECT delivery_id, X'', seq, received FROM deliveries"
    )
    op.drop_table("deliveries")
    op.rename_table("deliveries_new", "deliveries")


def downgrade() -> None:
    _create("deliveries_old", with_fingerprint=False)
    op.execute(  # first occurrence of an id wins, as it did before this revision
        "INSERT INTO deliveries_old (delivery_id, seq, received) "
        "SELECT delivery_id, min(seq), min(received) FROM deliveries GROUP BY delivery_id"
    )
    op.drop_table("deliveries")
    op.rename_table("deliveries_old", "deliveries")
