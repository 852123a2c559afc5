"""Delivery-id index for idempotent appends, kept apart from events.

A separate small WITHOUT ROWID table (pruned to the retry window) instead of an index on
events.delivery_id: an index on the big table would be a second random-key write on every append
for as long as events are kept. Existing delivery ids are copied over so that retries of
deliveries stored before the upgrade are still recognised; retention trims the copy to the window.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deliveries",
        sa.Column("delivery_id", sa.Text, primary_key=True),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("received", sa.Float, nullable=False),
        sqlite_with_rowid=False,
    )
    # First occurrence wins, as it did for the appends that stored them.
    op.execute(
        "INSERT INTO deliveries (delivery_id, seq, received) "
        "SELECT delivery_id, min(seq), min(received) FROM events "
        "WHERE delivery_id IS NOT NULL GROUP BY delivery_id"
    )


def downgrade() -> None:
    op.drop_table("deliveries")
