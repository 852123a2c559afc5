"""A live alert leads back to its report: outbox rows and Lua error lines carry the event's seq.

A real daemon subprocess runs a policy whose alerts cannot be delivered (the receiver's port is
closed), so every delivery stays in the real outbox file; the test then reads that file, the
daemon's event log and its log output, and drives the real console protocol for the listing.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sqlite3
from pathlib import Path

import aiohttp

from trackalert.clock import VirtualClock
from trackalert.console.client import ConsoleConnection
from trackalert.console.protocol import encode_key
from trackalert.lua.host import Host
from trackalert.lua.state import LuaState, StateKind
from trackalert.netaddr import parse_combo
from trackalert.outbox import Delivery, Outbox
from trackalert.settings import Settings
from trackalert.testing import DaemonProcess, basic_auth, listener_config, wait_for
from trackalert.webhooks import WebHooks

KEY = bytes(range(3, 35))
#: Reports posted at once: two Lua states judge them, so a seq taken from the wrong state or
#: the wrong moment would pair an alert with another event.
REPORTS = 120
BROKEN = 'boom\nLua function [report] exception: forged'


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def config() -> str:
    return listener_config() + f"""
controlSocket("127.0.0.1:0")
setKey("{encode_key(KEY)}")
setNumLuaStates(2)
addCustomWebHook("alert", {{url="http://127.0.0.1:{closed_port()}/alert"}})
setCustomEndpoint("page", function(args)
  runCustomWebHook("alert", '{{"from":"custom"}}')
  return true, {{}}
end)
setBackground("tick", function() runCustomWebHook("alert", '{{"from":"background"}}') end)
intervalScheduleBackgroundFunc("00:00:01", "tick")
function report(lt)
  if lt.login:sub(1, 4) == "boom" then error("policy broke") end
  runCustomWebHook("alert", '{{"from":"report","login":"' .. lt.login .. '"}}')
end
setReport(report)
"""


async def post_reports(daemon: DaemonProcess, logins: list[str]) -> None:
    async with aiohttp.ClientSession() as session:
        async def post(login: str) -> None:
            body = json.dumps({"login": login, "remote": "192.0.2.7", "success": False})
            async with session.post(daemon.url("/command/report"), data=body,
                                    headers=basic_auth()) as resp:
                assert resp.status == 200

        await asyncio.gather(*(post(login) for login in logins))
        async with session.post(daemon.url("/command/page"), data=json.dumps({"attrs": {}}),
                                headers=basic_auth()) as resp:
            assert resp.status == 200


def outbox_rows(directory: Path) -> list[tuple[int | None, dict]]:
    with sqlite3.connect(directory / "trackalert-outbox.db") as db:
        return [(seq, json.loads(body)) for seq, body in
                db.execute("SELECT seq, body FROM deliveries ORDER BY row")]


def logged_logins(directory: Path) -> dict[int, str]:
    with sqlite3.connect(directory / "trackalert-events.db") as db:
        return dict(db.execute("SELECT seq, login FROM events"))


def console(daemon: DaemonProcess, command: str) -> str:
    port = re.findall(r"Accepting control connections on 127\.0\.0\.1:(\d+)", daemon.output())[0]
    with ConsoleConnection.open(parse_combo(f"127.0.0.1:{port}"), KEY, timeout=60) as connection:
        return connection.command(command)


async def test_outbox_rows_and_error_lines_name_the_event_that_caused_them(tmp_path: Path) -> None:
    logins = [f"user{n}" for n in range(REPORTS)] + [BROKEN]
    with DaemonProcess(tmp_path, config()) as daemon:
        await post_reports(daemon, logins)

        def complete() -> bool:
            sources = [body["from"] for _, body in outbox_rows(tmp_path)]
            return sources.count("report") == REPORTS and "background" in sources and "custom" in sources

        assert await wait_for(complete, timeout=60)
        listing = console(daemon, "showWebHookOutbox(1000)")
    events = logged_logins(tmp_path)
    rows = outbox_rows(tmp_path)

    from_reports = [(seq, body) for seq, body in rows if body["from"] == "report"]
    assert sorted(body["login"] for _, body in from_reports) == sorted(logins[:REPORTS])
    for seq, body in from_reports:
        assert seq is not None and events[seq] == body["login"], "the alert's own event"
    assert all(seq is None for seq, body in rows if body["from"] != "report"), \
        "background and custom alerts judge no single event"

    broken_seq = next(seq for seq, login in events.items() if login == BROKEN)
    error_lines = [line for line in daemon.output().splitlines() if "policy broke" in line]
    assert len(error_lines) == 1, daemon.output()
    assert error_lines[0].endswith(f'(event seq {broken_seq}, login {json.dumps(BROKEN)})')
    assert not any(line.startswith("Lua function [report] exception: forged")
                   for line in daemon.output().splitlines()), "a login cannot forge a log line"

    listed = {}
    for line in listing.splitlines()[1:-1]:
        fields = line.split()
        listed[int(fields[0])] = fields[2]
    with sqlite3.connect(tmp_path / "trackalert-outbox.db") as db:
        stored = {row: "-" if seq is None else str(seq)
                  for row, seq in db.execute("SELECT row, seq FROM deliveries")}
    assert listed and all(stored[row] == seq for row, seq in listed.items())
    assert {seq for seq in listed.values()} >= {"-", str(from_reports[0][0])}
    assert listing.splitlines()[-1] == f"{len(listed)} deliveries waiting"


def test_a_version_1_outbox_keeps_its_deliveries_and_gains_the_seq(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with sqlite3.connect(path) as db:  # the schema trackalert wrote before the seq
        db.executescript("""
            CREATE TABLE deliveries (
                row INTEGER PRIMARY KEY AUTOINCREMENT, delivery_id TEXT NOT NULL UNIQUE,
                hook_id INTEGER NOT NULL, hook_name TEXT NOT NULL, url TEXT NOT NULL,
                body BLOB NOT NULL, headers TEXT NOT NULL, created REAL NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL,
                last_error TEXT NOT NULL DEFAULT '');
            CREATE INDEX deliveries_next_attempt ON deliveries (next_attempt, row);
            INSERT INTO deliveries (delivery_id, hook_id, hook_name, url, body, headers, created,
                                    next_attempt) VALUES ('old', 1, 'alert', 'http://x/', X'62', '{}', 5, 5);
            PRAGMA user_version=1;
        """)
    outbox = Outbox(str(path))
    outbox.open()
    try:
        outbox.enqueue(Delivery("new", 1, "alert", "http://x/", b"c", seq=42), capacity=10)
        assert [(d.delivery_id, d.seq) for d in outbox.pending()] == [("old", None), ("new", 42)]
        assert [d.delivery_id for d in outbox.pending(1)] == ["old"]
    finally:
        outbox.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2


def test_looking_at_the_outbox_of_a_config_without_webhooks_creates_no_file(tmp_path: Path) -> None:
    clock = VirtualClock(1_700_000_000.0)
    host = Host(settings=Settings(config_dir=str(tmp_path)), clock=clock)
    host.webhooks = WebHooks(host.settings, host.metrics, clock)
    state = LuaState(StateKind.CONFIG, host)
    state.execute("showWebHookOutbox()")
    assert host.take_console_output() == "No webhook outbox (no custom webhook is registered)\n"
    assert not (tmp_path / "trackalert-outbox.db").exists()
    state.execute('addCustomWebHook("alert", {url="http://127.0.0.1:9/"})')
    state.execute("showWebHookOutbox(5)")
    lines = host.take_console_output().splitlines()
    assert lines[0].split() == ["Row", "Hook", "Seq", "Attempts", "Next", "attempt", "(UTC)",
                                "Delivery", "id", "Last", "error"]
    assert lines[1:] == ["0 deliveries waiting"]
