"""The core process's side of the web workers: spawn them, append for them, keep them in step.

Each worker gets the listening sockets and its end of a socketpair. Over the socketpair it sends
validated reports, already enriched and encoded as rows (`trackalert.ingest.Handover`, with the
databases the core's settings name); the core appends the reports of each read from a worker as
one group and answers each with its seq once it is durable, so a worker's 200 means exactly what
the single-process 200 means. Every half second the core pushes the settings a worker needs (ACL,
password, body and connection limits, enrichment) when they have changed, e.g. by `setACL` on
the console, and merges the workers' statistics into its own, so `stats`, `/metrics` and the
5-minute log lines count every process. A worker that dies is logged and replaced.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trackalert import log
from trackalert.frontend import ipc
from trackalert.frontend.accept import ConnectionCounts, create_counts
from trackalert.settings import Listener

if TYPE_CHECKING:
    from trackalert.ingest import Ingest
    from trackalert.lua.host import Host
    from trackalert.web import WebServer

RESPAWN_DELAY = 1.0
SETTINGS_EVERY = 0.5
#: The enrichment snapshot of a core that enriches nothing (see `Enricher.snapshot`).
NO_ENRICHMENT = {"databases": {}, "generation": 0, "devices": False, "regexes": ""}


@dataclass
class LogOptions:
    """How workers log: the same as the core."""

    level: int = 6
    verbose: bool = False
    timestamps: bool = False
    console: bool = True
    facility: str = "daemon"

    def arguments(self) -> list[str]:
        args = ["--loglevel", str(self.level), "--facility", self.facility]
        args += ["--verbose"] * self.verbose + ["--timestamps"] * self.timestamps
        return args + ["--console"] * self.console


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    channel: ipc.Channel | None = None
    task: asyncio.Task[None] | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    connections: int = 0
    sent_settings: dict[str, Any] | None = None


class WebWorkers:
    def __init__(
        self,
        host: "Host",
        ingest: "Ingest",
        web: "WebServer",
        count: int,
        listeners: list[Listener],
        sockets: list[socket.socket],
        log_options: LogOptions,
    ) -> None:
        self._host = host
        self._ingest = ingest
        self._web = web
        self._count = count
        self._listeners = listeners
        self._sockets = sockets
        self._log_options = log_options
        self._workers: dict[int, _Worker] = {}
        self._running = False
        self._tasks: list[asyncio.Task[None]] = []
        self._dir = ""
        self.proxy_path = ""
        self._counts: ConnectionCounts | None = None
        self._counts_path = ""

    def connections(self) -> int:
        return sum(worker.connections for worker in self._workers.values())

    async def start(self, timeout: float = 30.0) -> None:
        self._dir = tempfile.mkdtemp(prefix="trackalert-")  # 0700: only we can reach the socket
        self.proxy_path = os.path.join(self._dir, "core.sock")
        self._counts_path = os.path.join(self._dir, "connections")
        self._counts = create_counts(self._counts_path, self._count)
        await self._web.start_internal(self.proxy_path)
        self._running = True
        for index in range(self._count):
            self._spawn(index)
        try:
            await asyncio.wait_for(
                asyncio.gather(*(w.ready.wait() for w in self._workers.values())), timeout
            )
        except asyncio.TimeoutError:
            raise RuntimeError(f"the web workers did not start within {timeout:.0f} s") from None
        self._tasks.append(asyncio.create_task(self._push_settings(), name="worker-settings"))
        log.logger.info("Started %d web worker processes", self._count)

    async def stop(self, timeout: float = 10.0) -> None:
        self._running = False
        for task in self._tasks:
            task.cancel()
        for worker in self._workers.values():
            if worker.process.poll() is None:
                worker.process.terminate()
        loop = asyncio.get_running_loop()
        for worker in self._workers.values():
            try:
                await asyncio.wait_for(loop.run_in_executor(None, worker.process.wait), timeout)
            except asyncio.TimeoutError:
                worker.process.kill()
            if worker.task:
                await asyncio.gather(worker.task, return_exceptions=True)
        shutil.rmtree(self._dir, ignore_errors=True)

    # ---- workers ----------------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        parent, child = socket.socketpair()
        fds = [sock.fileno() for sock in self._sockets]
        command = [
            sys.executable, "-m", "trackalert.frontend.worker", "--index", str(index),
            "--ipc-fd", str(child.fileno()), "--listen-fds", ",".join(map(str, fds)),
            *self._log_options.arguments(),
        ]
        process = subprocess.Popen(
            command, pass_fds=[child.fileno(), *fds], env=ipc.inherit_env(), stdin=subprocess.DEVNULL
        )
        child.close()
        worker = _Worker(index, process)
        self._workers[index] = worker  # registered now: start() waits for its HELLO
        worker.task = asyncio.create_task(self._connect(worker, parent), name=f"web-worker-{index}")

    async def _connect(self, worker: _Worker, sock: socket.socket) -> None:
        worker.channel = await ipc.open_channel(
            sock, functools.partial(self._on_message, worker),
            functools.partial(self._on_messages, worker),
        )
        await worker.channel.closed.wait()
        await self._worker_gone(worker)

    def _on_messages(self, worker: _Worker, messages: list[tuple[Any, ...]]) -> None:
        """One read's messages: its reports are appended together (one group, one callback)."""
        appends = []
        for message in messages:
            if message[0] == ipc.APPEND:
                appends.append(message)
            else:
                self._on_message(worker, message)
        if appends and worker.channel is not None:
            self._append(worker.channel, appends)

    def _on_message(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == ipc.STATS:
            worker.connections = message[1]["connections"]
            self._merge(message[1])
        elif kind == ipc.HELLO:
            self._send_settings(worker)
            worker.ready.set()

    async def _worker_gone(self, worker: _Worker) -> None:
        worker.connections = 0
        if self._counts is not None:  # its connections died with it
            self._counts.set(worker.index, 0)
        if self._running:
            await asyncio.get_running_loop().run_in_executor(None, worker.process.wait)
            log.logger.error(
                "Web worker %d (pid %d) exited with status %s; starting a new one",
                worker.index, worker.process.pid, worker.process.returncode,
            )
            await asyncio.sleep(RESPAWN_DELAY)
            if self._running:
                self._spawn(worker.index)

    def _append(self, channel: ipc.Channel, messages: list[tuple[Any, ...]]) -> None:
        try:
            self._ingest.submit_prepared(messages, functools.partial(self._appended, channel, messages))
        except Exception as exc:  # e.g. the log is closing: every report of the read fails
            self._appended(channel, messages, [exc] * len(messages))

    @staticmethod
    def _appended(channel: ipc.Channel, messages: list[tuple[Any, ...]], outcomes: list[Any]) -> None:
        """The answers of one group: the request ids of the durable ones in one STORED message,
        each failure in its own APPENDED with why (a worker needs nothing else: not the seq)."""
        stored: list[int] = []
        for message, outcome in zip(messages, outcomes):
            if isinstance(outcome, BaseException):
                channel.send((ipc.APPENDED, message[1], 0, False, str(outcome)))
            else:
                stored.append(message[1])
        if stored:
            channel.send((ipc.STORED, stored))

    def _merge(self, delta: dict[str, Any]) -> None:
        """A worker's statistics, counted as if this process had served the requests."""
        host = self._host
        if delta["reports"]:
            host.count_command("report", delta["reports"])
        host.perf.record_responses(delta["durations"])
        host.metrics.response_durations(delta["durations"])
        host.metrics.append_durations(delta["append_durations"])
        for reason, count in delta["rejected"].items():
            host.metrics.report_rejected(reason, count)

    # ---- settings ---------------------------------------------------------------------

    def settings_snapshot(self) -> dict[str, Any]:
        settings = self._host.settings
        return {
            "acl": settings.acl.entries(),
            "password": settings.password,
            "body_limit": settings.body_limit,
            "read_timeout": settings.read_timeout,
            "idle_timeout": settings.idle_timeout,
            "report_secrets": list(settings.report_secrets),
            "max_conns": settings.max_conns,
            "connections_path": self._counts_path,
            "report_shadowed": "report" in settings.custom_endpoints,
            "listeners": [(l.tls, l.cert_file, l.key_file, dict(l.options)) for l in self._listeners],
            "proxy_path": self.proxy_path,
            "enrichment": (self._host.enricher.snapshot() if self._host.enricher is not None
                           else NO_ENRICHMENT),
        }

    def _send_settings(self, worker: _Worker) -> None:
        snapshot = self.settings_snapshot()
        if worker.channel is not None and snapshot != worker.sent_settings:
            worker.channel.send((ipc.SETTINGS, snapshot))
            worker.sent_settings = snapshot

    async def _push_settings(self) -> None:
        while True:
            await asyncio.sleep(SETTINGS_EVERY)
            for worker in list(self._workers.values()):
                if worker.ready.is_set():
                    self._send_settings(worker)
