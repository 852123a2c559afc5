"""`trackalert -c`/`-e` and the local console, driven as an operator would: real processes, a
real daemon, and real pseudo-terminals (pexpect) for the interactive prompt."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document

from trackalert import __version__
from trackalert.console.protocol import encode_key
from trackalert.console.repl import (
    LuaCompleter,
    ReadlineHistory,
    chunk_is_complete,
    completion_entries,
    should_accept,
)
from trackalert.lua.registry import load_all
from trackalert.testing import DaemonProcess, listener_config

KEY = bytes(range(100, 132))
VERSION = f"trackalert {__version__}"
#: The `>` of the prompt at the start of a line, whatever styling escapes precede it.
PROMPT = r"(^|\n)(\x1b\[[0-9;?]*[a-zA-Z])*>"
ENV = {**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1"}  # pexpect does not answer cursor queries


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def client_config(directory: Path, port: int, key: bytes | None = KEY, name: str = "client.conf") -> Path:
    lines = [f'controlSocket("127.0.0.1:{port}")']
    if key is not None:
        lines.append(f'setKey("{encode_key(key)}")')
    path = directory / name
    path.write_text("\n".join(lines) + "\n")
    return path


def trackalert(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trackalert", *args], cwd=cwd, input=stdin, capture_output=True,
        text=True, timeout=60, env=ENV,
    )


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    config = listener_config() + f'controlSocket("127.0.0.1:0")\nsetKey("{encode_key(KEY)}")\nsetNumLuaStates(2)\n'
    with DaemonProcess(tmp_path_factory.mktemp("client"), config) as process:
        yield process


@pytest.fixture(scope="module")
def port(daemon) -> int:
    return int(re.search(r"Accepting control connections on 127\.0\.0\.1:(\d+)", daemon.output()).group(1))


# ---- -e -----------------------------------------------------------------------------------


def test_execute_prints_the_reply_and_a_newline(daemon, port, tmp_path: Path) -> None:
    config = client_config(tmp_path, port)
    result = trackalert("-C", str(config), "-e", "showVersion()", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, f"{VERSION}\n\n")
    result = trackalert("-c", str(config), "-e", "return 'only this'", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, "only this\n")


def test_execute_shows_the_value_of_an_expression(daemon, port, tmp_path: Path) -> None:
    config = client_config(tmp_path, port)
    result = trackalert("-C", str(config), "-e", "string.rep('ab', 2)", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, "abab\n")
    result = trackalert("-C", str(config), "-e", "{10, 20}", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, "10\n20\n")


def test_execute_a_long_reply(daemon, port, tmp_path: Path) -> None:
    result = trackalert("-C", str(client_config(tmp_path, port)), "-e", "return string.rep('0123456789', 30000)", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout == "0123456789" * 30000 + "\n"


def test_make_key_needs_no_daemon_nor_config(tmp_path: Path) -> None:
    result = trackalert("-C", str(tmp_path / "missing.conf"), "-e", "makeKey()", cwd=tmp_path)
    assert result.returncode == 0
    assert re.fullmatch(r'setKey\("[A-Za-z0-9+/]{43}="\)\n\n', result.stdout)


def test_no_daemon_is_a_clear_error_and_a_failure_status(tmp_path: Path) -> None:
    unused = free_port()
    result = trackalert("-C", str(client_config(tmp_path, unused)), "-e", "showVersion()", cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert f"Cannot connect to the console at 127.0.0.1:{unused}" in result.stderr


def test_a_wrong_key_is_a_clear_error_and_a_failure_status(daemon, port, tmp_path: Path) -> None:
    config = client_config(tmp_path, port, key=bytes(32))
    result = trackalert("-C", str(config), "-e", 'io.open("wrongkey.txt", "w"):close()', cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert "closed the connection" in result.stderr and "key" in result.stderr
    assert "Could not decrypt client command: Could not decrypt message" in daemon.output()
    assert not (daemon.directory / "wrongkey.txt").exists()


def test_no_key_in_the_config_is_a_clear_error(port, tmp_path: Path) -> None:
    result = trackalert("-C", str(client_config(tmp_path, port, key=None)), "-e", "stats()", cwd=tmp_path)
    assert result.returncode == 1 and "no console key is set (setKey)" in result.stderr


def test_commands_on_a_pipe(daemon, port, tmp_path: Path) -> None:
    script = "showVersion()\n\nfunction twice(x)\n\n  return 2 * x\nend\nreturn twice(21)\nquit\nreturn 'not sent'\n"
    result = trackalert("-c", str(client_config(tmp_path, port)), cwd=tmp_path, stdin=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"Connecting to 127.0.0.1:{port}\n{VERSION}\n\n\n42\n"


# ---- the prompt's pieces ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, complete",
    [
        ("showVersion()", True),
        ("function f()", False),
        ("if x then", False),
        ("x = ", False),
        ("local s = [[long", False),
        ("--[[ comment", False),
        ("for i = 1, 2 do\n  print(i)\nend", True),
        ("1 +* 2", True),  # wrong, and more lines cannot fix it: sent, the daemon explains
        ('"unfinished', True),  # a string cannot span lines
    ],
)
def test_chunk_completeness(text: str, complete: bool) -> None:
    assert chunk_is_complete(text) is complete


def test_enter_on_an_empty_continuation_line_sends_the_chunk() -> None:
    assert not should_accept("function f()")
    assert should_accept("function f()\n")
    assert not should_accept("function f()\n", blank_line_sends=False)
    assert should_accept("quit") and should_accept("")
    assert not should_accept("function f() end\nreturn 1", cursor_on_last_line=False)


def _complete(text: str, requested: bool = True) -> list[str]:
    completer = LuaCompleter(completion_entries())
    event = CompleteEvent(completion_requested=requested)
    return [c.text for c in completer.get_completions(Document(text), event)]


def test_completion_covers_every_registered_global() -> None:
    offered = {c.rstrip("()") for c in _complete("")}
    assert set(load_all()) <= offered
    assert {"quit", "function", "local"} <= offered


def test_completion_texts() -> None:
    assert _complete("showVer") == ["showVersion()"]
    assert _complete("x = newC") == ["newCA("]
    assert "setKey(" in _complete("setK") and "makeKey()" in _complete("make")
    assert _complete("lt.log") == []  # fields and methods are not globals
    assert _complete("", requested=False) == []


def test_history_is_the_plain_format_the_cpp_client_shares(tmp_path: Path) -> None:
    path = tmp_path / ".history"
    path.write_text("stats()\nshowACL()\n")  # written by the C++ client
    history = ReadlineHistory(str(path))
    assert list(history.load_history_strings()) == ["showACL()", "stats()"]
    history.store_string("function f()\n  return 1\nend")
    assert path.read_text() == "stats()\nshowACL()\nfunction f()\n  return 1\nend\n"


# ---- the interactive client in a pseudo-terminal ------------------------------------------


def spawn(args: list[str], cwd: Path) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable, ["-m", "trackalert", *args], cwd=str(cwd), env=ENV, encoding="utf-8",
        timeout=30, dimensions=(40, 120),
    )
    return child


def test_interactive_client(daemon, port, tmp_path: Path) -> None:
    config = client_config(tmp_path, port, name="trackalert.conf")
    child = spawn(["-c", str(config)], tmp_path)
    try:
        child.expect(f"Connecting to 127.0.0.1:{port}")
        child.expect(PROMPT)
        child.send("showVersion()\r")
        child.expect(VERSION)
        child.expect(PROMPT)
        # completion: the menu offers showVersion (with its signature), Tab takes it
        child.send("showVer")
        child.expect(re.escape("showVersion()"))
        child.send("\t")
        child.send("\r")
        child.expect(VERSION)
        child.expect(PROMPT)
        # multi-line input: Enter continues an incomplete chunk
        child.send("function shout(s)\r")
        child.send("return s:upper() .. '!'\r")
        child.send("end\r")
        child.expect(PROMPT)
        child.send("return shout('hi' .. 'story')\r")
        child.expect("HISTORY!")
        child.expect(PROMPT)
        # history: Up recalls the previous command
        child.send("\x1b[A")
        child.send("\r")
        child.expect("HISTORY!")
        child.expect(PROMPT)
        child.send("quit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    lines = (tmp_path / ".history").read_text().splitlines()
    assert lines[:2] == ["showVersion()", "function shout(s)"]
    assert lines[-2:] == ["return shout('hi' .. 'story')", "quit"]
    assert lines.count("return shout('hi' .. 'story')") == 1  # a repeated line is stored once


def test_interactive_client_history_persists_and_ctrl_d_leaves(daemon, port, tmp_path: Path) -> None:
    config = client_config(tmp_path, port, name="trackalert.conf")
    (tmp_path / ".history").write_text("return 'from ' .. 'last time'\n")
    child = spawn(["-C", str(config), "-c"], tmp_path)
    try:
        child.expect(PROMPT)
        child.send("\x1b[A")
        child.send("\r")
        child.expect("from last time")
        child.expect(PROMPT)
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_interactive_client_with_a_wrong_key_exits_before_the_prompt(daemon, port, tmp_path: Path) -> None:
    child = spawn(["-c", str(client_config(tmp_path, port, key=bytes(32)))], tmp_path)
    child.expect("closed the connection")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1


# ---- the local console of a foreground daemon ---------------------------------------------


def _foreground(tmp_path: Path) -> pexpect.spawn:
    config = tmp_path / "trackalert.conf"
    config.write_text("setNumLuaStates(2)\n")
    child = spawn(["-C", str(config)], tmp_path)
    child.expect("trackalert is ready")
    return child


def test_local_console_runs_commands_and_quit_stops_the_daemon(tmp_path: Path) -> None:
    child = _foreground(tmp_path)
    try:
        child.send("showVersion()\r")
        child.expect(VERSION)
        child.send("error('local ' .. 'failure')\r")
        child.expect("Error: console:1: local failure")
        child.send("return 6 * 7\r")
        child.expect("42")
        child.send("'n=' .. countReports{login='nobody'}\r")  # an expression shows its value
        child.expect("n=0")
        child.send("stats()\r")
        child.expect("0 reports")
        child.send("quit\r")
        child.expect("Console closed: stopping trackalert")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert "stats()" in (tmp_path / ".history").read_text().splitlines()


def test_local_console_ctrl_d_stops_the_daemon(tmp_path: Path) -> None:
    child = _foreground(tmp_path)
    try:
        child.expect(PROMPT)
        child.sendcontrol("d")
        child.expect("Shutting down")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
