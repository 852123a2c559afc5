"""The installed package, not the working tree: a wheel built from this checkout must carry every
subpackage, and its migrations (kept in the top-level migrations/ folder) must bring an old log up
to date from where pip put them."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Run with the installed copy first on the path: makes a file at schema 0001 holding one event,
#: opens it with the event log (which migrates it), and prints where trackalert came from.
MIGRATE_OLD_FILE = r"""
import asyncio, sqlite3, sys
from sqlalchemy import create_engine
import trackalert
from trackalert import migrations
from trackalert.clock import VirtualClock
from trackalert.eventlog.sqlite import SQLiteEventLog

path = sys.argv[1]
engine = create_engine(f"sqlite:///{path}")
with engine.begin() as connection:
    migrations.upgrade(connection, "0001")
engine.dispose()
with sqlite3.connect(path) as db:
    db.execute("INSERT INTO events VALUES (1, 1700000000.0, 1700000000.0, 'alice', '192.0.2.1', "
               "'', 1, 0, 'imap', 1, '', '', '', NULL, NULL, NULL, NULL, 'd-1')")

async def main():
    log = SQLiteEventLog(path, VirtualClock(start=1700000100.0))
    await log.open()
    try:
        [event] = await log.read(0, 10)
        print(trackalert.__file__)
        print(migrations.__file__)
        print(event.report.login, event.delivery_id)
    finally:
        await log.close()
    with sqlite3.connect(path) as db:
        print(db.execute("SELECT version_num FROM alembic_version").fetchone()[0])
    print(migrations.head_revision())

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    [built] = out.glob("trackalert-*.whl")
    return built


def packages_under(folder: Path, name: str) -> set[str]:
    """The package folders below `folder` as the wheel names them (`name` for `folder` itself)."""
    return {"/".join((name, *p.parent.relative_to(folder).parts)) for p in folder.rglob("__init__.py")}


def test_the_wheel_carries_every_package_of_the_tree(wheel: Path) -> None:
    """pyproject.toml lists the packages (the migrations folder is mapped into the package), so a
    new subpackage left out of that list must fail here rather than in an operator's install."""
    on_disk = packages_under(ROOT / "trackalert", "trackalert") | packages_under(
        ROOT / "migrations", "trackalert/migrations") | packages_under(
        ROOT / "tools" / "replay", "trackalert/replay") | packages_under(
        ROOT / "elasticqueries", "trackalert/elasticqueries")
    with zipfile.ZipFile(wheel) as archive:
        in_wheel = {name.rsplit("/", 1)[0] for name in archive.namelist() if name.endswith("/__init__.py")}
        names = set(archive.namelist())
    assert on_disk == in_wheel
    assert "trackalert/migrations/script.py.mako" in names
    assert "trackalert/py.typed" in names


def test_the_installed_wheel_migrates_an_old_log(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-c", MIGRATE_OLD_FILE, str(tmp_path / "old.db")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    package, migrations, event, stamped, head = result.stdout.splitlines()
    assert package == str(site / "trackalert" / "__init__.py")  # not the working tree
    assert migrations == str(site / "trackalert" / "migrations" / "__init__.py")
    assert event == "alice d-1"
    assert stamped == head and int(head) > 1
