"""Initial schema: the events table and consumer cursors.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # seq is the rowid and the only index: every extra index costs ingest (see eventlog/schema.py).
    op.create_table(
        "events",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("received", sa.Float, nullable=False),
        sa.Column("t", sa.Float, nullable=False),
        sa.Column("login", sa.Text, nullable=False),
        sa.Column("remote", sa.Text, nullable=False),
        sa.Column("pwhash", sa.Text, nullable=False),
        sa.Column("success", sa.Boolean, nullable=False),
        sa.Column("policy_reject", sa.Boolean, nullable=False),
        sa.Column("protocol", sa.Text, nullable=False),
        sa.Column("tls", sa.Boolean, nullable=False),
        sa.Column("device_id", sa.Text, nullable=False),
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column("fail_type", sa.Text, nullable=False),
        sa.Column("attrs", sa.Text, nullable=True),
        sa.Column("attrs_mv", sa.Text, nullable=True),
        sa.Column("device_attrs", sa.Text, nullable=True),
        sa.Column("extra", sa.Text, nullable=True),
        sa.Column("delivery_id", sa.Text, nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "cursors",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("seq", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("cursors")
    op.drop_table("events")
