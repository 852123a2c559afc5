"""The policy process: `report(lt)` over the event log, next to the core that writes it.

Started by `trackalert.policyproc.supervisor` as `python -m trackalert.policyproc.child`, with
its end of a socketpair as a file descriptor. It runs the operator's configuration in its own
config state and worker states (like the C++ daemon's worker states, the config runs in each),
opens the same SQLite log (it only reads it: WAL readers never block the writer) and runs the
unchanged PolicyRunner, woken by the core's HEAD messages instead of a commit listener. What
`report` does that belongs to the core goes there over the channel: runCustomWebHook calls (the
core writes the outbox and the alert records), cursor saves (the core's writer owns the file),
counters (Lua calls, errors and slow calls, custom stats) and shutdown(). Console commands come
the other way and run in these worker states too. Lua errors and runaway calls are logged here,
in the same format. If the core goes away the channel closes and this process stops.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import logging
import os
import signal
import socket
import sys
import threading
from typing import Any, Callable, Sequence

from trackalert import log
from trackalert.clock import RealClock
from trackalert.console.executor import refusal_in
from trackalert.eventlog import open_event_log
from trackalert.frontend import ipc
from trackalert.gc_tuning import tune_gc
from trackalert.lua.host import Host
from trackalert.lua.pool import LuaPool
from trackalert.lua.runner import PolicyRunner
from trackalert.lua.state import LuaError, LuaState, StateKind
from trackalert.lua.watchdog import watch_states
from trackalert.metrics import Metrics
from trackalert.policyproc import protocol
from trackalert.settings import Settings
from trackalert.webhooks import WebHooks

#: Worker states of the policy process: batches run one at a time, a second state takes over
#: from a batch stuck in a runaway report (PolicyRunner._wait_turn).
STATES = 2
STATS_EVERY = 0.5
#: How often the projection's description (showEventLog's shapes and sizes) goes with them:
#: it walks every key the shapes hold, which cost ~3 % of this process's samples every 0.5 s.
DESCRIBE_EVERY = 5.0
#: The longest a runCustomWebHook call waits for the core to store it.
STORE_TIMEOUT = 30.0


class Counters(Metrics):
    """The policy process's metrics, remembering what the core must add to its own."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._calls_delta: collections.Counter[str] = collections.Counter()
        self._errors_delta: collections.Counter[str] = collections.Counter()
        self._custom_delta: collections.Counter[str] = collections.Counter()
        self._slow_delta: collections.Counter[str] = collections.Counter()
        self._busy = 0

    def lua_calls(self, kind: str, count: int = 1) -> None:
        super().lua_calls(kind, count)
        with self._lock:
            self._calls_delta[kind] += count

    def lua_error(self, function: str) -> None:
        super().lua_error(function)
        with self._lock:
            self._errors_delta[function] += 1

    def inc_custom_stat(self, name: str) -> None:
        super().inc_custom_stat(name)
        with self._lock:
            self._custom_delta[name] += 1

    def lua_slow_call(self, kind: str) -> None:
        super().lua_slow_call(kind)
        with self._lock:
            self._slow_delta[kind] += 1

    def set_lua_busy_states(self, count: int, source: str = "core") -> None:
        super().set_lua_busy_states(count, source)
        self._busy = count

    def drain(self) -> dict[str, Any]:
        with self._lock:
            delta = {"calls": dict(self._calls_delta), "errors": dict(self._errors_delta),
                     "custom": dict(self._custom_delta), "slow": dict(self._slow_delta),
                     "busy": self._busy}
            for counter in (self._calls_delta, self._errors_delta, self._custom_delta,
                            self._slow_delta):
                counter.clear()
        return delta


class ForwardedWebHooks(WebHooks):
    """runCustomWebHook in the policy process: the core stores the call, this one waits for it.

    Waiting keeps the promises of the in-process runner: the call returns what the core's
    outbox said (false when full), and the alert is recorded before it returns, so countAlerts
    and recentAlerts in the next report see it (docs/alerts.md, "As of what"). It costs a round
    trip per alert, and alerts are rare next to reports. Without an answer within
    `STORE_TIMEOUT` (the core is gone) it returns false; the cursor cannot have passed the
    report then, so it runs again."""

    def __init__(self, settings: Settings, metrics: Metrics, clock: RealClock,
                 send: Callable[[tuple[Any, ...]], None]) -> None:
        super().__init__(settings, metrics, clock)
        self._send = send
        self._calls = itertools.count(1)
        self._waiting: dict[int, list[Any]] = {}  # call id -> [event, outcome]
        self._waiting_lock = threading.Lock()
        self._gone = False  # the core is gone: no call will be answered

    def run(self, name: str, body: bytes, cause: str | None = None, seq: int | None = None,
            time: float | None = None) -> bool:
        # The name is checked by the core, whose registry also holds the webhooks added from
        # the console at runtime (they run in the config state, and ours is not the core's).
        call = next(self._calls)
        waiter: list[Any] = [threading.Event(), False]
        with self._waiting_lock:
            if self._gone:  # without this, each call of a batch still running waits STORE_TIMEOUT
                return False  # and the orphaned process outlives its core by hours
            self._waiting[call] = waiter
        self._send((protocol.WEBHOOK, call, name, bytes(body), cause, seq, time))
        answered = waiter[0].wait(STORE_TIMEOUT)
        with self._waiting_lock:
            self._waiting.pop(call, None)
        if not answered:
            log.logger.error("runCustomWebHook: the core did not store webhook %s within %.0f s; "
                             "returned false", name, STORE_TIMEOUT)
        return bool(waiter[1])

    def stored(self, call: int, ok: bool) -> None:
        with self._waiting_lock:
            waiter = self._waiting.get(call)
        if waiter is not None:
            waiter[1] = ok
            waiter[0].set()

    def abandon(self) -> None:
        """The core is gone: nothing waiting will be answered."""
        with self._waiting_lock:
            self._gone = True
            waiters = list(self._waiting.values())
        for waiter in waiters:
            waiter[0].set()


class CoreLink:
    """The channel to the core; `send` may be called from any thread (Lua workers do)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.channel: ipc.Channel | None = None
        self.runner: PolicyRunner | None = None
        self.webhooks: ForwardedWebHooks | None = None
        #: Runs a CONSOLE message's code (set once the states are up).
        self.console: Callable[[int, str], None] | None = None
        self.head = 0

    def send(self, message: tuple[Any, ...]) -> None:
        channel = self.channel
        if channel is None:
            return
        if threading.get_ident() == threading.main_thread().ident:
            channel.send(message)
        else:
            try:
                self._loop.call_soon_threadsafe(channel.send, message)
            except RuntimeError:  # the loop is closing: the report runs again after a restart
                pass

    def on_message(self, message: tuple[Any, ...]) -> None:
        if message[0] == protocol.HEAD:
            self.head = max(self.head, message[1])
            if self.runner is not None:
                self.runner.notify_head(message[1])
        elif message[0] == protocol.STORED and self.webhooks is not None:
            self.webhooks.stored(message[1], message[2])
        elif message[0] == protocol.CONSOLE:
            if self.console is None:
                self.send((protocol.CONSOLE_RAN, message[1],
                           "Error: the policy process is starting; try again\n"))
            else:
                self.console(message[1], message[2])


class ConsoleCommands:
    """The console's commands in this process's worker states, each answered to the core."""

    def __init__(self, link: CoreLink, pool: LuaPool, settings: Settings) -> None:
        self._link = link
        self._pool = pool
        self._settings = settings
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, ident: int, code: str) -> None:
        task = asyncio.create_task(self._run(ident, code))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, ident: int, code: str) -> None:
        refused = await refusal_in(self._pool, self._settings.slow_call_seconds, code,
                                   " of the policy process")
        self._link.send((protocol.CONSOLE_RAN, ident, refused))


def load_states(host: Host, config_file: str) -> list[LuaState]:
    """The config state and the worker states, each having run the config (as the core's)."""
    name = os.path.basename(config_file)
    config = LuaState(StateKind.CONFIG, host)
    config.run_file(config_file, name)
    workers = []
    for index in range(STATES):
        state = LuaState(StateKind.WORKER, host, index)
        state.run_file(config_file, name)
        workers.append(state)
    return workers


class _NoSchedules:
    """Background functions run in the core's states; here their schedules are accepted and
    ignored (the config registers them in every state)."""

    def add_cron(self, expression: str, name: str) -> object:
        return None

    def add_interval(self, seconds: int, name: str, text: str = "") -> object:
        return None

    def show(self) -> str:
        return "Background functions run in the core process\n"


async def serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    link = CoreLink(loop)
    settings = Settings(config_file=args.config, config_dir=args.config_dir, verbose=log.verbose())
    clock = RealClock()
    host = Host(settings=settings, clock=clock, metrics=Counters())
    host.scheduler = _NoSchedules()
    host.shutdown = lambda: link.send((protocol.SHUTDOWN,))
    host.webhooks = link.webhooks = ForwardedWebHooks(settings, host.metrics, clock, link.send)
    try:
        workers = load_states(host, args.config)
    except (OSError, LuaError) as exc:
        log.logger.error("Policy process: cannot run the configuration: %s", exc)
        return 1
    eventlog = open_event_log(args.eventlog, clock)
    await eventlog.open()
    host.eventlog = eventlog
    host.webhooks.alerts = eventlog.alerts()  # countAlerts/recentAlerts read the core's records
    tune_gc()
    link.channel = await ipc.open_channel(socket.socket(fileno=args.ipc_fd), link.on_message)
    pool = LuaPool(workers, clock)
    runner = PolicyRunner(eventlog, pool, host, save_cursor=lambda seq: _done(link, host, runner, seq))
    link.runner = runner
    link.console = ConsoleCommands(link, pool, settings)
    await runner.start()
    runner.notify_head(link.head)
    link.send((protocol.READY, runner.done))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    stats = asyncio.create_task(_send_stats(link, host, runner))
    watchdog = asyncio.create_task(watch_states(
        pool, clock, lambda: settings.slow_call_seconds, host.metrics, " of the policy process",
    ))
    await asyncio.wait(
        [asyncio.create_task(stop.wait()), asyncio.create_task(link.channel.closed.wait())],
        return_when=asyncio.FIRST_COMPLETED,
    )
    stats.cancel()
    watchdog.cancel()
    if link.channel.closed.is_set():
        link.webhooks.abandon()
    await runner.stop()
    link.send((protocol.STATS, _stats(host, runner)))
    link.channel.close()
    host.webhooks.alerts = None
    await eventlog.close()
    pool.close()
    if any(state.lock.locked() for state in workers):
        # a report stuck in a LuaJIT loop can never be joined, and the interpreter's exit
        # joins the pool's threads: leave without it (as the core does, daemon._exit)
        log.logger.warning("A Lua state of the policy process is still running; exiting "
                           "without waiting for it")
        logging.shutdown()
        os._exit(0)
    return 0


#: The projection's shape counts when it was last described (by id: one per process).
_described: dict[int, tuple[int, int]] = {}


def _done(link: CoreLink, host: Host, runner: PolicyRunner, seq: int) -> None:
    """Events up to `seq` have run: their counters (custom stats, errors, projection answers)
    first, so that the core's figures are whole once its lag says they ran, then the cursor."""
    link.send((protocol.STATS, _stats(host, runner, describe=False)))
    link.send((protocol.CURSOR, seq))


def _stats(host: Host, runner: PolicyRunner, describe: bool = True) -> dict[str, Any]:
    """The counters since the last STATS; the projection's description too when `describe`,
    or when shapes went on or started building since it was last sent (the console shows it)."""
    assert isinstance(host.metrics, Counters)
    delta = host.metrics.drain()
    projection = runner.projection
    if projection is not None:
        calls = dict(projection.calls)  # one copy under the GIL: Lua threads add keys
        delta["projection_calls"] = {tuple(key): int(n) for key, n in calls.items()}
        counts = projection.shape_counts()
        if describe or counts != _described.get(id(projection)):
            _described[id(projection)] = counts
            # plain builtins for marshal (the description holds counters and the like)
            delta["projection"] = json.loads(json.dumps(projection.describe(), default=str))
    return delta


async def _send_stats(link: CoreLink, host: Host, runner: PolicyRunner) -> None:
    every = max(1, round(DESCRIBE_EVERY / STATS_EVERY))
    for tick in itertools.count():
        await asyncio.sleep(STATS_EVERY)
        link.send((protocol.STATS, _stats(host, runner, describe=tick % every == 0)))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trackalert-policy-process")
    parser.add_argument("--ipc-fd", type=int, required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--config-dir", required=True)
    parser.add_argument("--eventlog", required=True)
    ipc.add_log_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return ipc.run_child(parse_args(sys.argv[1:] if argv is None else argv), serve)


if __name__ == "__main__":
    raise SystemExit(main())
