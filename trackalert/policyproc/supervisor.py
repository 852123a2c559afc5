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
import itertools
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trackalert import log
from trackalert.eventlog.windows import calls_by_helper
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
        self._console_ids = itertools.count(1)
        self._console_waiting: dict[int, asyncio.Future[str | None]] = {}
        self._console_changed = False  # a console command ran in its states

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
            await self._inbox.join()  # what it sent before it went is applied first
            self._abandon_console(process.pid)
            if not self._running:
                return
            self.restarts += 1
            self._ready.clear()
            self._host.metrics.set_lua_busy_states(0, source="policy process")  # went with it
            log.logger.error("The policy process (pid %d) exited with status %s; restarting it "
                             "in %.0f s (it resumes after the saved cursor)",
                             process.pid, status, RESTART_DELAY)
            if self._console_changed:
                log.logger.warning("The restarted policy process runs the configuration file "
                                   "only: what console commands changed in its states is gone")
                self._console_changed = False
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

    # -- the console

    async def run_console(self, code: str) -> str | None:
        """A console command in the policy process's worker states (after the core's, as the
        executor runs it): the error reply that stopped it there, or None. A process that is not
        running cannot take it; the console says so rather than changing half the states."""
        channel = self._channel
        if channel is None or channel.closed.is_set() or not self._ready.is_set():
            return ("Error: the policy process is restarting, so the command did not reach "
                    "its states; try again\n")
        ident = next(self._console_ids)
        waiter: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._console_waiting[ident] = waiter
        channel.send((protocol.CONSOLE, ident, code))
        try:
            refused = await waiter
        finally:
            self._console_waiting.pop(ident, None)
        self._console_changed = self._console_changed or refused is None
        return refused

    def _abandon_console(self, pid: int) -> None:
        for waiter in self._console_waiting.values():
            if not waiter.done():
                waiter.set_result(f"Error: the policy process (pid {pid}) exited while running "
                                  "the command; the restarted one runs the configuration only\n")

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
            elif kind == protocol.CONSOLE_RAN:
                waiter = self._console_waiting.get(message[1])
                if waiter is not None and not waiter.done():
                    waiter.set_result(message[2])
            elif kind == protocol.SHUTDOWN:
                log.logger.info("The policy process asked for a shutdown (shutdown() in Lua)")
                self._host.shutdown()
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
        for kind, count in delta.get("slow", {}).items():
            for _ in range(count):
                metrics.lua_slow_call(kind)
        if "busy" in delta:
            metrics.set_lua_busy_states(delta["busy"], source="policy process")
        if "projection_calls" in delta:
            self.projection_calls.clear()
            self.projection_calls.update(delta["projection_calls"])
        if "projection" in delta:  # sent every DESCRIBE_EVERY s (policyproc/child.py)
            self.projection = delta["projection"]

    def describe_projection(self) -> dict[str, Any]:
        """The child's last description (sent when its shapes change, else every few seconds),
        with the helper calls as of its last cursor: the counters arrive with every cursor."""
        if not self.projection:
            return {}
        return {**self.projection, "calls": calls_by_helper(self.projection_calls)}
