"""Web worker processes (setNumWebProcesses): the same REST API, served from several processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from trackalert.frontend.accept import share_of
from trackalert.testing import DaemonProcess, basic_auth, listener_config, wait_for, web_worker_pids

AUTH = basic_auth()

CONFIG = listener_config() + """
setNumWebProcesses(2)
setNumLuaStates(2)
addACL("!127.0.0.2/32")
function report(lt)
  local f = io.open("ran.txt", "a"); f:write(lt.login .. "\\n"); f:close()
end
setReport(report)
setCustomEndpoint("custom", function(args) return true, {login = args.attrs.login or "unknown"} end)
"""


def stored(directory: Path, login: str) -> int:
    with sqlite3.connect(directory / "trackalert-events.db") as db:
        return db.execute("SELECT count(*) FROM events WHERE login = ?", (login,)).fetchone()[0]


def ran(directory: Path) -> list[str]:
    path = directory / "ran.txt"
    return path.read_text().split() if path.exists() else []


async def call(process: DaemonProcess, method: str, path: str, body: str | None = None,
               headers: dict[str, str] | None = None, local_addr: str | None = None):
    connector = aiohttp.TCPConnector(local_addr=(local_addr, 0) if local_addr else None, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.request(method, process.url(path), data=body, headers=headers) as resp:
            return resp.status, dict(resp.headers), await resp.read()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    with DaemonProcess(tmp_path_factory.mktemp("front"), CONFIG) as process:
        yield process


def test_two_workers_are_running(daemon: DaemonProcess) -> None:
    assert len(web_worker_pids(daemon.process.pid)) == 2
    assert "Started 2 web worker processes" in daemon.output()


@pytest.mark.parametrize("path", ["/command/report", "/?command=report"])
async def test_reports_are_stored_by_the_core_and_run(daemon: DaemonProcess, path: str) -> None:
    logins = [f"front{i}-{'legacy' if '?' in path else 'path'}" for i in range(20)]
    for login in logins:  # new connections each time: both workers get some
        status, headers, body = await call(daemon, "POST", path, json.dumps({"login": login}), AUTH)
        assert (status, body) == (200, b'{"status":"ok"}')
        assert stored(daemon.directory, login) == 1, "the 200 comes after the append"
    assert await wait_for(lambda: set(logins) <= set(ran(daemon.directory)))


async def test_duplicate_delivery_across_workers(daemon: DaemonProcess) -> None:
    for _ in range(6):
        status, _, _ = await call(daemon, "POST", "/command/report", json.dumps({"login": "dup"}),
                                  {**AUTH, "X-Wforce-Delivery": "same-delivery"})
        assert status == 200
    assert stored(daemon.directory, "dup") == 1


async def test_bad_input_auth_and_acl_are_handled_in_the_worker(daemon: DaemonProcess) -> None:
    status, _, body = await call(daemon, "POST", "/command/report", '{"success": "no"}', AUTH)
    assert status == 400 and "field 'success'" in json.loads(body)["reason"]
    status, headers, _ = await call(daemon, "POST", "/command/report", "{}", basic_auth("wrong"))
    assert status == 401 and headers["WWW-Authenticate"] == 'basic realm="wforce"'
    status, _, body = await call(daemon, "POST", "/command/report", "{}", AUTH, local_addr="127.0.0.2")
    assert status == 401 and json.loads(body)["ip"] == "127.0.0.2"
    assert "Web Authentication failed" in daemon.output()


async def test_other_requests_are_proxied_to_the_core(daemon: DaemonProcess) -> None:
    status, _, body = await call(daemon, "POST", "/command/custom", '{"attrs": {"login": "c1"}}', AUTH)
    assert (status, json.loads(body)) == (200, {"r_attrs": {"login": "c1"}, "success": True})
    status, _, body = await call(daemon, "GET", "/command/stats", headers=AUTH)
    assert status == 200 and "perfstats" in json.loads(body)
    status, headers, _ = await call(daemon, "GET", "/command/stats")
    assert status == 401 and headers["WWW-Authenticate"] == 'basic realm="wforce"'
    assert (await call(daemon, "GET", "/command/livez"))[0] == 200
    assert (await call(daemon, "GET", "/nothing", headers=AUTH))[0] == 404
    status, _, body = await call(daemon, "GET", "/command/readyz", local_addr="127.0.0.2")
    assert status == 401, "the ACL applies to proxied requests too"


async def test_statistics_count_the_workers_requests(daemon: DaemonProcess) -> None:
    async def stats() -> dict:
        return json.loads((await call(daemon, "GET", "/command/stats", headers=AUTH))[2])

    before = await stats()
    for i in range(5):
        await call(daemon, "POST", "/command/report", json.dumps({"login": f"counted{i}"}), AUTH)
    after = await stats()
    assert after["reports"] == before["reports"] + 5  # counted by the core at append time

    async def metric(name: str) -> float:
        text = (await call(daemon, "GET", "/metrics", headers=AUTH))[2].decode()
        return sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(name))

    reports_before = await metric('trackalert_commands_total{cmd="report"}')
    for i in range(3):
        await call(daemon, "POST", "/command/report", json.dumps({"login": f"metric{i}"}), AUTH)
    for _ in range(100):  # workers flush their statistics every half second
        if await metric('trackalert_commands_total{cmd="report"}') >= reports_before + 3:
            break
        await asyncio.sleep(0.1)
    assert await metric('trackalert_commands_total{cmd="report"}') >= reports_before + 3


async def test_a_killed_worker_is_replaced(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path, CONFIG) as process:
        victim = web_worker_pids(process.process.pid)[0]
        os.kill(victim, signal.SIGKILL)
        assert await wait_for(lambda: "starting a new one" in process.output(), timeout=20)
        assert await wait_for(
            lambda: len(web_worker_pids(process.process.pid)) == 2 and victim not in web_worker_pids(process.process.pid)
        )
        for i in range(10):
            status, _, _ = await call(process, "POST", "/command/report", json.dumps({"login": f"after{i}"}), AUTH)
            assert status == 200


async def test_workers_leave_with_the_core(tmp_path: Path) -> None:
    process = DaemonProcess(tmp_path, CONFIG).start()
    workers = web_worker_pids(process.process.pid)
    process.kill()  # kill -9 the core: the workers see their channel close and exit
    assert await wait_for(lambda: not any(Path(f"/proc/{pid}").exists() and
                                          "zombie" not in Path(f"/proc/{pid}/status").read_text()
                                          for pid in workers), timeout=20)


@pytest.mark.parametrize(("limit", "workers"), [(100, 2), (7, 3), (2, 3), (1, 1)])
def test_the_shares_of_the_connection_limit_add_up_to_it(limit: int, workers: int) -> None:
    shares = [share_of(limit, workers, index) for index in range(workers)]
    assert sum(shares) == limit and max(shares) - min(shares) <= 1


async def held_connection(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """A connection that got an answer and is busy (None: the daemon closed it unanswered)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /command/livez HTTP/1.1\r\nHost: x\r\n\r\n")
        line = await asyncio.wait_for(reader.readline(), 10)
    except ConnectionError:
        return None
    if line.startswith(b"HTTP/1.1 200"):
        writer.write(b"GET /command/livez HTTP/1.1\r\n")  # busy: no later connection may evict it
        return reader, writer
    writer.close()
    return None


async def test_the_connection_limit_is_shared_by_the_workers(tmp_path: Path) -> None:
    """A burst of connections lands unevenly on the workers; none is refused under the limit,
    and past it exactly the limit stays open (a new one may close one that was idle for a
    moment, between its answer and its next request), the rest refused at once."""
    limit = 100
    config = listener_config() + f"setNumWebProcesses(2)\nsetMaxWebserverConns({limit})\n"
    with DaemonProcess(tmp_path, config) as process:
        for burst in (limit - 1, limit - 1, limit + 30):
            held = await asyncio.gather(*(held_connection(process.port) for _ in range(burst)))
            served = [pair for pair in held if pair is not None]
            assert len(served) >= min(burst, limit), f"{burst - len(served)} of {burst} refused"
            alive = [await still_open(reader, writer) for reader, writer in served]
            assert sum(alive) == min(burst, limit)
            for _, writer in served:
                writer.close()
            for _, writer in served:
                with contextlib.suppress(ConnectionError):  # those closed by the daemon
                    await writer.wait_closed()
            assert await released(process)


async def still_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Finish the request started by `held_connection`: answered unless it was closed."""
    try:
        writer.write(b"Host: x\r\n\r\n")
        while True:
            line = await asyncio.wait_for(reader.readline(), 10)
            if not line or line.startswith(b"HTTP/1.1 "):
                return line.startswith(b"HTTP/1.1 200")
    except ConnectionError:
        return False


async def active_connections(process: DaemonProcess) -> float:
    """The workers' open connections as /metrics shows them (this scrape's own included)."""
    _, _, body = await call(process, "GET", "/metrics", headers=AUTH)
    for line in body.decode().splitlines():
        if line.startswith("trackalert_active_http_connections "):
            return float(line.split()[-1])
    raise AssertionError("no trackalert_active_http_connections")


async def released(process: DaemonProcess) -> bool:
    for _ in range(100):  # the workers report their counts every half second
        if await active_connections(process) <= 1:
            return True
        await asyncio.sleep(0.1)
    return False


def served_connections(pid: int, port: int) -> int:
    """Established TCP connections to `port` whose socket process `pid` holds (from /proc)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    held = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            held += target.startswith("socket:[") and target[8:-1] in inodes
    return held


async def test_a_burst_of_connections_is_spread_over_the_workers(daemon: DaemonProcess) -> None:
    """wrk opens its 128 connections at once; each worker must get its part of them, or one
    worker's core does all the HTTP work while the other idles."""
    burst = 128
    opened = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", daemon.port) for _ in range(burst)))
    try:
        for reader, writer in opened:  # one request each: accepted and served, kept alive
            writer.write(b"GET /command/livez HTTP/1.1\r\nHost: x\r\n\r\n")
        lines = await asyncio.gather(*(asyncio.wait_for(reader.readline(), 10) for reader, _ in opened))
        assert all(line.startswith(b"HTTP/1.1 200") for line in lines), set(lines)
        counts = [served_connections(pid, daemon.port) for pid in web_worker_pids(daemon.process.pid)]
        assert sum(counts) == burst
        assert max(counts) - min(counts) <= burst // 4, counts
    finally:
        for _, writer in opened:
            writer.close()


async def test_a_burst_is_served_while_one_worker_cannot_accept(daemon: DaemonProcess) -> None:
    """Spreading the connections must never starve them: with one worker stopped (busy, or
    being replaced), the other one serves the whole burst, after a short wait at most."""
    stopped, running = web_worker_pids(daemon.process.pid)
    os.kill(stopped, signal.SIGSTOP)
    try:
        opened = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", daemon.port) for _ in range(32)))
        for reader, writer in opened:
            writer.write(b"GET /command/livez HTTP/1.1\r\nHost: x\r\n\r\n")
        lines = await asyncio.gather(*(asyncio.wait_for(reader.readline(), 10) for reader, _ in opened))
        assert all(line.startswith(b"HTTP/1.1 200") for line in lines), set(lines)
        assert served_connections(running, daemon.port) == len(opened)
        for _, writer in opened:
            writer.close()
    finally:
        os.kill(stopped, signal.SIGCONT)


async def test_concurrent_keepalive_reports_are_each_answered_after_they_are_stored(
    daemon: DaemonProcess,
) -> None:
    """64 keep-alive connections posting at once: the core answers each read's reports as one
    group (one STORED message); every report gets its 200, and only once it is in the log."""
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def post(i: int) -> tuple[int, bytes, int]:
            login = f"load{i % 50}"
            async with session.post(daemon.url("/command/report"), data=json.dumps({"login": login}),
                                    headers={**AUTH, "X-Wforce-Delivery": f"load-{i}"}) as resp:
                return resp.status, await resp.read(), i

        results = await asyncio.gather(*(post(i) for i in range(800)))
    assert [(status, body) for status, body, _ in results] == [(200, b'{"status":"ok"}')] * 800
    with sqlite3.connect(daemon.directory / "trackalert-events.db") as db:
        delivered = {row[0] for row in db.execute(
            "SELECT delivery_id FROM events WHERE delivery_id LIKE 'load-%'")}
    assert delivered == {f"load-{i}" for i in range(800)}
