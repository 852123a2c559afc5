"""The daemon's promises across its lifetime: nothing acknowledged is lost, every stored report runs
through `report` at least once (even across kill -9), and a slow policy never slows ingestion."""

from __future__ import annotations

import asyncio
import json
import random
import resource
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from trackalert.testing import DaemonProcess, basic_auth, listener_config, wait_for

AUTH = basic_auth()

RECORDING_POLICY = listener_config() + """
setNumLuaStates(3)
function report(lt)
  local f = io.open("ran.txt", "a")
  f:write(lt.login .. "\\n")
  f:close()
end
setReport(report)
"""


def stored_logins(directory: Path) -> list[str]:
    with sqlite3.connect(directory / "trackalert-events.db") as db:
        return [row[0] for row in db.execute("SELECT login FROM events ORDER BY seq")]


def ran_logins(directory: Path) -> list[str]:
    path = directory / "ran.txt"
    return path.read_text().split() if path.exists() else []


async def hammer(process: DaemonProcess, prefix: str, total: int, concurrency: int, acked: list[str],
                 kill_after: int | None = None) -> None:
    """Send `total` reports over `concurrency` connections; record the acknowledged logins."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            body = json.dumps({"login": f"{prefix}{i}", "remote": "192.0.2.1", "success": True})
            try:
                async with session.post(process.url("/command/report"), data=body, headers=AUTH) as resp:
                    if resp.status == 200:
                        acked.append(f"{prefix}{i}")
            except aiohttp.ClientError:
                return  # the daemon was killed
            if kill_after is not None and len(acked) >= kill_after:
                process.kill()
                return

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))


def in_mode(config: str, policy_process: bool) -> str:
    """`config` with the policy in the core (False) or in its own process (True)."""
    return config + f"setPolicyProcess({str(policy_process).lower()})\n"


@pytest.mark.parametrize("web_processes,policy_process", [(0, False), (2, False), (2, True)])
async def test_kill_9_under_load_loses_nothing_acknowledged(
    tmp_path: Path, web_processes: int, policy_process: bool,
) -> None:
    config = in_mode(RECORDING_POLICY + f"setNumWebProcesses({web_processes})\n", policy_process)
    process = DaemonProcess(tmp_path, config).start()
    acked: list[str] = []
    await hammer(process, "crash", total=20_000, concurrency=64, acked=acked, kill_after=2_000)
    assert process.process.returncode == -9
    assert len(acked) >= 2_000
    stored = set(stored_logins(tmp_path))
    assert set(acked) <= stored, "every report that got a 200 is in the log"

    with DaemonProcess(tmp_path, config):
        assert await wait_for(lambda: set(ran_logins(tmp_path)) >= stored, timeout=60)
    ran = ran_logins(tmp_path)
    assert set(ran) == stored, "report ran for each stored event, and only for them"


@pytest.mark.parametrize("policy_process", [False, True])
async def test_a_graceful_stop_saves_the_cursor(tmp_path: Path, policy_process: bool) -> None:
    config = in_mode(RECORDING_POLICY, policy_process)
    with DaemonProcess(tmp_path, config) as process:
        acked: list[str] = []
        await hammer(process, "graceful", total=500, concurrency=16, acked=acked)
        assert await wait_for(lambda: len(ran_logins(tmp_path)) == 500)
        assert process.stop() == 0
    with DaemonProcess(tmp_path, config) as process:
        acked2: list[str] = []
        await hammer(process, "second", total=10, concurrency=2, acked=acked2)
        assert await wait_for(lambda: len(ran_logins(tmp_path)) == 510)
    ran = ran_logins(tmp_path)
    assert len(ran) == len(set(ran)) == 510, "nothing ran twice after a clean restart"


SLOW_POLICY = listener_config() + """
setNumLuaStates(1)
function report(lt)
  local t = os.clock()
  while os.clock() - t < 0.05 do end
  local f = io.open("ran.txt", "a"); f:write(lt.login .. "\\n"); f:close()
end
setReport(report)
"""


async def lag(process: DaemonProcess) -> float:
    async with aiohttp.ClientSession() as session:
        async with session.get(process.url("/metrics"), headers=AUTH) as resp:
            for line in (await resp.text()).splitlines():
                if line.startswith("trackalert_policy_lag_events "):
                    return float(line.split()[1])
    raise AssertionError("no trackalert_policy_lag_events in /metrics")


@pytest.mark.parametrize("policy_process", [False, True])
async def test_a_slow_policy_lags_behind_without_slowing_ingestion(
    tmp_path: Path, policy_process: bool,
) -> None:
    with DaemonProcess(tmp_path, in_mode(SLOW_POLICY, policy_process)) as process:
        acked: list[str] = []
        await hammer(process, "slow", total=40, concurrency=8, acked=acked)
        assert len(acked) == 40  # all acknowledged though the policy needs ~2 s for them
        assert await lag(process) > 0
        assert await wait_for(lambda: len(ran_logins(tmp_path)) == 40, timeout=30)
        assert await lag(process) == 0


RUNAWAY_POLICY = listener_config() + """
setNumLuaStates(3)
setSlowLuaCallSeconds(0.5)
function report(lt)
  if lt.login == "runaway" then while true do end end
  local f = io.open("ran.txt", "a"); f:write(lt.login .. "\\n"); f:close()
end
setReport(report)
"""


@pytest.mark.parametrize("policy_process", [False, True])
async def test_a_runaway_policy_is_visible_and_the_others_carry_on(
    tmp_path: Path, policy_process: bool,
) -> None:
    with DaemonProcess(tmp_path, in_mode(RUNAWAY_POLICY, policy_process)) as process:
        acked: list[str] = []
        await hammer(process, "runaway", total=1, concurrency=1, acked=acked)  # login "runaway0"
        async with aiohttp.ClientSession() as session:
            body = json.dumps({"login": "runaway"})
            async with session.post(process.url("/command/report"), data=body, headers=AUTH) as resp:
                assert resp.status == 200
        assert await wait_for(lambda: "has been running for" in process.output(), timeout=20)
        assert "Lua report function" in process.output()
        await hammer(process, "after", total=20, concurrency=4, acked=acked)
        assert await wait_for(lambda: sum(1 for l in ran_logins(tmp_path) if l.startswith("after")) == 20)
        async with aiohttp.ClientSession() as session:
            async with session.get(process.url("/metrics"), headers=AUTH) as resp:
                text = await resp.text()
        assert "trackalert_lua_busy_states 1.0" in text
        assert 'trackalert_lua_slow_calls_total{kind="report"} 1.0' in text
        assert process.stop() == 0  # and it still stops, without waiting for the stuck state


async def test_shutdown_from_lua_stops_gracefully(tmp_path: Path) -> None:
    config = listener_config() + 'setCustomEndpoint("stop", function(args) shutdown() return true, {} end)\n'
    process = DaemonProcess(tmp_path, config).start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(process.url("/command/stop"), data="{}", headers=AUTH) as resp:
                assert resp.status == 200
        assert process.process.wait(30) == 0
        assert "Shutting down" in process.output()
    finally:
        process.kill()


def _corrupt(path: Path, first_page: int, pages: int) -> None:
    """Overwrite whole pages in the middle of a stopped daemon's log with junk."""
    size = sqlite3.connect(path).execute("PRAGMA page_size").fetchone()[0]
    junk = random.Random(5).randbytes(size * pages)
    with open(path, "r+b") as f:
        f.seek(size * first_page)
        f.write(junk)


async def test_a_corrupted_log_is_refused_at_start(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path, RECORDING_POLICY) as process:
        acked: list[str] = []
        await hammer(process, "before", total=2_000, concurrency=16, acked=acked)
        assert process.stop() == 0
    path = tmp_path / "trackalert-events.db"
    assert not Path(str(path) + "-wal").exists() or Path(str(path) + "-wal").stat().st_size == 0
    _corrupt(path, first_page=10, pages=4)
    process = DaemonProcess(tmp_path, RECORDING_POLICY)
    with pytest.raises(RuntimeError, match="exited with 1 before it was ready"):
        process.start()
    output = process.output()
    assert f"event log {path} is corrupt" in output
    assert ".recover" in output and "backup" in output
    assert "Traceback" not in output


async def readyz(session: aiohttp.ClientSession, process: DaemonProcess) -> tuple[int, bytes]:
    async with session.get(process.url("/command/readyz")) as resp:
        return resp.status, await resp.read()


@pytest.mark.parametrize("web_processes", [0, 2])
async def test_readyz_follows_a_log_that_cannot_be_written(tmp_path: Path, web_processes: int) -> None:
    """A real write failure: the core process may not grow its files past their current size
    (RLIMIT_FSIZE, as on a full disk). Appends fail, readyz says 503 with the reason; once the
    limit is lifted, the daemon's own probe makes it ready again without any report."""
    config = listener_config() + f"setNumWebProcesses({web_processes})\n"
    with DaemonProcess(tmp_path, config) as process:
        pid = process.process.pid
        async with aiohttp.ClientSession() as session:
            assert (await readyz(session, process))[0] == 200
            files = [tmp_path / "trackalert-events.db", tmp_path / "trackalert-events.db-wal"]
            largest = max(f.stat().st_size for f in files if f.exists())
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (largest, resource.RLIM_INFINITY))
            try:
                statuses = []
                for i in range(2_000):  # until the files must grow
                    body = json.dumps({"login": f"full{i}", "attrs": {"pad": "p" * 2000}})
                    async with session.post(process.url("/command/report"), data=body,
                                            headers=AUTH) as resp:
                        statuses.append(resp.status)
                    if resp.status != 200:
                        break
                assert statuses[-1] == 500
                status, body = await readyz(session, process)
                assert status == 503
                answer = json.loads(body)
                assert answer["status"] == "failure"
                assert answer["reason"].startswith("the event log cannot be written")
                assert isinstance(answer["since"], float)
                assert (await readyz(session, process))[0] == 503  # it stays not ready
            finally:
                resource.prlimit(pid, resource.RLIMIT_FSIZE,
                                 (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

            async def ready() -> bool:
                return (await readyz(session, process))[0] == 200

            for _ in range(200):  # the probe runs every second; bounded wait for it
                if await ready():
                    break
                await asyncio.sleep(0.05)
            assert await ready()
            async with session.post(process.url("/command/report"), data='{"login": "after"}',
                                    headers=AUTH) as resp:
                assert resp.status == 200
