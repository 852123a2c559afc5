"""Starting, running and stopping the trackalert server.

Start-up follows the C++ daemon's order where it matters (config state, then worker states, then
listeners, READY) with its bugs fixed: `setNumLuaStates` counts because worker states are created
after the config ran; listeners are bound before `-d` forks, and the parent only exits once the
child is ready, so a busy port or a broken log is a non-zero exit, not a silent death; nothing
that runs threads exists before the fork, so background work survives it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Coroutine

from trackalert import log, notify
from trackalert.clock import Clock, RealClock
from trackalert.gc_tuning import tune_gc
from trackalert.devices import DeviceParser
from trackalert.enrich import Enricher
from trackalert.eventlog import open_event_log
from trackalert.eventlog.base import EventLog
from trackalert.eventlog.retention import run_retention
from trackalert.lua.host import Host
from trackalert.lua.pool import LuaPool
from trackalert.lua.runner import PolicyRunner
from trackalert.lua.state import LuaError, LuaState, LuaSyntaxError, StateKind
from trackalert.lua.watchdog import watch_states
from trackalert.perfstats import log_every
from trackalert.policyproc.supervisor import Launch, PolicyProcess
from trackalert.settings import Settings
from trackalert.console.service import ConsoleService, bind_control_sockets  # the console
from trackalert.ingest import Ingest
from trackalert.frontend.supervisor import LogOptions, WebWorkers
from trackalert.web import WebServer, bind_listeners, socket_addresses
from trackalert.scheduler import Scheduler
from trackalert.webhooks import WebHooks

STATS_INTERVAL = 300.0


class StartupError(Exception):
    """A problem that stops the daemon from starting; the message is for the operator."""


@dataclass
class Options:
    config_file: str
    config_dir: str
    mode: str = "foreground"  # foreground | systemd | daemon | docker
    regexes: str = ""
    loglevel: int = 6
    facility: str = "daemon"


class Daemon:
    def __init__(self, options: Options, clock: Clock | None = None) -> None:
        self.options = options
        settings = Settings(config_file=options.config_file, config_dir=options.config_dir,
                            verbose=log.verbose())
        self.host = Host(settings=settings, clock=clock or RealClock())
        self.host.scheduler = Scheduler(
            self.host.clock, self.host.metrics, lambda: settings.num_scheduler_threads
        )
        self.host.webhooks = WebHooks(settings, self.host.metrics, self.host.clock)
        self.config_state = LuaState(StateKind.CONFIG, self.host)
        self.workers: list[LuaState] = []
        self.sockets: list[socket.socket] = []
        self.control_sockets: list[socket.socket] = []
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.web: WebServer | None = None
        self.host.on_endpoint = self._endpoint_registered
        self.host.shutdown = self.request_stop

    # ---- before the event loop (and before any fork) --------------------------------------

    def load_config(self) -> None:
        """Run the config in the config state, then in each of N worker states."""
        self._run_config(self.config_state)
        settings = self.host.settings
        settings.add_default_acl()
        log.notice("ACL allowing queries from: " + ", ".join(settings.acl.entries()))
        for index in range(settings.num_lua_states):
            state = LuaState(StateKind.WORKER, self.host, index)
            self._run_config(state)
            self.workers.append(state)
        log.logger.info("Read configuration from '%s'", self.options.config_file)
        try:
            devices = DeviceParser(self.options.regexes)
        except Exception as exc:  # a broken -R file: say so instead of a traceback
            raise StartupError(
                f"Cannot load the ua-parser regexes from '{self.options.regexes}': {exc}"
            ) from exc
        self.host.enricher = Enricher(self.host.geoip, settings.enrichment, devices)

    def _run_config(self, state: LuaState) -> None:
        run_config(state, self.options.config_file)

    def bind(self) -> None:
        if not self.host.settings.listeners:
            log.logger.warning("No listener configured (addListener): the REST API is not served")
        self.sockets = bind_listeners(self.host.settings.listeners)
        self.control_sockets = bind_control_sockets(self.host.settings.control_sockets)

    # ---- the running server --------------------------------------------------------------

    async def run(self, ready: Callable[[], None] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self.request_stop)
        settings = self.host.settings
        url = settings.eventlog_url or settings.default_eventlog_url()
        try:
            eventlog = open_event_log(url, self.host.clock)
            await eventlog.open()
        except Exception as exc:
            raise StartupError(f"Cannot open the event log {url}: {exc}") from exc
        self.host.eventlog = eventlog
        leases = getattr(eventlog, "leases", None)  # a log shared by nodes: runs once per cluster
        if leases is not None and self.host.scheduler is not None:
            self.host.scheduler.set_lease(leases.claim)
        assert self.host.webhooks is not None
        self.host.webhooks.alerts = eventlog.alerts()  # runCustomWebHook records there
        pool = LuaPool(self.workers, self.host.clock)
        runner, describe = await self._start_runner(eventlog, pool, url)
        self.host.metrics.set_lag_source(runner.lag_events, runner.lag_seconds)
        self.host.metrics.set_eventlog_source(lambda: eventlog.stats)
        await self._start_alerting(pool)
        ingest = Ingest(self.host, eventlog)
        self.web = WebServer(self.host, ingest, pool)
        for name in settings.custom_endpoints:
            self.web.add_custom_endpoint(name)
        front = await self._start_web(ingest)
        # the local console only for a foreground daemon (it checks for a terminal itself)
        console = ConsoleService(
            self.host, self.config_state, pool, eventlog, lambda: (runner.lag_events(), runner.lag_seconds()),
            describe, runner.run_console if isinstance(runner, PolicyProcess) else None,
        )
        await console.start(self.control_sockets, local_console=self.options.mode == "foreground")
        tasks = self._background_tasks(eventlog, pool)
        tune_gc()
        if self.sockets:
            notify.status("Listening on " + ", ".join(socket_addresses(self.sockets)))
        notify.ready()
        if ready:
            ready()
        log.logger.info("trackalert is ready: event log %s, %d Lua worker states", eventlog.location, len(pool))
        try:
            await self._stop.wait()
        finally:
            log.notice("Shutting down")
            notify.stopping()
            await console.stop()  # console first: the reply to shutdown() is still delivered
            if front:  # first: their in-flight reports still need the event log
                await front.stop()
            await self.web.stop()
            await runner.stop()
            await self._stop_alerting()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.host.webhooks.alerts = None
            await eventlog.close()
            pool.close()

    async def _start_runner(
        self, eventlog: EventLog, pool: LuaPool, url: str,
    ) -> tuple[PolicyRunner | PolicyProcess, Callable[[], dict[str, Any]] | None]:
        """The policy runner here, or in a process of its own (SQLite only: the process reads
        the file beside the writer; the default there, as it leaves the core's interpreter to
        ingestion); and what describes its projection."""
        settings = self.host.settings
        if settings.policy_process and eventlog.backend != "sqlite":
            log.logger.warning("setPolicyProcess(true) needs a SQLite event log; the policy "
                               "runs in the core process")
        own_process = settings.policy_process is not False and eventlog.backend == "sqlite"
        if own_process:
            launch = Launch(os.path.abspath(self.options.config_file), settings.config_dir, url,
                            self._log_options().arguments())
            process = PolicyProcess(self.host, eventlog, launch)
            self.host.metrics.set_projection_calls(process.projection_calls)
            try:
                await process.start()
            except RuntimeError as exc:
                await process.stop()
                raise StartupError(str(exc)) from exc
            log.logger.info("The policy runs in its own process")
            return process, process.describe_projection
        runner = PolicyRunner(eventlog, pool, self.host)
        if runner.projection is not None:
            self.host.metrics.set_projection_calls(runner.projection.calls)
        await runner.start()
        return runner, runner.projection.describe if runner.projection else None

    async def _start_web(self, ingest: Ingest) -> WebWorkers | None:
        """Serve HTTP here, or from web worker processes that hand reports to this one."""
        settings = self.host.settings
        assert self.web is not None
        if not settings.num_web_processes:
            await self.web.start(settings.listeners, self.sockets)
            return None
        await self.web.start([], [])
        front = WebWorkers(
            self.host, ingest, self.web, settings.num_web_processes, settings.listeners,
            self.sockets, self._log_options(),
        )
        try:
            await front.start()
        except RuntimeError as exc:
            await front.stop()
            raise StartupError(str(exc)) from exc
        self.host.metrics.set_connection_source(front.connections)
        return front

    def _log_options(self) -> LogOptions:
        mode = self.options.mode
        return LogOptions(
            level=self.options.loglevel, verbose=log.verbose(), timestamps=mode == "docker",
            console=mode in ("foreground", "docker"), facility=self.options.facility,
        )

    def request_stop(self) -> None:
        """Ask for a graceful stop; safe from any thread (shutdown() runs in Lua threads)."""
        if self._loop is None or self._stop is None:
            os._exit(0)
        self._loop.call_soon_threadsafe(self._stop.set)

    def _endpoint_registered(self, name: str) -> None:
        """setCustomEndpoint from the console at runtime: route the new name too."""
        if self.web is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self.web.add_custom_endpoint, name)

    def _background_tasks(self, eventlog: EventLog, pool: LuaPool) -> list[asyncio.Task[None]]:
        clock = self.host.clock
        tasks = [
            asyncio.create_task(log_every(clock, STATS_INTERVAL, self._stats_lines), name="stats-log"),
            asyncio.create_task(watch_states(
                pool, clock, lambda: self.host.settings.slow_call_seconds, self.host.metrics,
            ), name="lua-watchdog"),
        ]
        if self.host.settings.retention_seconds:
            tasks.append(asyncio.create_task(
                run_retention(eventlog, clock, self.host.settings.retention_seconds), name="retention",
            ))
        return tasks

    def _stats_lines(self) -> list[str]:
        lines = [self.host.perf.log_line()]
        for stats in (self.host.command_stats, self.host.custom_stats):
            line = stats.log_line()
            if line:
                lines.append(line)
        return lines

    async def _start_alerting(self, pool: LuaPool) -> None:
        """Start the custom webhook sender (outbox left from before a restart included) and the
        background function schedules."""
        assert self.host.webhooks is not None and self.host.scheduler is not None
        try:
            await self.host.webhooks.start()
        except RuntimeError as exc:
            raise StartupError(str(exc)) from exc
        await self.host.scheduler.start(pool)

    async def _stop_alerting(self) -> None:
        """Stop scheduling, then sending; undelivered webhooks stay in the outbox."""
        if self.host.scheduler is not None:
            await self.host.scheduler.stop()
        if self.host.webhooks is not None:
            await self.host.webhooks.stop()


def run_config(state: LuaState, name: str) -> None:
    """Run the config file `name` in `state`; a StartupError says what is wrong, file:line
    included (the replay tool loads configs the same way)."""
    try:
        state.run_file(name, os.path.basename(name))
    except OSError as exc:
        raise StartupError(f"Unable to read configuration from '{name}': {exc.strerror}") from exc
    except LuaSyntaxError as exc:
        raise StartupError(f"Syntax error in configuration: {exc}") from exc
    except LuaError as exc:
        raise StartupError(f"Fatal Lua error: {exc}") from exc


def run_server(options: Options) -> int:
    """Start the server in the mode asked for; the process exit status."""
    try:
        daemon = Daemon(options)
        daemon.load_config()
        daemon.bind()
    except StartupError as exc:
        log.logger.error("%s", exc)
        return 1
    except OSError as exc:
        log.logger.error("%s", exc)
        return 1
    if options.mode == "daemon":
        return _daemonize(daemon)
    if options.mode == "systemd":
        log.set_console(False)
    elif options.mode == "foreground":
        log.logger.info("Running in the foreground")
    return _exit(daemon, _serve(daemon, None))


def _exit(daemon: Daemon, status: int) -> int:
    """A Lua call stuck in a LuaJIT loop can never be joined: leave without waiting for it."""
    if any(state.lock.locked() for state in daemon.workers):
        log.logger.warning("A Lua state is still running; exiting without waiting for it")
        logging.shutdown()
        os._exit(status)
    return status


def _serve(daemon: Daemon, ready: Callable[[], None] | None) -> int:
    try:
        _event_loop_runner()(daemon.run(ready))
    except StartupError as exc:
        log.logger.error("%s", exc)
        return 1
    return 0


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, None]], None]:
    try:
        import uvloop

        return uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.run


def _daemonize(daemon: Daemon) -> int:
    """Fork; the parent exits 0 only when the child reports it is serving."""
    read_fd, write_fd = os.pipe()
    if os.fork() > 0:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        if message.startswith("READY"):
            return 0
        sys.stderr.write(message or "trackalert: the daemon exited during start-up\n")
        return 1
    os.close(read_fd)
    os.setsid()
    log.set_console(False)
    _redirect_stdio()

    def ready() -> None:
        os.write(write_fd, b"READY")
        os.close(write_fd)

    try:
        status = _exit(daemon, _serve(daemon, ready))
    except BaseException as exc:  # report anything to the waiting parent
        os.write(write_fd, f"trackalert: {exc}\n".encode())
        raise
    if status != 0:
        try:
            os.write(write_fd, b"trackalert: start-up failed, see the system log\n")
        except OSError:
            pass
    os._exit(status)


def _redirect_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
