"""Enrichment columns: what ingest adds from GeoIP, frozen with each event.

Real columns rather than JSON so that helpers can filter on country/asn with plain SQL (a
json_extract in a WHERE clause defeats every index). ALTER TABLE ADD COLUMN with no default is a
schema-only change in SQLite: it does not rewrite existing rows, which read back as NULL
(unknown), exactly what an event stored before enrichment existed is.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_COLUMNS = (
    ("country", sa.Text),
    ("city", sa.Text),
    ("latitude", sa.Float),
    ("longitude", sa.Float),
    ("asn", sa.Integer),
    ("isp", sa.Text),
)


def upgrade() -> None:
    for name, kind in _COLUMNS:
        op.add_column("events", sa.Column(name, kind, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("events") as batch:
        for name, _kind in reversed(_COLUMNS):
            batch.drop_column(name)
