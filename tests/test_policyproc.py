"""The policy runner in its own process (setPolicyProcess): every stored report still runs at
least once across a kill -9 of the policy process or of the whole daemon (a real webhook
receiver on loopback counts the alerts), the alerts and outbox rows carry the causing event's
seq, and the core's /metrics counts what the policy process did."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from test_daemon import hammer, lag, stored_logins
from trackalert.testing import (
    DaemonProcess, WebhookReceiver, basic_auth, listener_config, policy_process_pid, wait_for,
)

AUTH = basic_auth()


def config(port: int) -> str:
    return listener_config() + f"""
setNumLuaStates(2)
setPolicyProcess(true)
addCustomWebHook("hook", {{url="http://127.0.0.1:{port}/hook"}})
addCustomStat("judged")
function report(lt)
  incCustomStat("judged")
  if lt.login == "boom" then error("policy fault") end
  runCustomWebHook("hook", lt.login)
end
setReport(report)
"""


def delivered_seqs(directory: Path) -> dict[str, int]:
    """login -> seq of each recorded alert."""
    with sqlite3.connect(directory / "trackalert-events.db") as db:
        return {body.decode(): seq for body, seq in db.execute("SELECT body, seq FROM alerts")}


async def test_a_kill_9_of_the_policy_process_reruns_and_never_skips(tmp_path: Path) -> None:
    receiver = await WebhookReceiver().start()
    try:
        with DaemonProcess(tmp_path, config(receiver.port)) as process:
            first = policy_process_pid(process.process.pid)
            assert first is not None
            acked: list[str] = []
            load = asyncio.create_task(hammer(process, "k", total=3_000, concurrency=16, acked=acked))
            assert await wait_for(lambda: len(receiver.bodies) >= 300, timeout=60)
            os.kill(first, signal.SIGKILL)
            await load
            assert await wait_for(
                lambda: (policy_process_pid(process.process.pid) or first) != first, timeout=30)
            stored = set(stored_logins(tmp_path))
            assert set(acked) <= stored
            assert await wait_for(lambda: set(receiver.texts()) >= stored, timeout=60)
            assert process.process.poll() is None, "the core survived its policy process"
        assert "The policy process (pid %d) exited" % first in process.output()
        assert set(receiver.texts()) == stored, "alerts only for stored reports"
    finally:
        await receiver.stop()


async def test_a_kill_9_of_the_daemon_reruns_from_the_saved_cursor(tmp_path: Path) -> None:
    receiver = await WebhookReceiver().start()
    try:
        process = DaemonProcess(tmp_path, config(receiver.port)).start()
        child = policy_process_pid(process.process.pid)
        assert child is not None
        acked: list[str] = []
        await hammer(process, "d", total=20_000, concurrency=32, acked=acked, kill_after=2_000)
        assert process.process.returncode == -9
        # the orphaned policy process stops too (its batch's alerts can no longer be stored)
        assert await wait_for(lambda: not Path(f"/proc/{child}").exists()
                              or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2], timeout=20)
        stored = set(stored_logins(tmp_path))
        assert set(acked) <= stored
        with DaemonProcess(tmp_path, config(receiver.port)):
            assert await wait_for(lambda: set(receiver.texts()) >= stored, timeout=90)
        assert set(receiver.texts()) == stored
    finally:
        await receiver.stop()


async def test_alerts_and_outbox_rows_carry_the_seq_and_metrics_count(tmp_path: Path) -> None:
    receiver = await WebhookReceiver().start()
    try:
        with DaemonProcess(tmp_path, config(receiver.port)) as process:
            acked: list[str] = []
            await hammer(process, "m", total=50, concurrency=4, acked=acked)
            async with aiohttp.ClientSession() as session:
                await session.post(process.url("/command/report"), headers=AUTH, data=json.dumps(
                    {"login": "boom", "remote": "192.0.2.1", "success": True}))
            assert await wait_for(lambda: len(receiver.bodies) >= 50, timeout=30)

            async def metric(name: str) -> float:
                async with aiohttp.ClientSession() as session:
                    async with session.get(process.url("/metrics"), headers=AUTH) as resp:
                        for line in (await resp.text()).splitlines():
                            if line.startswith(name + " "):
                                return float(line.split()[1])
                return -1.0

            calls = 'trackalert_lua_calls_total{kind="report"}'
            assert await wait_for_async(lambda: metric(calls), 51)
            assert await wait_for_async(
                lambda: metric('trackalert_custom_stats_total{metric="judged"}'), 51)
            assert await wait_for_async(
                lambda: metric('trackalert_lua_errors_total{function="report"}'), 1)
            assert await wait_for_async(lambda: metric("trackalert_policy_lag_events"), 0)
        assert "policy fault (event seq 51" in process.output(), "the error names its report"
        seqs = delivered_seqs(tmp_path)
        with sqlite3.connect(tmp_path / "trackalert-events.db") as db:
            by_login = dict(db.execute("SELECT login, seq FROM events"))
        assert seqs == {login: by_login[login] for login in acked}
        with sqlite3.connect(tmp_path / "trackalert-outbox.db") as db:
            columns = [row[1] for row in db.execute("PRAGMA table_info(deliveries)")]
        assert "seq" in columns
    finally:
        await receiver.stop()


async def wait_for_async(read, expected: float, timeout: float = 15.0) -> bool:
    """Until the awaited figure equals `expected` (bounded: `timeout` in steps of 0.1 s)."""
    for _ in range(int(timeout / 0.1)):
        if await read() == expected:
            return True
        await asyncio.sleep(0.1)
    return False


ONCE_PER_LOGIN = """
setNumLuaStates(2)
setPolicyProcess(true)
addCustomWebHook("hook", {{url="http://127.0.0.1:{port}/hook"}})
function report(lt)
  if countAlerts({{login=lt.login}}) == 0 then
    local sent = runCustomWebHook("hook", '{{"login":"' .. lt.login .. '"}}')
    infoLog("sent", {{login=lt.login, ok=tostring(sent)}})
  end
end
setReport(report)
"""


async def test_the_next_report_sees_the_alert_the_policy_process_sent(tmp_path: Path) -> None:
    """countAlerts in report N+1 sees report N's alert (the call waited for the core to record
    it), in the same batch too: one alert per login however many reports."""
    receiver = await WebhookReceiver().start()
    try:
        config = listener_config() + ONCE_PER_LOGIN.format(port=receiver.port)
        with DaemonProcess(tmp_path, config) as process:
            async with aiohttp.ClientSession() as session:
                for i in range(30):
                    body = json.dumps({"login": f"u{i % 3}", "remote": "192.0.2.1", "success": True})
                    async with session.post(process.url("/command/report"), data=body,
                                            headers=AUTH) as resp:
                        assert resp.status == 200
            assert await wait_for(lambda: len(receiver.bodies) >= 3, timeout=30)
            assert await wait_for_async(lambda: lag(process), 0)
        assert sorted(receiver.texts()) == ['{"login":"u0"}', '{"login":"u1"}', '{"login":"u2"}']
        assert process.output().count("ok=\"true\"") == 3, "runCustomWebHook returned true"
    finally:
        await receiver.stop()



@pytest.mark.parametrize("setting, own_process", [
    ("", True),  # not set: its own process on a SQLite log
    ("setPolicyProcess(true)\n", True),
    ("setPolicyProcess(false)\n", False),
])
async def test_on_sqlite_the_policy_runs_in_its_own_process_unless_told_not_to(
    tmp_path: Path, setting: str, own_process: bool,
) -> None:
    config = RECORDING + setting
    with DaemonProcess(tmp_path, config) as process:
        acked: list[str] = []
        await hammer(process, "where", total=200, concurrency=8, acked=acked)
        assert await wait_for(lambda: sorted(ran(tmp_path)) == sorted(acked))
        assert (policy_process_pid(process.process.pid) is not None) == own_process
        assert ("The policy runs in its own process" in process.output()) == own_process
        assert process.stop() == 0


RECORDING = listener_config() + """
function report(lt)
  local f = io.open("ran.txt", "a") f:write(lt.login .. "\\n") f:close()
  if lt.login == "stop" then shutdown() end
end
setReport(report)
"""


def ran(directory: Path) -> list[str]:
    path = directory / "ran.txt"
    return path.read_text().split() if path.exists() else []


async def test_shutdown_in_report_stops_the_whole_daemon_gracefully(tmp_path: Path) -> None:
    process = DaemonProcess(tmp_path, RECORDING).start()
    try:
        acked: list[str] = []
        await hammer(process, "before", total=50, concurrency=4, acked=acked)
        assert await wait_for(lambda: len(ran(tmp_path)) == 50)
        async with aiohttp.ClientSession() as session:
            body = json.dumps({"login": "stop"})
            async with session.post(process.url("/command/report"), data=body, headers=AUTH) as resp:
                assert resp.status == 200
        assert process.process.wait(timeout=30) == 0  # the core stopped, not just the child
        assert "The policy process asked for a shutdown" in process.output()
    finally:
        process.stop()
    with sqlite3.connect(tmp_path / "trackalert-events.db") as db:
        [(cursor,)] = db.execute("SELECT seq FROM cursors WHERE name = 'report'")
    assert cursor == 51, "the graceful stop saved the cursor past the report that asked for it"
