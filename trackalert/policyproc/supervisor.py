"""The core's side of the policy process: start it, wake it, apply what it sends, restart it.

The core keeps what must stay in one place: it owns the log's writer, so it saves the cursor
the policy process reports; it owns the outbox and the alert records, so it stores the
runCustomWebHook calls sent to it; it serves /metrics and the console, so it adds the process's
counters to its own and answers `lag` and the projection's description from the last figures.
Messages are applied strictly in the order they were sent (one consumer): a cursor is saved
only after every webhook sent before it is in the outbox, so a kill -9 of either process
re-runs reports, never skips their alerts.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trackalert import log
from trackalert.frontend import ipc
from trackalert.lua.runner import CURSOR_NAME
from trackalert.policyproc import protocol

if TYPE_CHECKING:
    from trackalert.eventlog.base import Event, EventLog
    from trackalert.lua.host import Host

RESTART_DELAY = 1.0
#: Commits remembered for lag_seconds (the oldest waits longest; beyond this many the lag in
#: seconds is measured from the oldest remembered, an underestimate only at huge lags).
RECEIVED_MAX = 100_000


@dataclass
class Launch:
    """What the policy process is started with (the core's own config and log)."""

    config_file: str
    config_dir: str
    eventlog_url: str
    log_arguments: list[str]


class PolicyProcess:
    def __init__(self, host: "Host", eventlog: "EventLog", launch: Launch) -> None:
        self._host = host
        self._log = eventlog
        self._launch = launch
        self._process: subprocess.Popen[bytes] | None = None
        self._channel: ipc.Channel | None = None
        self._ready = asyncio.Event()
        self._inbox: asyncio.Queue[tuple[ipc.Channel, list[tuple[Any, ...]]]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False
        self._received: collections.deque[tuple[int, float]] = collections.deque(maxlen=RECEIVED_MAX)
        self.head = 0
        self.done = 0
        self.restarts = 0
        #: The last projection figures the process sent (for the console and /metrics).
        self.projection_calls: dict[tuple[str, str], int] = {}
        self.projection: dict[str, Any] | None = None

    # -- life cycle

    async def start(self, timeout: float = 60.0) -> None:
        self.head = await self._log.last_seq()
        self.done = await self._log.load_cursor(CURSOR_NAME)
        self._log.add_listener(self._on_commit)
        self._running = True
        self._tasks.append(asyncio.create_task(self._consume(), name="policy-process-inbox"))
        self._tasks.append(asyncio.create_task(self._keep_running(), name="policy-process"))
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            raise RuntimeError(f"the policy process did not start within {timeout:.0f} s") from None

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: the process finishes its batch, sends its cursor and exits; then the
        messages still queued are applied, so nothing it reported is lost."""
        self._running = False
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            loop = asyncio.get_running_loop()
            try:
                await asyncio.wait_for(loop.run_in_executor(None, process.wait), timeout)
            except asyncio.TimeoutError:
                log.logger.warning("The policy process did not stop within %.0f s; killed", timeout)
                process.kill()
        if self._channel is not None:
            await self._channel.closed.wait()
        self._tasks[1].cancel()
        await asyncio.gather(self._tasks[1], return_exceptions=True)
        await self._inbox.join()
        self._tasks[0].cancel()
        await asyncio.gather(self._tasks[0], return_exceptions=True)

    async def _keep_running(self) -> None:
        """Run the process; when it dies, say so and start another (it resumes at the cursor)."""
        while self._running:
            process, channel = await self._spawn()
            await channel.closed.wait()
            loop = asyncio.get_running_loop()
            status = await loop.run_in_executor(None, process.wait)
            if not self._running:
                return
            self.restarts += 1
            self._ready.clear()
            log.logger.error("The policy process (pid %d) exited with status %s; restarting it "
                             "in %.0f s (it resumes after the saved cursor)",
                             process.pid, status, RESTART_DELAY)
            await asyncio.sleep(RESTART_DELAY)

    async def _spawn(self) -> tuple[subprocess.Popen[bytes], ipc.Channel]:
        parent, child = socket.socketpair()
        launch = self._launch
        command = [
            sys.executable, "-m", "trackalert.policyproc.child", "--ipc-fd", str(child.fileno()),
            "--config", launch.config_file, "--config-dir", launch.config_dir,
            "--eventlog", launch.eventlog_url, *launch.log_arguments,
        ]
        process = subprocess.Popen(command, pass_fds=[child.fileno()], env=ipc.inherit_env(),
                                   stdin=subprocess.DEVNULL)
        child.close()
        self._process = process
        channel = await ipc.open_channel(
            parent, lambda message: None, lambda messages: self._inbox.put_nowait((channel, messages))
        )
        self._channel = channel
        channel.send((protocol.HEAD, self.head))
        return process, channel

    # -- the core's commits

    def _on_commit(self, events: "list[Event]") -> None:
        self.head = max(self.head, events[-1].seq)
        self._received.append((events[-1].seq, events[0].received))
        if self._channel is not None:
            self._channel.send((protocol.HEAD, self.head))

    def lag_events(self) -> int:
        return max(0, self.head - self.done)

    def lag_seconds(self) -> float:
        """How long the oldest report not yet run has been waiting (from the commits seen)."""
        received = self._received
        while received and received[0][0] <= self.done:
            received.popleft()
        if not received or self.head <= self.done:
            return 0.0
        return max(0.0, self._host.clock.time() - received[0][1])

    # -- what the process sends

    async def _consume(self) -> None:
        while True:
            channel, messages = await self._inbox.get()
            try:
                await self._apply(channel, messages)
            except Exception as exc:  # a daemon fault; the cursor has not moved past it
                log.logger.error("Policy process: cannot apply its messages: %s", exc)
            finally:
                self._inbox.task_done()

    async def _apply(self, channel: ipc.Channel, messages: list[tuple[Any, ...]]) -> None:
        webhooks: list[tuple[Any, ...]] = []
        for message in messages:
            kind = message[0]
            if kind == protocol.WEBHOOK:
                webhooks.append(message)
                continue
            if webhooks:  # the outbox writes off the event loop, before what follows them
                await self._run_webhooks(channel, webhooks)
                webhooks = []
            if kind == protocol.CURSOR:
                self.done = message[1]
                self._log.save_cursor(CURSOR_NAME, message[1])
            elif kind == protocol.STATS:
                self._merge(message[1])
            elif kind == protocol.READY:
                self.done = message[1]
                self._ready.set()
        if webhooks:
            await self._run_webhooks(channel, webhooks)

    async def _run_webhooks(self, channel: ipc.Channel, messages: list[tuple[Any, ...]]) -> None:
        """Store the calls (off the event loop: the outbox syncs to disk) and answer each, to
        the process that sent them (a restarted one counts its calls from 1 again)."""
        outcomes = await asyncio.to_thread(self._store_webhooks, messages)
        for message, ok in zip(messages, outcomes):
            channel.send((protocol.STORED, message[1], ok))

    def _store_webhooks(self, messages: list[tuple[Any, ...]]) -> list[bool]:
        webhooks = self._host.webhooks
        assert webhooks is not None
        return [webhooks.run(name, body, cause, seq, time)
                for _, _, name, body, cause, seq, time in messages]

    def _merge(self, delta: dict[str, Any]) -> None:
        metrics = self._host.metrics
        for kind, count in delta.get("calls", {}).items():
            metrics.lua_calls(kind, count)
        for function, count in delta.get("errors", {}).items():
            for _ in range(count):
                metrics.lua_error(function)
        for name, count in delta.get("custom", {}).items():
            self._host.custom_stats.add(name, count)
            for _ in range(count):
                metrics.inc_custom_stat(name)
        if "projection_calls" in delta:
            self.projection_calls.clear()
            self.projection_calls.update(delta["projection_calls"])
        if "projection" in delta:  # sent every DESCRIBE_EVERY s (policyproc/child.py)
            self.projection = delta["projection"]

    def describe_projection(self) -> dict[str, Any]:
        return self.projection or {}
