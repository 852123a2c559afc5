"""The quick start of the README: `make run` serves conf/trackalert.conf, and the console client
answers with that same config (`trackalert -C conf/trackalert.conf -e ...`).

The sample is copied with its files into a temporary directory, as on a fresh clone. Its two
fixed ports are the one thing changed, to free ones: a busy 8085 or 4004 on a shared machine
would fail the test for a reason that is not the config's.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp

from trackalert.testing import DaemonProcess, basic_auth

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_LISTENER = "127.0.0.1:8085"
SAMPLE_CONSOLE = "127.0.0.1:4004"


def make_run() -> tuple[str, list[str]]:
    """The config and the options `make run` starts the daemon with."""
    recipe = re.search(r"^run:.*\n\t\$\(VENV\)/bin/trackalert -C (\S+)(.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert recipe, "the Makefile has no `run` target starting trackalert with -C"
    return recipe.group(1), recipe.group(2).split()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fresh_copy(tmp_path: Path, config: str) -> tuple[Path, str]:
    """The sample's directory copied, and its config text with free ports."""
    source = ROOT / config
    directory = tmp_path / source.parent.name
    shutil.copytree(source.parent, directory, ignore=shutil.ignore_patterns("*.db", "*.db-*", ".history"))
    text = source.read_text()
    for fixed in (SAMPLE_LISTENER, SAMPLE_CONSOLE):
        assert text.count(f'"{fixed}"') == 1, f"the sample no longer uses {fixed} once"
        text = text.replace(f'"{fixed}"', f'"127.0.0.1:{free_port()}"')
    return directory / source.name, text


def console(config: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trackalert", "-C", str(config), "-e", command],
        cwd=config.parent.parent, capture_output=True, text=True, timeout=60,
    )


async def post_report(url: str, body: dict) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=json.dumps(body), headers=basic_auth("changeme")) as response:
            return response.status


def test_the_sample_has_a_loopback_console_with_a_key_marked_to_replace() -> None:
    text = (ROOT / make_run()[0]).read_text()
    assert f'controlSocket("{SAMPLE_CONSOLE}")' in text
    assert re.search(r'^setKey\("[A-Za-z0-9+/]{43}="\)$', text, re.M)
    assert "SAMPLE KEY" in text and "trackalert -e 'makeKey()'" in text


def test_make_run_config_starts_and_its_console_answers(tmp_path: Path) -> None:
    config, args = make_run()
    path, text = fresh_copy(tmp_path, config)
    with DaemonProcess(path.parent, text, args=args, config_name=path.name) as daemon:
        shown = console(path, "showEventLog()")
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.startswith("Backend:      sqlite\n")
        assert f"Location:     {path.parent / 'trackalert-events.db'}\n" in shown.stdout
        body = {"login": "alice", "remote": "192.0.2.1", "success": False}
        assert asyncio.run(post_report(daemon.url("/command/report"), body)) == 200
        counted = console(path, 'countReports{login="alice", success=false}')
        assert (counted.returncode, counted.stdout) == (0, "1\n")
