"""The control socket's limits: bounded connections, timeouts, and a log a flood cannot flood.

The throttle and the connection table are checked on a virtual clock and real tasks; the rest
drives a real daemon over loopback with the real console protocol: raw sockets that never
authenticate, the C++ client's side of the protocol (`CppClient`), and our client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import selectors
import socket
import time
from pathlib import Path

import aiohttp
import pytest

from trackalert import __version__
from trackalert.clock import VirtualClock
from trackalert.console.client import ConsoleConnection, ConsoleError
from trackalert.console.limits import LOG_BURST, ConnectionTable, LogThrottle, Slot
from trackalert.console.protocol import encode_key
from trackalert.netaddr import parse_combo
from trackalert.testing import DaemonProcess, basic_auth, listener_config, wait_for

from test_console_server import KEY, CppClient, control_ports

MAX_CONNS = 8
CONFIG = listener_config() + f"""
controlSocket("127.0.0.1:0")
setKey("{encode_key(KEY)}")
setNumLuaStates(2)
setMaxConsoleConns({MAX_CONNS})
setConsoleTimeouts({{handshake="2m", unauthenticated="2m"}})
"""


# ---- the throttle and the table, on a virtual clock ---------------------------------------------


def lines(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in record.getMessage() for record in caplog.records)


async def test_a_flood_of_one_message_logs_a_burst_then_one_summary(caplog: pytest.LogCaptureFixture) -> None:
    clock = VirtualClock()
    throttle = LogThrottle(clock, "refusals", logging.WARNING, burst=LOG_BURST, period=10.0)
    with caplog.at_level(logging.INFO, logger="trackalert"):
        for n in range(500):
            throttle.log("refused %d", n)
        assert lines(caplog, "refused ") == LOG_BURST and throttle.suppressed == 500 - LOG_BURST
        await asyncio.sleep(0)  # the summary's task starts waiting for the end of the period
        await clock.advance(9.0)
        assert lines(caplog, "more refusals") == 0
        await clock.advance(1.0)  # the period ends: the rest is summed up, without a new line
        assert lines(caplog, f"{500 - LOG_BURST} more refusals in 10 s were not logged one by one") == 1
        throttle.log("refused again")  # a new period: logged at once
        assert lines(caplog, "refused again") == 1 and throttle.suppressed == 0


async def test_the_table_evicts_the_oldest_unauthenticated_and_refuses_when_all_are_proved() -> None:
    limit = 3
    table = ConnectionTable(lambda: limit)
    tasks = [asyncio.create_task(asyncio.sleep(60)) for _ in range(6)]
    try:
        slots = [Slot(f"peer{n}", task) for n, task in enumerate(tasks)]
        assert [table.admit(s) for s in slots[:3]] == [(True, None)] * 3
        slots[0].authenticated = True
        assert table.admit(slots[3]) == (True, slots[1])  # the oldest one that has not proved the key
        assert len(table) == 3 and slots[1].task not in table.tasks()
        slots[2].authenticated = slots[3].authenticated = True
        assert table.admit(slots[4]) == (False, None)
        table.release(slots[0].task)
        assert table.admit(slots[4]) == (True, None)
        limit = 10  # read on every admission
        assert table.admit(slots[5]) == (True, None) and len(table) == 4
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---- a real daemon ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    with DaemonProcess(tmp_path_factory.mktemp("limits"), CONFIG) as process:
        yield process


def connect(daemon: DaemonProcess) -> ConsoleConnection:
    return ConsoleConnection.open(parse_combo(f"127.0.0.1:{control_ports(daemon)[0]}"), KEY, timeout=30)


def run(daemon: DaemonProcess, command: str) -> str:
    with connect(daemon) as connection:
        return connection.command(command)


def raw_connection(daemon: DaemonProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", control_ports(daemon)[0]), timeout=10)


def wait_closed(sockets: list[socket.socket], count: int, timeout: float = 20.0) -> set[socket.socket]:
    """The sockets the daemon closed, once at least `count` of them are (or at the deadline)."""
    closed: set[socket.socket] = set()
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while len(closed) < count and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.2):
                sock = key.fileobj
                try:
                    data = sock.recv(64)
                except ConnectionError:
                    data = b""
                if not data:  # nothing is ever sent to these before the nonce: EOF
                    closed.add(sock)
                    selector.unregister(sock)
    return closed


def open_fds(daemon: DaemonProcess) -> int:
    assert daemon.process is not None
    return len(os.listdir(f"/proc/{daemon.process.pid}/fd"))


async def rest_answers(daemon: DaemonProcess) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(daemon.url("/command/stats"), headers=basic_auth()) as response:
            assert response.status == 200
        body = json.dumps({"login": "during-the-flood", "remote": "192.0.2.7", "success": True})
        async with session.post(daemon.url("/command/report"), data=body, headers=basic_auth()) as response:
            assert response.status == 200 and await response.json() == {"status": "ok"}


async def test_a_flood_of_idle_connections_holds_only_the_limit_and_operators_still_get_in(daemon) -> None:
    flood_size = 600
    before = open_fds(daemon)
    logged_before = daemon.output().count("which has not authenticated, to admit")
    flood = [raw_connection(daemon) for _ in range(flood_size)]
    try:
        closed = await asyncio.to_thread(wait_closed, flood, flood_size - MAX_CONNS)
        assert len(closed) == flood_size - MAX_CONNS, "all but the newest MAX_CONNS were closed"
        assert open_fds(daemon) <= before + MAX_CONNS + 2
        await rest_answers(daemon)
        # an operator still gets in, with our client and with the C++ client's protocol
        client = CppClient(control_ports(daemon)[0], KEY)
        try:
            assert client.command("return 'in'") == "in"
            assert await asyncio.to_thread(run, daemon, "showVersion()") == f"trackalert {__version__}\n"
        finally:
            client.close()
        still_open = [sock for sock in flood if sock not in closed]
        assert len(await asyncio.to_thread(wait_closed, still_open, 2)) == 2  # they made room
    finally:
        for sock in flood:
            sock.close()
    evictions = daemon.output().count("which has not authenticated, to admit") - logged_before
    # the summary line at the end of the period is checked on a virtual clock above
    assert 1 <= evictions <= 2 * LOG_BURST, "a flood costs a few lines, not one per connection"


async def test_when_every_slot_is_an_authenticated_session_a_newcomer_is_refused(daemon) -> None:
    sessions = [await asyncio.to_thread(connect, daemon) for _ in range(MAX_CONNS)]
    try:
        with pytest.raises(ConsoleError, match="closed the connection"):
            await asyncio.to_thread(connect, daemon)
        assert await wait_for(lambda: f"all {MAX_CONNS} console connections are in use by authenticated sessions"
                              in daemon.output())
        assert all(session.command("return 'still here'") == "still here" for session in sessions)
        await rest_answers(daemon)
        sessions.pop().close()
        assert await wait_for(lambda: _gets_in(daemon), timeout=15)
    finally:
        for session in sessions:
            session.close()


def _gets_in(daemon: DaemonProcess) -> bool:
    try:
        return run(daemon, "return 'in'") == "in"
    except ConsoleError:  # the released slot is not free yet
        return False


@pytest.fixture
def short_timeouts(daemon):
    """Timeouts of a fraction of a second, set from the console (they apply to new waits)."""
    assert run(daemon, 'setConsoleTimeouts({handshake=0.3, frame=0.3, unauthenticated=0.6, idle=0})') == ""
    yield
    assert run(daemon, 'setConsoleTimeouts({handshake="2m", frame="10s", unauthenticated="2m", idle="1d"})') == ""


async def closed_for(daemon: DaemonProcess, sock: socket.socket, reason: str) -> bool:
    """Whether the daemon closes `sock` (within 10 s) and logs `reason` for it; closes it."""
    port = sock.getsockname()[1]
    try:
        closed = bool(await asyncio.to_thread(wait_closed, [sock], 1, 10.0))
    finally:
        sock.close()
    line = f"Closing control connection from 127.0.0.1:{port}: {reason}"
    return closed and await wait_for(lambda: line in daemon.output())


async def test_a_stalled_nonce_exchange_times_out(daemon, short_timeouts) -> None:
    sock = raw_connection(daemon)
    sock.sendall(os.urandom(10))  # 10 of the 24 bytes of a nonce, then nothing
    assert await closed_for(daemon, sock, "no client nonce within 0.3 s")


@pytest.mark.parametrize("sent", ["one byte of the length", "the length and half the frame"])
async def test_a_half_received_frame_times_out_even_in_an_authenticated_session(daemon, short_timeouts, sent: str) -> None:
    client = CppClient(control_ports(daemon)[0], KEY)
    assert client.command("return 'proved'") == "proved"
    frame = (48).to_bytes(2, "big") + os.urandom(48)
    client.sock.sendall(frame[:1] if sent.startswith("one") else frame[: 2 + 24])
    assert await closed_for(daemon, client.sock, "no complete frame within 0.3 s")


async def test_no_command_after_the_nonce_exchange_times_out(daemon, short_timeouts) -> None:
    client = CppClient(control_ports(daemon)[0], KEY)  # the nonce exchange, then nothing
    assert await closed_for(daemon, client.sock, "no command within 0.6 s")


async def test_an_authenticated_session_outlives_the_unauthenticated_timeout(daemon, short_timeouts) -> None:
    with await asyncio.to_thread(connect, daemon) as connection:
        assert connection.command("return 'first'") == "first"
        # an operator thinking at the prompt: three times the wait allowed before the key is proved
        await asyncio.sleep(1.8)
        assert connection.command("return 'still here'") == "still here"


def test_console_limit_settings_are_checked() -> None:
    from trackalert.lua.host import Host
    from trackalert.lua.state import LuaError, LuaState, StateKind

    host = Host()
    state = LuaState(StateKind.CONFIG, host)
    state.execute('setMaxConsoleConns(5) setConsoleTimeouts({handshake="1m", frame=2.5, idle=0})')
    limits = host.settings.console
    assert (limits.max_conns, limits.handshake_timeout, limits.frame_timeout) == (5, 60.0, 2.5)
    assert (limits.unauthenticated_timeout, limits.idle_timeout) == (60.0, 0.0)
    for bad in ("setMaxConsoleConns(0)", "setMaxConsoleConns(1.5)", "setConsoleTimeouts({nonce=1})",
                'setConsoleTimeouts({frame="soon"})', "setConsoleTimeouts({frame=-1})"):
        with pytest.raises(LuaError):
            state.execute(bad)
    assert host.settings.console.max_conns == 5
