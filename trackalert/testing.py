"""Helpers for testing trackalert and policies against a real daemon, shipped with the package.

`DaemonProcess` starts `python -m trackalert` as a subprocess on loopback and waits for its systemd
readiness message on a real notify socket, so tests never guess with sleeps: when `start()`
returns, the listeners, the event log and the Lua states are up, and the bound ports are known.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from aiohttp import web

if TYPE_CHECKING:
    from trackalert.eventlog.base import Event

DEFAULT_PASSWORD = "secret"


def basic_auth(password: str = DEFAULT_PASSWORD, user: str = "wforce") -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def wait_for(predicate: Callable[[], bool], timeout: float = 15.0, step: float = 0.02) -> bool:
    """Wait until an asynchronous effect (a policy run, a log line) shows; False on timeout.

    The policy runs after the HTTP answer, so a test must wait for its effect; this polls a
    bounded number of times rather than sleeping a guessed duration.
    """
    for _ in range(max(1, int(timeout / step))):
        if predicate():
            return True
        await asyncio.sleep(step)
    return predicate()


def listener_config(password: str = DEFAULT_PASSWORD) -> str:
    """The config lines for a loopback listener on an ephemeral port with a password."""
    return (
        'addListener("127.0.0.1:0", false, "", "", {})\n'
        f'setWebserverPassword("{password}")\n'
    )


class DaemonProcess:
    """One trackalert daemon in a subprocess, with its config and files in `directory`."""

    def __init__(
        self,
        directory: Path,
        config: str,
        args: Sequence[str] = ("-D",),
        env: dict[str, str] | None = None,
        config_name: str = "trackalert.conf",
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path = self.directory / config_name
        self.config_path.write_text(config, encoding="utf-8")
        self.args = list(args)
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.ports: list[int] = []
        self.output_path = self.directory / "daemon.out"
        self.notifications: list[str] = []

    @property
    def port(self) -> int:
        return self.ports[0]

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self, timeout: float = 60.0) -> "DaemonProcess":
        sock_path = self.directory / "notify.sock"
        sock_path.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(sock_path))
            env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), **self.env}
            with open(self.output_path, "ab") as out:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "trackalert", "-C", str(self.config_path), *self.args],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                )
            self._wait_ready(notify, timeout)
        return self

    def _wait_ready(self, notify: socket.socket, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        notify.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                message = notify.recv(4096).decode()
            except socket.timeout:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(
                        f"trackalert exited with {self.process.returncode} before it was ready:\n"
                        + self.output()
                    ) from None
                continue
            self.notifications.append(message)
            for line in message.splitlines():
                if line.startswith("STATUS=Listening on"):
                    self.ports = [int(a.rsplit(":", 1)[1]) for a in line.split(" on ", 1)[1].split(", ") if a]
                if line == "READY=1":
                    return
        self.kill()
        raise RuntimeError(f"trackalert was not ready within {timeout} s:\n" + self.output())

    def output(self) -> str:
        return self.output_path.read_text(errors="replace") if self.output_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: a graceful stop that saves the policy cursor."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def __enter__(self) -> "DaemonProcess":
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.stop()
            except subprocess.TimeoutExpired:
                self.kill()


def child_pids(parent: int, module: str) -> list[int]:
    """The children of `parent` running `python -m <module>` (the web workers are
    trackalert.frontend.worker, the policy process trackalert.policyproc.child)."""
    path = Path(f"/proc/{parent}/task/{parent}/children")
    pids = []
    for child in path.read_text().split() if path.exists() else []:
        try:
            words = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:  # it exited since
            continue
        if module.encode() in words:
            pids.append(int(child))
    return pids


def web_worker_pids(core: int) -> list[int]:
    return child_pids(core, "trackalert.frontend.worker")


def policy_process_pid(core: int) -> int | None:
    pids = child_pids(core, "trackalert.policyproc.child")
    return pids[0] if pids else None


class WebhookReceiver:
    """A webhook receiver on 127.0.0.1 that keeps every delivery (any path): the alerts a
    daemon under test sends, counted by what arrived, not by what the daemon says it sent."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> "WebhookReceiver":
        app = web.Application()
        app.router.add_post("/{path:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]
        return self

    def texts(self) -> list[str]:
        return [body.decode() for body in self.bodies]

    def json_bodies(self) -> list[Any]:
        return [json.loads(body) for body in self.bodies]

    async def _handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        self.headers.append(dict(request.headers))
        return web.Response(text="{}")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


# ----------------------------------------------------------------------- policy tests


class ReplayFailed(AssertionError):
    """The replay itself did not run through (a policy error, a bad source): its message."""


def replay_alerts(config: str | os.PathLike[str], log: str | os.PathLike[str] | Iterable[Event],
                  *options: str) -> list[dict]:
    """The alerts `config` sends over `log`, as `trackalert-replay --out` writes them.

    So that operators test their own policies from pytest with exactly the replay's behaviour,
    this runs the command's own code in-process. `log` is an SQLite log, an NDJSON export, or
    events (loaded into a temporary log); `options` are further command-line options
    (`"--from", "2026-01-01"`, `"--keep-going"`). A replay that fails raises ReplayFailed with
    the command's message and exit status.
    """
    import io
    import json
    import tempfile

    from trackalert.replay import cli
    from trackalert.replay.source import load_events

    with tempfile.TemporaryDirectory(prefix="trackalert-test-") as scratch:
        if not isinstance(log, (str, os.PathLike)):
            events, log = log, os.path.join(scratch, "events.db")
            load_events(events, log)
        out = os.path.join(scratch, "alerts.ndjson")
        args = cli.build_parser().parse_args(
            ["--config", os.fspath(config), "--log", os.fspath(log), "--out", out, "-q", *options])
        err = io.StringIO()
        status = cli.execute(args, io.StringIO(), err)
        if status != cli.OK:
            raise ReplayFailed(f"trackalert-replay exited with {status}:\n{err.getvalue()}")
        with open(out, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle]


def assert_alerts(config: str | os.PathLike[str], log: str | os.PathLike[str] | Iterable[Event],
                  expected: str | os.PathLike[str] | list[dict], *options: str) -> list[dict]:
    """Fail, with `trackalert-replay --expect`'s diff, unless `config` over `log` sends exactly
    the `expected` alerts (an NDJSON file or dicts; the fields a line leaves out are not
    compared). Returns the alerts, for further checks."""
    __tracebackhide__ = True
    from trackalert.replay import expect

    if isinstance(expected, (str, os.PathLike)):
        expected = expect.load_expected(expected)
    actual = replay_alerts(config, log, *options)
    ok, diff = expect.check(actual, expected)
    if not ok:
        raise AssertionError(diff)
    return actual
