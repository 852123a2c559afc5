"""The control socket end to end: a real daemon subprocess, real clients, real crypto on loopback.

Two clients drive it: ours (`ConsoleConnection`), and `CppClient` below, a transcription of what
the C++ `trackalert -c` does on the wire written with nothing but PyNaCl's libsodium bindings, so
compatibility with the C++ client is checked against an independent implementation.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import threading
from pathlib import Path

import aiohttp
import nacl.bindings
import pytest

from trackalert import __version__
from trackalert.console.client import ConsoleConnection, ConsoleError
from trackalert.console.protocol import MAX_TEXT, encode_key, too_long_reply
from trackalert.netaddr import parse_combo
from trackalert.testing import DaemonProcess, basic_auth, listener_config, wait_for

KEY = bytes(range(7, 39))
OTHER_KEY = bytes(range(50, 82))
AUTH = basic_auth()

CONFIG = listener_config() + f"""
controlSocket("127.0.0.1:0")
setKey("{encode_key(KEY)}")
setNumLuaStates(2)
setSlowLuaCallSeconds(1)
addACL("192.0.2.0/24")
addACL("!127.0.0.2/32")
addCustomStat("seen")
setCustomEndpoint("custom", function(args) return true, {{}} end)
setCustomEndpoint("another", function(args) return true, {{}} end)
function report(lt)
  if lt.login == "stuck" then
    local deadline = os.time() + 60
    while not io.open("release") and os.time() < deadline do end
  end
  local f = io.open("reports.txt", "a")
  f:write("v1 " .. lt.login .. "\\n")
  f:close()
  incCustomStat("seen")
end
setReport(report)
"""


# ---- helpers --------------------------------------------------------------------------------


def control_ports(daemon: DaemonProcess) -> list[int]:
    return [int(p) for p in re.findall(r"Accepting control connections on 127\.0\.0\.1:(\d+)", daemon.output())]


def connect(daemon: DaemonProcess, key: bytes = KEY, port: int | None = None, **kwargs) -> ConsoleConnection:
    port = port or control_ports(daemon)[0]
    return ConsoleConnection.open(parse_combo(f"127.0.0.1:{port}"), key, timeout=60, **kwargs)


def run(daemon: DaemonProcess, command: str) -> str:
    with connect(daemon) as connection:
        return connection.command(command)


def cpp_run(daemon: DaemonProcess, command: str) -> str:
    client = CppClient(control_ports(daemon)[0], KEY)
    try:
        return client.command(command)
    finally:
        client.close()


def both(daemon: DaemonProcess, command: str) -> tuple[str, str]:
    """The replies to the C++ client and to ours."""
    return cpp_run(daemon, command), run(daemon, command)


def _plus_one(nonce: bytes) -> bytes:
    return ((int.from_bytes(nonce[:4], "big") + 1) % 2**32).to_bytes(4, "big") + nonce[4:]


class CppClient:
    """The C++ client's side of reference §9.2, independent of trackalert.console.protocol."""

    def __init__(self, port: int, key: bytes) -> None:
        self.key = key
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        ours = os.urandom(24)
        self.sock.sendall(ours)
        theirs = self.receive_exactly(24)
        self.writing = theirs[:12] + ours[12:]
        self.reading = ours[:12] + theirs[12:]

    def receive_exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError("EOF while reading message")
            data += chunk
        return data

    def send(self, text: bytes) -> None:
        ciphertext = nacl.bindings.crypto_secretbox_easy(text, self.writing, self.key)
        self.writing = _plus_one(self.writing)
        self.sock.sendall(len(ciphertext).to_bytes(2, "big") + ciphertext)

    def receive(self) -> str:
        length = int.from_bytes(self.receive_exactly(2), "big")
        ciphertext = self.receive_exactly(length)
        text = nacl.bindings.crypto_secretbox_open_easy(ciphertext, self.reading, self.key)
        self.reading = _plus_one(self.reading)
        return text.decode()

    def command(self, text: str) -> str:
        self.send(text.encode())
        return self.receive()

    def close(self) -> None:
        self.sock.close()


async def post_report(daemon: DaemonProcess, login: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.post(daemon.url("/command/report"), data=json.dumps({"login": login}), headers=AUTH) as r:
            return r.status


def ran(daemon: DaemonProcess, line: str) -> bool:
    path = daemon.directory / "reports.txt"
    return path.exists() and line in path.read_text().splitlines()


#: The daemon with report(lt) in its policy process (the default on SQLite) and in the core.
WHERE_REPORT_RUNS = {"policy process": "", "core": "setPolicyProcess(false)\n"}


@pytest.fixture(scope="module", params=list(WHERE_REPORT_RUNS))
def daemon(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    config = CONFIG + WHERE_REPORT_RUNS[request.param]
    with DaemonProcess(tmp_path_factory.mktemp("console"), config) as process:
        assert len(control_ports(process)) == 1
        process.worker_states = 2 + (2 if request.param == "policy process" else 0)  # type: ignore[attr-defined]
        yield process


# ---- the wire -----------------------------------------------------------------------------


def test_the_cpp_client_wire_protocol_works(daemon) -> None:
    client = CppClient(control_ports(daemon)[0], KEY)
    try:
        assert client.command("showVersion()") == f"trackalert {__version__}\n"
        assert client.command("") == ""  # the C++ client sends empty lines too
        for n in range(3):  # nonces keep moving in step
            assert client.command(f"return 'reply {n}'") == f"reply {n}"
    finally:
        client.close()


def test_connections_are_logged(daemon) -> None:
    client = CppClient(control_ports(daemon)[0], KEY)
    port = client.sock.getsockname()[1]
    client.command("stats()")
    client.close()
    assert f"Got control connection from 127.0.0.1:{port}" in daemon.output()
    assert wait_for_sync(lambda: f"Closed control connection from 127.0.0.1:{port}" in daemon.output())


def run_once_free(daemon: DaemonProcess, command: str, attempts: int = 500) -> str:
    """Run `command`, retrying while a worker state is still busy (bounded: `attempts` × 20 ms)."""
    for _ in range(attempts):
        reply = run(daemon, command)
        if not reply.startswith("Error: worker state "):
            return reply
        threading.Event().wait(0.02)
    return reply


def wait_for_sync(predicate, timeout: float = 15.0) -> bool:
    return asyncio.run(wait_for(predicate, timeout))


def test_our_client_negotiates_chunked_replies(daemon) -> None:
    with connect(daemon) as connection:
        assert connection.channel.chunked
        assert connection.command("showVersion()") == f"trackalert {__version__}\n"
    with connect(daemon, announce=False) as connection:
        assert not connection.channel.chunked
        assert connection.command("showVersion()") == f"trackalert {__version__}\n"


def _pattern(size: int) -> str:
    return "".join(chr(97 + i % 26) for i in range(1, size + 1))


@pytest.mark.parametrize("size", [MAX_TEXT - 1, MAX_TEXT, MAX_TEXT + 1, 2 * MAX_TEXT, 200_000, 1_000_000])
def test_replies_longer_than_one_frame_arrive_intact(daemon, size: int) -> None:
    command = f"local t = {{}} for i = 1, {size} do t[i] = string.char(97 + i % 26) end return table.concat(t)"
    with connect(daemon) as connection:
        reply = connection.command(command)
        assert len(reply) == size and reply == _pattern(size)
        assert connection.command("return 'next'") == "next"  # still in step after the run


def test_requests_longer_than_one_frame_arrive_intact(daemon) -> None:
    text = _pattern(150_000)
    with connect(daemon) as connection:
        assert connection.command(f"local s = [[{text}]] return #s .. ':' .. s:sub(-5)") == f"150000:{text[-5:]}"


def test_a_client_without_chunking_gets_a_clear_error_instead_of_a_corrupted_reply(daemon) -> None:
    client = CppClient(control_ports(daemon)[0], KEY)
    try:
        assert client.command("return string.rep('x', 200000)") == too_long_reply(200_000)
        assert client.command(f"return string.rep('x', {MAX_TEXT})") == "x" * MAX_TEXT  # fits exactly
        assert client.command("return 'still fine'") == "still fine"
    finally:
        client.close()
    assert "A console reply of 200000 bytes does not fit in one message" in daemon.output()


# ---- keys ---------------------------------------------------------------------------------


def test_a_client_with_another_key_is_dropped_logged_and_runs_nothing(daemon) -> None:
    marker = daemon.directory / "pwned.txt"
    client = CppClient(control_ports(daemon)[0], OTHER_KEY)
    client.send(b'local f = io.open("pwned.txt", "w") f:write("x") f:close()')
    with pytest.raises(EOFError):
        client.receive()
    client.close()
    with pytest.raises(ConsoleError, match="closed the connection"):
        connect(daemon, key=OTHER_KEY)
    assert daemon.output().count("Could not decrypt client command: Could not decrypt message") >= 2
    assert run(daemon, 'return tostring(io.open("pwned.txt"))') == "nil"
    assert not marker.exists()


def test_an_unauthenticated_empty_message_is_refused(daemon) -> None:
    client = CppClient(control_ports(daemon)[0], OTHER_KEY)
    before = daemon.output().count("Could not decrypt client command")
    client.sock.sendall(b"\x00\x10" + bytes(16))  # 16 bytes: the C++ daemon would not check them
    with pytest.raises(EOFError):
        client.receive()
    client.close()
    assert wait_for_sync(lambda: daemon.output().count("Could not decrypt client command") > before)


def test_a_daemon_without_a_key_refuses_console_connections(tmp_path: Path) -> None:
    config = listener_config() + 'controlSocket("127.0.0.1:0")\n'
    with DaemonProcess(tmp_path, config) as process:
        assert "The control socket refuses every connection: no console key is set" in process.output()
        with pytest.raises(ConsoleError, match="closed the connection"):
            connect(process)
        assert "Refusing control connection from 127.0.0.1:" in process.output()


# ---- command outputs (reference §9.6) -----------------------------------------------------

EXACT_OUTPUTS = [
    ("showVersion()", f"trackalert {__version__}\n"),
    ("testCrypto('hello')", "Everything is ok!\n"),
    ("reloadGeoIPDBs()", "reloadGeoIPDBs() successful\n"),
    ("showCustomEndpoints()", f"{'Custom Endpoint':<30} \n{'another':<30} \n{'custom':<30} \n"),
    ("addACL('198.51.100.0/24')", ""),
]
#: setKey returns a boolean, which the C++ console discards and ours shows after the output.
SET_KEY_OUTPUTS = [
    ('setKey("!!!")', "Unable to decode !!! as Base64", "Unable to decode !!! as Base64\nfalse"),
    (f'setKey("{encode_key(KEY)}")', "", "true"),
]


@pytest.mark.parametrize("command, expected", EXACT_OUTPUTS)
def test_exact_outputs(daemon, command: str, expected: str) -> None:
    assert both(daemon, command) == (expected, expected)


@pytest.mark.parametrize("command, cpp_expected, ours_expected", SET_KEY_OUTPUTS)
def test_set_key_outputs(daemon, command: str, cpp_expected: str, ours_expected: str) -> None:
    assert both(daemon, command) == (cpp_expected, ours_expected)


def test_make_key_outputs_a_fresh_set_key_line(daemon) -> None:
    first, second = run(daemon, "makeKey()"), run(daemon, "makeKey()")
    assert re.fullmatch(r'setKey\("[A-Za-z0-9+/]{43}="\)\n', first) and first != second


async def test_stats_counts_reports(daemon) -> None:
    before = int(re.fullmatch(r"(\d+) reports\n", await asyncio.to_thread(run, daemon, "stats()")).group(1))
    assert await post_report(daemon, "statsuser") == 200
    assert await asyncio.to_thread(run, daemon, "stats()") == f"{before + 1} reports\n"


def test_show_acl_lists_config_entries_and_defaults(daemon) -> None:
    lines = run(daemon, "showACL()").splitlines(keepends=True)
    assert all(re.fullmatch(r"!?[0-9a-f.:]+/\d+\n", line) for line in lines), lines
    assert {"192.0.2.0/24\n", "!127.0.0.2/32\n", "127.0.0.0/8\n", "::1/128\n", "fe80::/10\n"} <= set(lines)


def test_show_perf_stats_has_ten_lines_in_order(daemon) -> None:
    names = [line.split("=")[0] for line in run(daemon, "showPerfStats()").splitlines()]
    assert names == [f"{kind}_{bucket}" for kind in ("WTW", "WTR") for bucket in ("0_1", "1_10", "10_100", "100_1000", "Slow")]
    assert re.fullmatch(r"(WT[WR]_\w+=\d+\n){10}", run(daemon, "showPerfStats()"))


async def test_show_command_and_custom_stats(daemon) -> None:
    assert await post_report(daemon, "commandstats") == 200
    text = await asyncio.to_thread(run, daemon, "showCommandStats()")
    assert re.fullmatch(r"(\w+=\d+\n)+", text), text
    names = [line.split("=")[0] for line in text.splitlines()]
    assert names == sorted(names) and {"another", "custom", "readyz", "report", "stats"} <= set(names)
    assert await wait_for(lambda: ran(daemon, "v1 commandstats"))
    assert re.fullmatch(r"seen=[1-9]\d*\n", await asyncio.to_thread(run, daemon, "showCustomStats()"))


async def test_show_event_log(daemon) -> None:
    assert await post_report(daemon, "eventlogged") == 200
    assert await wait_for(lambda: ran(daemon, "v1 eventlogged"))
    text = await asyncio.to_thread(run, daemon, "showEventLog()")
    labels = [line.split(":")[0] for line in text.splitlines()]
    assert labels == ["Backend", "Location", "Events", "Size", "Oldest event", "Newest event", "Retention", "Policy lag",
                      "Projection"]
    assert "Backend:      sqlite\n" in text
    assert f"Location:     {daemon.directory / 'trackalert-events.db'}\n" in text
    assert re.search(r"^Events:       [1-9]\d* \(seq 1 to [1-9]\d*\)$", text, re.M)
    assert re.search(r"^Newest event: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$", text, re.M)
    assert "Retention:    keep forever\n" in text
    assert re.search(r"^Policy lag:   \d+ events, \d+\.\d s$", text, re.M)


def test_commands_of_other_modules_run_through_the_console(daemon) -> None:
    assert run(daemon, "showCustomWebHooks()").startswith(f"{'ID':<9} {'Name':<20} {'Successes':<9} {'Failures':<9} URL\n")
    assert not run(daemon, "showSchedules()").startswith("Error")


# ---- reply rules (reference §9.3) ---------------------------------------------------------


@pytest.mark.parametrize(
    "command, expected",
    [
        ("return 'text'", "text"),
        ("return 42", "42"),
        ("return 1.5", "1.5"),
        ("return nil", ""),
        ("showVersion() return 'returned wins'", "returned wins"),
    ],
)
def test_reply_rules(daemon, command: str, expected: str) -> None:
    assert both(daemon, command) == (expected, expected)


@pytest.mark.parametrize(
    "command, cpp_expected, ours_expected",
    [
        ("return true", "Command returned an object we can't print: boolean\n", "true"),
        ("return {}", "Command returned an object we can't print: table\n", "{}"),
        ("showVersion() return {1, 2}", "Command returned an object we can't print: table\n",
         f"trackalert {__version__}\n1\n2"),
        ('return topValues("remote", {login="helper-nobody"}, 5)',
         "Command returned an object we can't print: table\n", "{}"),
    ],
)
def test_values_the_cpp_console_cannot_print_are_shown_to_our_client(
    daemon, command: str, cpp_expected: str, ours_expected: str
) -> None:
    assert both(daemon, command) == (cpp_expected, ours_expected)


def test_errors(daemon) -> None:
    runtime = run(daemon, "error('boom')")
    assert runtime.startswith("Error: console:1: boom\nstack traceback:") and runtime.endswith(": ")
    syntax = run(daemon, "1 +")
    assert syntax.startswith("Error: console:1: unexpected symbol near '1'") and syntax.endswith(": ")
    failing = run(daemon, "addACL('not a netmask')")
    assert failing.startswith("Error: ") and "addACL()" in failing


def test_an_error_in_the_worker_states_stops_before_the_config_state(daemon) -> None:
    # setReport only works in worker states: there it rejects a number, in the config state it is a no-op
    reply = run(daemon, "workers_marker = true setReport(1)")
    assert reply.startswith("Error: ") and "setReport" in reply
    assert run(daemon, "return tostring(workers_marker)") == "nil"


def test_each_command_runs_once_per_state_and_globals_stay_per_state(daemon) -> None:
    assert run(daemon, "per_state = (per_state or 0) + 1 return per_state") == "1"
    assert run(daemon, "per_state = (per_state or 0) + 1 return per_state") == "2"


def test_concurrent_consoles_do_not_mix_their_output(daemon) -> None:
    failures: list[str] = []

    def hammer(command: str, pattern: str) -> None:
        with connect(daemon) as connection:
            for _ in range(25):
                reply = connection.command(command)
                if not re.fullmatch(pattern, reply):
                    failures.append(reply)

    threads = [
        threading.Thread(target=hammer, args=("makeKey()", r'setKey\("[A-Za-z0-9+/]{43}="\)\n')),
        threading.Thread(target=hammer, args=("showVersion()", re.escape(f"trackalert {__version__}\n"))),
        threading.Thread(target=hammer, args=("stats()", r"\d+ reports\n")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures


# ---- a console that answers: helpers, expression values, tables ---------------------------


async def post_body(daemon: DaemonProcess, body: dict) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.post(daemon.url("/command/report"), data=json.dumps(body), headers=AUTH) as r:
            return r.status


async def store(daemon: DaemonProcess, login: str, remotes_and_outcomes: list[tuple[str, bool]]) -> None:
    """Reports in this order; each 200 means it is in the log, so the console sees it at once."""
    for remote, success in remotes_and_outcomes:
        body = {"login": login, "remote": remote, "success": success, "protocol": "imap"}
        assert await post_body(daemon, body) == 200


async def test_long_term_helpers_answer_from_the_log_on_the_console(daemon) -> None:
    await store(daemon, "helper-alice", [("192.0.2.10", False)] * 3 + [("192.0.2.11", True)])
    await store(daemon, "helper-bob", [("192.0.2.10", False)])

    def ask(command: str) -> str:
        return run(daemon, command)

    assert await asyncio.to_thread(ask, 'countReports{login="helper-alice", success=false, window="7d"}') == "3"
    assert await asyncio.to_thread(ask, 'return countReports({login="helper-alice"})') == "4"
    assert await asyncio.to_thread(ask, 'return tostring(countReports({login="helper-bob"}))') == "1"
    assert await asyncio.to_thread(ask, 'countDistinct("login", {remote="192.0.2.10", success=false})') == "2"
    assert await asyncio.to_thread(ask, 'lastSeen{login="helper-bob"} >= firstSeen{login="helper-alice"}') == "true"
    assert await asyncio.to_thread(ask, 'firstSeen{login="helper-nobody"}') == ""
    # the C++ client gets the number the C++ way: returned
    assert await asyncio.to_thread(cpp_run, daemon, 'return countReports({login="helper-alice"})') == "4"


async def test_helpers_see_reports_stored_after_the_previous_command(daemon) -> None:
    await store(daemon, "helper-carol", [("192.0.2.30", False)])
    before = await asyncio.to_thread(run, daemon, 'countReports{login="helper-carol"}')
    await store(daemon, "helper-carol", [("192.0.2.30", False)] * 2)
    after = await asyncio.to_thread(run, daemon, 'countReports{login="helper-carol"}')
    assert (before, after) == ("1", "3")


async def test_helpers_on_concurrent_consoles_follow_ingestion(daemon) -> None:
    """Three consoles ask while reports arrive, 10 rounds of 20: an answer counts every report
    acknowledged before the question and none that was not yet sent, and never goes back."""
    login, rounds, batch = "helper-flood", 10, 20
    question = f'countReports{{login="{login}"}}'
    connections = [await asyncio.to_thread(connect, daemon) for _ in range(3)]
    answers: list[list[int]] = [[] for _ in connections]
    try:
        async with aiohttp.ClientSession() as session:
            async def post(i: int) -> int:
                body = json.dumps({"login": login, "remote": f"192.0.2.{i % 250}", "success": False})
                async with session.post(daemon.url("/command/report"), data=body, headers=AUTH) as r:
                    return r.status

            for n in range(rounds):
                posts = [post(n * batch + i) for i in range(batch)]
                asks = [asyncio.to_thread(c.command, question) for c in connections]
                results = await asyncio.gather(*posts, *asks)
                assert results[:batch] == [200] * batch
                for mine, reply in zip(answers, results[batch:]):
                    assert n * batch <= int(reply) <= (n + 1) * batch, reply
                    mine.append(int(reply))
        final = [await asyncio.to_thread(c.command, question) for c in connections]
    finally:
        for connection in connections:
            connection.close()
    assert final == [str(rounds * batch)] * 3
    assert all(mine == sorted(mine) for mine in answers), answers


def test_a_helper_error_on_the_console_is_an_error_with_its_place(daemon) -> None:
    reply = run(daemon, 'countReports{bogus=1}')
    assert reply.startswith("Error: console:1: countReports(): unknown filter key 'bogus'"), reply


async def test_table_results_are_shown_readably(daemon) -> None:
    await store(daemon, "table-dave", [("192.0.2.20", False), ("192.0.2.20", False), ("192.0.2.21", False)])
    top = await asyncio.to_thread(run, daemon, 'topValues("remote", {login="table-dave"}, 5)')
    assert top == "count  value\n    2  192.0.2.20\n    1  192.0.2.21"
    recent = await asyncio.to_thread(run, daemon, 'recentReports({login="table-dave"}, 2)')
    assert "table: 0x" not in recent and "<table>" not in recent
    newest, older = recent.splitlines()[-2:]  # after the header when shown as columns
    assert "table-dave" in newest and "192.0.2.21" in newest
    assert "table-dave" in older and "192.0.2.20" in older
    assert await asyncio.to_thread(run, daemon, 'topValues("remote", {login="table-nobody"}, 5)') == "{}"


def _unexpected(symbol: str) -> str:
    return f"Error: console:1: unexpected symbol near '{symbol}': "


@pytest.mark.parametrize(
    "command, cpp_expected, ours_expected",
    [
        ("1 + 1", _unexpected("1"), "2"),
        ("'con' .. 'cat' -- with a comment", _unexpected("'con'"), "concat"),
        ("{a = 1, b = {true, 'x'}}", _unexpected("{"), "a  1\nb  {true, x}"),
        ("nil", _unexpected("nil"), ""),
        # calls: statements to the C++ console, whose value it drops
        ('countReports{login="helper-nobody"}', "", "0"),
        ("tostring(1)", "", "1"),
        ("newCA('192.0.2.1')", "", "192.0.2.1"),
        ("newNetmask('192.0.2.0/24')", "", "192.0.2.0/24"),
    ],
)
def test_an_expression_typed_without_return_shows_its_value_to_our_client(
    daemon, command: str, cpp_expected: str, ours_expected: str
) -> None:
    assert both(daemon, command) == (cpp_expected, ours_expected)


def test_an_expression_runs_once_in_each_state(daemon) -> None:
    define = 'function mark(tag) local f = io.open("marks.txt", "a") f:write(tag, "\\n") f:close() return tag end'
    assert run(daemon, define) == ""
    assert run(daemon, 'mark("ours")') == "ours"
    assert cpp_run(daemon, 'mark("cpp")') == ""  # a statement for the C++ console, as before
    marks = (daemon.directory / "marks.txt").read_text().splitlines()
    # the core's 2 worker states (and the policy process's 2), then the config state
    runs = daemon.worker_states + 1
    assert marks == ["ours"] * runs + ["cpp"] * runs


#: Replies as the daemon gave them before expressions showed values (81ccacd), for statements.
STATEMENT_REPLIES = [
    ("statement_global = 1", ""),
    ("if true then showVersion() end", f"trackalert {__version__}\n"),
    ("for i = 1, 3 do local x = i end", ""),
    ("", ""),
    ("-- only a comment", ""),
    ('countReports{login="helper-nobody"};', ""),  # a trailing ; keeps a call a statement
    ("local t = {} return #t", "0"),
]


@pytest.mark.parametrize("command, expected", STATEMENT_REPLIES)
def test_statements_reply_as_before_to_both_clients(daemon, command: str, expected: str) -> None:
    assert both(daemon, command) == (expected, expected)


# ---- runtime configuration ----------------------------------------------------------------


async def test_redefining_the_report_policy_at_runtime(daemon) -> None:
    command = """
    original_report = original_report or report
    function report(lt)
      local f = io.open("reports.txt", "a") f:write("v2 " .. lt.login .. "\\n") f:close()
    end
    setReport(report)
    """
    assert await asyncio.to_thread(run, daemon, command) == ""
    assert await post_report(daemon, "after-redefinition") == 200
    assert await wait_for(lambda: ran(daemon, "v2 after-redefinition"))
    restore = "report = original_report setReport(report)"
    assert await asyncio.to_thread(run, daemon, restore) == ""


async def test_acl_changes_at_runtime_take_effect(daemon) -> None:
    assert await asyncio.to_thread(run, daemon, 'addACL("!127.0.0.3/32")') == ""
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.3", 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(daemon.url("/command/stats"), headers=AUTH) as response:
            assert response.status == 401
    assert "!127.0.0.3/32\n" in await asyncio.to_thread(run, daemon, "showACL()")


def test_a_control_socket_added_at_runtime_serves_at_once(daemon) -> None:
    assert run(daemon, 'controlSocket("127.0.0.1:0")') == ""
    ports = control_ports(daemon)
    assert len(ports) == 2
    with connect(daemon, port=ports[1]) as connection:
        assert connection.command("showVersion()") == f"trackalert {__version__}\n"
    busy = run(daemon, f'controlSocket("127.0.0.1:{ports[1]}")')
    assert busy.startswith("Error: ") and f"Unable to bind to control socket on 127.0.0.1:{ports[1]}" in busy


# ---- the console and report processing ----------------------------------------------------


async def test_a_running_console_command_does_not_block_ingestion(daemon) -> None:
    gate = daemon.directory / "go"
    command = 'local deadline = os.time() + 60 while not io.open("go") and os.time() < deadline do end return "released"'
    pending = asyncio.create_task(asyncio.to_thread(run, daemon, command))
    try:
        # the command is now looping in a worker state; the HTTP side answers regardless
        assert await post_report(daemon, "during-console") == 200
        assert not pending.done()
    finally:
        gate.write_text("")
    assert await pending == "released"
    gate.unlink()
    assert await wait_for(lambda: ran(daemon, "v1 during-console"))


async def test_a_stuck_worker_state_makes_commands_fail_fast(daemon) -> None:
    release = daemon.directory / "release"
    assert await post_report(daemon, "stuck") == 200
    try:
        # the watchdog reports the state once it has run longer than setSlowLuaCallSeconds(1)
        assert await wait_for(lambda: "Lua report function has been running for" in daemon.output(), timeout=30)
        reply = await asyncio.to_thread(run, daemon, "stuck_marker = true")
        assert reply.startswith("Error: worker state ") and "has been running a report function" in reply
    finally:
        release.write_text("")
    assert await wait_for(lambda: ran(daemon, "v1 stuck"))
    # the line is written before the report function returns: the state frees a moment later
    assert await asyncio.to_thread(run_once_free, daemon, "return tostring(stuck_marker)") == "nil"
    release.unlink()


# ---- shutdown -----------------------------------------------------------------------------


def test_shutdown_answers_then_stops_the_daemon_gracefully(tmp_path: Path) -> None:
    config = listener_config() + f'controlSocket("127.0.0.1:0")\nsetKey("{encode_key(KEY)}")\n'
    with DaemonProcess(tmp_path, config) as process:
        with connect(process) as connection:
            assert connection.command("shutdown()") == ""
        assert process.process is not None
        assert process.process.wait(30) == 0
        assert "Shutting down" in process.output()


# ---- our client against a daemon speaking the C++ side of the protocol --------------------


class CppServer:
    """One connection served as the C++ daemon does (reference §9.2), with PyNaCl alone: every
    command is answered with `answer(command)`, framed with a 16-bit length truncated as in C++."""

    def __init__(self, key: bytes, answer) -> None:
        self.key = key
        self.answer = answer
        self.commands: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(60)
            theirs = _read(conn, 24)
            ours = os.urandom(24)
            conn.sendall(ours)
            reading, writing = ours[:12] + theirs[12:], theirs[:12] + ours[12:]
            while True:
                try:
                    length = int.from_bytes(_read(conn, 2), "big")
                except (EOFError, ConnectionError):  # the client left (or gave up on a bad reply)
                    return
                text = nacl.bindings.crypto_secretbox_open_easy(_read(conn, length), reading, self.key)
                reading = _plus_one(reading)
                self.commands.append(text.decode())
                reply = nacl.bindings.crypto_secretbox_easy(self.answer(text.decode()).encode(), writing, self.key)
                writing = _plus_one(writing)
                conn.sendall((len(reply) % 65536).to_bytes(2, "big") + reply)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(30)


def _read(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _cpp_answer(command: str) -> str:
    if command.startswith("--"):
        return ""  # a Lua comment runs as a no-op and leaves the output buffer empty
    if command == "long":
        return "y" * 70_000
    return f"ran {command}"


def test_our_client_drives_a_daemon_speaking_the_cpp_protocol() -> None:
    server = CppServer(KEY, _cpp_answer)
    try:
        with ConsoleConnection.open(parse_combo(f"127.0.0.1:{server.port}"), KEY, timeout=60) as connection:
            assert not connection.channel.chunked  # the C++ daemon ignores the announcement
            assert connection.command("showVersion()") == "ran showVersion()"
            assert connection.command("") == "ran "
            assert connection.command("stats()") == "ran stats()"
    finally:
        server.close()
    assert server.commands == ["-- trackalert-client: chunked-replies", "showVersion()", "", "stats()"]


def test_a_corrupted_long_reply_from_the_cpp_daemon_is_a_clear_error() -> None:
    server = CppServer(KEY, _cpp_answer)
    try:
        with ConsoleConnection.open(parse_combo(f"127.0.0.1:{server.port}"), KEY, timeout=60) as connection:
            with pytest.raises(ConsoleError, match="Could not decrypt message"):
                connection.command("long")
    finally:
        server.close()
