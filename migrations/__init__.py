"""Alembic migrations of the SQLite event log, run programmatically.

The scripts live in the project's top-level ``migrations/``, installed as the package
``trackalert.migrations`` (pyproject.toml maps the folder), and are located from this file's path,
so migrating works from an installed wheel and from any working directory; there is no
``alembic.ini``. To write a new revision during development::

    python -c "from alembic import command; from trackalert.migrations import alembic_config; \\
               command.revision(alembic_config(), 'add enrichment columns', rev_id='0003')"

(the ``alembic`` command line also works with ``-x url=sqlite:///some.db`` and a throw-away ini
whose ``script_location`` points here).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Connection

from trackalert.eventlog.base import SchemaVersionError

logger = logging.getLogger("trackalert")

SCRIPT_LOCATION = Path(__file__).resolve().parent


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config pointing at our scripts; `env.py` migrates `connection` when given."""
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The revision a freshly migrated file ends at."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revisions(connection: Connection) -> tuple[str, ...]:
    """The revision(s) stamped in the database (empty for a file never migrated)."""
    return MigrationContext.configure(connection).get_current_heads()


def upgrade(connection: Connection, target: str = "head", *, location: str = "") -> None:
    """Bring the database on `connection` to `target`, refusing files from a newer trackalert.

    Alembic's own message for an unknown revision ("Can't locate revision") does not tell an
    operator what happened, hence the explicit check.
    """
    config = alembic_config(connection)
    scripts = ScriptDirectory.from_config(config)
    current = current_revisions(connection)
    for revision in current:
        try:
            known = scripts.get_revision(revision)
        except CommandError:
            known = None
        if known is None:
            raise SchemaVersionError(
                f"event log {location or '(database)'} has schema revision {revision!r}, which "
                f"this version of trackalert does not know (newest known: "
                f"{scripts.get_current_head()!r}); it was probably written by a newer trackalert. "
                f"Upgrade trackalert or point it at another file."
            )
    head = scripts.get_current_head()
    announced = bool(current) and head not in current and target == "head"  # a new file: instant
    if announced:
        logger.info("event log %s: upgrading its schema from revision %s to %s (an index rebuilt "
                    "on a big log takes a while: about a minute for 10M events)",
                    location or "(database)", ", ".join(current), head)
    started = time.monotonic()
    command.upgrade(config, target)
    if announced:
        logger.info("event log %s: schema upgraded in %.1f s", location or "(database)",
                    time.monotonic() - started)
