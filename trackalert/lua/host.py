"""The daemon services that Lua functions may touch, shared by every Lua state.

Lua globals never import the daemon: they reach settings, statistics and the log through this one
object, which the daemon builds and tests can build for real without a web server.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

from trackalert import log
from trackalert.clock import Clock, RealClock
from trackalert.geoip import GeoIPRegistry
from trackalert.metrics import Metrics
from trackalert.perfstats import NamedStats, PerfStats
from trackalert.settings import Settings

if TYPE_CHECKING:
    from trackalert.enrich import Enricher
    from trackalert.eventlog.base import EventLog
    from trackalert.netaddr import ComboAddress
    from trackalert.webhooks import WebHooks


class BackgroundScheduler(Protocol):
    """What the schedule globals need of the scheduler.

    The scheduler runs Lua background functions, so it sits above the Lua layer (DESIGN §10);
    the Lua side knows it only by this protocol, and the daemon (or replay, or a test) plugs
    `trackalert.scheduler.Scheduler` in.
    """

    def add_cron(self, expression: str, name: str) -> object:
        """Schedule `name` by a cron expression; a bad expression raises, naming it."""

    def add_interval(self, seconds: int, name: str, text: str = "") -> object:
        """Schedule `name` every `seconds`."""

    def show(self) -> str:
        """The `showSchedules()` table."""


def _exit_now() -> None:
    raise SystemExit(0)


@dataclass
class Host:
    settings: Settings = field(default_factory=Settings)
    clock: Clock = field(default_factory=RealClock)
    metrics: Metrics = field(default_factory=Metrics)
    eventlog: "EventLog | None" = None
    #: Background functions and custom webhooks; the daemon (or a test, or replay) sets them.
    scheduler: BackgroundScheduler | None = None
    webhooks: "WebHooks | None" = None
    #: Called by shutdown(); the daemon replaces it with a graceful stop.
    shutdown: Callable[[], None] = _exit_now
    #: Called when setCustomEndpoint runs in the config state (the web layer routes the name).
    on_endpoint: Callable[[str], None] = lambda name: None
    reports: int = 0
    started: float = 0.0
    perf: PerfStats = field(init=False)
    command_stats: NamedStats = field(init=False)
    custom_stats: NamedStats = field(init=False)
    #: The console output buffer that show*/stats/makeKey fill (reference §9.3).
    console_output: list[str] = field(default_factory=list)
    # Console hooks, set by trackalert.console while the daemon runs: bind a control socket
    # added from the console; summarise the event log for showEventLog() (callable from a Lua
    # thread).
    on_control_socket: "Callable[[ComboAddress], None]" = lambda address: None
    eventlog_summary: "Callable[[], dict[str, Any]] | None" = None
    #: GeoIP databases opened by newGeoIP2DB (one registry for every state) and the ingest
    #: enricher built from them (None: reports are stored as parsed).
    geoip: GeoIPRegistry = field(default_factory=GeoIPRegistry)
    enricher: "Enricher | None" = None
    #: Outside report(lt), the helpers see only events with a seq below this (None: the whole
    #: log). A replay sets it to the first event received at or after its virtual now, so that a
    #: background function never sees an event the replayed file holds beyond that time.
    horizon: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.perf = PerfStats(self.clock)
        self.command_stats = NamedStats(self.clock, "command")
        self.custom_stats = NamedStats(self.clock, "custom")
        self.started = self.clock.monotonic()

    def console_replace(self, text: str) -> None:
        self.console_output[:] = [text]

    def console_append(self, text: str) -> None:
        self.console_output.append(text)

    def take_console_output(self) -> str:
        text = "".join(self.console_output)
        self.console_output.clear()
        return text

    def count_report(self, count: int = 1) -> None:
        with self._lock:
            self.reports += count
        self.metrics.report_accepted(count)

    def lua_error(self, function: str, message: str) -> None:
        """The crash boundary's sink: every Lua error is logged with its location and counted."""
        log.logger.error("Lua function [%s] exception: %s", function, message)
        self.metrics.lua_error(function)

    def declare_custom_stat(self, name: str) -> None:
        if name not in self.settings.custom_stats:
            self.settings.custom_stats.append(name)
        self.custom_stats.register(name)
        self.metrics.register_custom_stat(name)

    def inc_custom_stat(self, name: str) -> None:
        self.custom_stats.add(name)
        self.metrics.inc_custom_stat(name)

    def register_command(self, name: str) -> None:
        self.command_stats.register(name)
        self.metrics.register_command(name)

    def count_command(self, name: str, count: int = 1) -> None:
        self.command_stats.add(name, count)
        self.metrics.command(name, count)

    def uptime(self) -> float:
        return self.clock.monotonic() - self.started
