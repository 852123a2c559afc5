"""Alembic environment: migrates the connection handed over by `trackalert.migrations.upgrade`.

Running from the ``alembic`` command line is supported for development: the database URL then
comes from ``-x url=...`` or the ``sqlalchemy.url`` option.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from trackalert.eventlog.schema import metadata

config = context.config


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise RuntimeError("no database: pass -x url=sqlite:///path.db")
    return url


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=metadata, literal_binds=True,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    engine = create_engine(_url(), poolclass=NullPool)
    with engine.begin() as owned:
        _migrate(owned)
    engine.dispose()


def _migrate(connection) -> None:
    # render_as_batch: SQLite's ALTER TABLE is limited; batch mode rebuilds tables when needed.
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
