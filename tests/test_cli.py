"""The command line: options, start-up errors and modes, on a real subprocess."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from trackalert.testing import DaemonProcess, basic_auth, listener_config


def run(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trackalert", *args], capture_output=True, text=True,
        timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL,
    )


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trackalert.conf"
    path.write_text(text)
    return path


def test_help_exits_zero() -> None:
    result = run("-h")
    assert result.returncode == 0
    assert "--config" in result.stdout and "--daemon" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-l", "abc"], "Bad log level (abc) - must be an integer"),
        (["-f", "nonsense"], "Bad log facility"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["-C"], "expected one argument"),
    ],
)
def test_bad_options_exit_one(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.returncode == 1
    assert message in result.stderr + result.stdout


def test_missing_config_is_an_error(tmp_path: Path) -> None:
    result = run("-C", str(tmp_path / "nope.conf"), "-D")
    assert result.returncode == 1
    assert "Unable to read configuration from 'nope.conf'" in result.stdout


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, 'infoLog("ok", {})\nfunction report(lt\n')
    result = run("-C", str(config), "-D")
    assert result.returncode == 1
    assert re.search(r"Syntax error in configuration: trackalert.conf:\d+:", result.stdout), result.stdout


def test_lua_error_in_config_is_fatal(tmp_path: Path) -> None:
    config = write_config(tmp_path, listener_config() + 'addACL("300.1.1.1/8")\n')
    result = run("-C", str(config), "-D")
    assert result.returncode == 1
    assert "Fatal Lua error: trackalert.conf:3: addACL(): " in result.stdout


def test_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path, f'addListener("127.0.0.1:{port}", false, "", "", {{}})\n')
        result = run("-C", str(config), "-D")
    assert result.returncode == 1
    assert f"Unable to bind webserver to 127.0.0.1:{port}" in result.stdout


@pytest.mark.parametrize("policy_process, runs", [
    ("", 7),  # config state + 3 workers, then the policy process's config state + 2 workers
    ("setPolicyProcess(false)\n", 4),  # config state + 3 workers, as the C++ daemon
])
def test_config_runs_once_per_state_in_the_config_directory(
    tmp_path: Path, policy_process: str, runs: int,
) -> None:
    config = listener_config() + policy_process + (
        'setNumLuaStates(3)\n'
        'local f = io.open("runs.txt", "a"); f:write("run\\n"); f:close()\n'
    )
    with DaemonProcess(tmp_path, config):
        assert (tmp_path / "runs.txt").read_text().count("run") == runs
        assert (tmp_path / "trackalert-events.db").exists()


def test_docker_mode_timestamps_and_verbose_report_log(tmp_path: Path) -> None:
    config = listener_config() + "setReport(function(lt) end)\n"
    with DaemonProcess(tmp_path, config, args=("-D", "-v")) as process:
        request = urllib.request.Request(
            process.url("/command/report"), data=b'{"login": "verbose", "remote": "192.0.2.1"}',
            headers=basic_auth(), method="POST",
        )
        assert urllib.request.urlopen(request, timeout=10).status == 200
        process.stop()
    output = process.output()
    assert re.search(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\] Read configuration from 'trackalert.conf'$", output, re.M)
    assert 'reportLog: remote="192.0.2.1" login="verbose" success="0"' in output


def test_systemd_mode_stops_stdout_logging_after_config(tmp_path: Path) -> None:
    config = listener_config() + 'infoLog("from the config", {})\nsetReport(function(lt) end)\n'
    with DaemonProcess(tmp_path, config, args=("-s",)) as process:
        process.stop()
    output = process.output()
    assert "from the config" in output
    assert "Shutting down" not in output


def start_daemonized(tmp_path: Path, config: Path) -> str:
    """Run `trackalert -d`; the parent must exit 0. Returns the child's systemd messages."""
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(10)
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
        parent = subprocess.run(
            [sys.executable, "-m", "trackalert", "-C", str(config), "-d"], env=env,
            capture_output=True, text=True, timeout=60,
        )
        assert parent.returncode == 0, parent.stderr + parent.stdout
        return notify.recv(4096).decode() + "\n" + notify.recv(4096).decode()


def test_daemon_mode_parent_waits_for_readiness(tmp_path: Path) -> None:
    config = write_config(tmp_path, listener_config() + "setReport(function(lt) end)\n")
    messages = start_daemonized(tmp_path, config)
    port = int(re.search(r"STATUS=Listening on 127\.0\.0\.1:(\d+)", messages).group(1))
    pid = int(re.search(r"MAINPID=(\d+)", messages).group(1))
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/command/stats", headers=basic_auth())
        assert urllib.request.urlopen(request, timeout=10).status == 200
    finally:
        os.kill(pid, signal.SIGTERM)


def test_daemon_mode_reports_a_failure_in_the_child(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    config = write_config(
        tmp_path, listener_config() + f'setEventLog("sqlite:///{blocker}/events.db")\n'
    )
    result = run("-C", str(config), "-d")
    assert result.returncode == 1
    assert "start-up failed" in result.stderr or "event log" in result.stderr


def test_daemon_mode_background_functions_survive_the_fork(tmp_path: Path) -> None:
    config = write_config(tmp_path, listener_config() + (
        'setBackground("tick", function()\n'
        '  local f = io.open("ticks.txt", "a"); f:write("tick\\n"); f:close()\n'
        'end)\n'
        'intervalScheduleBackgroundFunc("00:00:01", "tick")\n'
    ))
    messages = start_daemonized(tmp_path, config)
    pid = int(re.search(r"MAINPID=(\d+)", messages).group(1))
    ticks = tmp_path / "ticks.txt"
    try:
        for _ in range(200):  # bounded: up to ~20 s for two runs one second apart
            if ticks.exists() and ticks.read_text().count("tick") >= 2:
                break
            time.sleep(0.1)
        assert ticks.read_text().count("tick") >= 2
    finally:
        os.kill(pid, signal.SIGTERM)
