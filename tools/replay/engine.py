"""The replay: a config's daemon runtime driven over a log on a virtual clock.

Why it is built this way:

* The same code as the daemon: the config runs in a config state and a worker state
  (`trackalert.lua.state`), `report` runs through the daemon's `PolicyRunner` batch code (its
  crash boundary, conversions and window projection, in lockstep in log order), background
  functions through the daemon's `Scheduler` and `LuaPool`. Only the edges differ: alerts,
  errors and log lines are captured (capture.py), nothing listens, nothing is sent.
* One worker state, one report call at a time, in log order: the results do not depend on
  the machine's speed (the projection answers exactly as the SQL, built or not).
* Time is a `VirtualClock` that follows the events' `received`: before an event, every
  background function due at or before its `received` runs (each sees the events received
  before its time, never one after: the helpers' horizon), then the event's `report`. At the
  end, functions due up to `--to` run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from trackalert import log
from trackalert.clock import VirtualClock
from trackalert.eventlog.base import Event
from trackalert.lua.runner import PolicyRunner
from trackalert.daemon import StartupError, run_config
from trackalert.lua.state import LuaState, StateKind
from trackalert.lua.values import guarded
from trackalert.replay.capture import (
    AlertCapture, Findings, LogCollector, Position, ReplayHost, ReplayPool,
)
from trackalert.replay.source import LogSource, Selection
from trackalert.scheduler import IntervalSchedule, Scheduler
from trackalert.settings import Settings

#: Config calls a replay accepts and ignores (with one note per name), and why.
IGNORED: dict[str, str] = {
    **dict.fromkeys(
        ("addListener", "webserver", "setWebserverPassword", "setWebserverReadTimeout",
         "setWebserverIdleTimeout", "setReportSecret", "setMaxWebserverConns",
         "setNumWebProcesses", "setNumWorkerThreads", "setNumReportThreads",
         "setMetricsNoPassword", "addACL", "setACL", "setCustomEndpoint"),
        "a replay serves no REST API"),
    **dict.fromkeys(("controlSocket", "setKey", "setMaxConsoleConns", "setConsoleTimeouts"),
                    "a replay has no console"),
    "setEventLog": "a replay reads the log given by --log",
    "setEventLogRetention": "a replay never prunes the log it reads",
    "setNumLuaStates": "a replay runs every Lua call in one worker state (deterministic)",
    "setNumSchedulerThreads": "a replay runs background functions one at a time",
    "shutdown": "a replay ends with its log",
}
#: Events per report call batch (between two background functions' due times).
BATCH = 512


class ConfigError(Exception):
    """The config does not load; the message names file:line."""


@dataclass
class Outcome:
    """What a runtime did over the replay."""

    findings: Findings
    events: int = 0
    custom_stats: dict[str, int] = field(default_factory=dict)
    background_runs: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def _working_directory(path: str) -> Iterator[None]:
    """The daemon runs in its config's directory: relative dofile() paths resolve as there."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


class Runtime:
    """One config's runtime: config state, one worker state, scheduler, captured edges."""

    def __init__(self, config: str, source: LogSource, start: float, notes: dict[str, str],
                 projection: bool = True) -> None:
        self.source = source
        self.clock = VirtualClock(start)
        config = os.path.abspath(config)
        settings = Settings(config_file=config, config_dir=os.path.dirname(config), verbose=False)
        self.findings = Findings()
        self.position = Position()
        host = self.host = ReplayHost(settings=settings, clock=self.clock)
        host.findings, host.position = self.findings, self.position
        host.eventlog = self.log = source.log()
        self.scheduler = Scheduler(self.clock, host.metrics, lambda: 1, max_nap=float("inf"))
        host.scheduler = self.scheduler
        self.capture = host.webhooks = AlertCapture(host, self.position, self.findings)
        self._notes = notes
        with _working_directory(settings.config_dir):
            self._load(config, StateKind.CONFIG)
            self.worker = self._load(config, StateKind.WORKER)
        host.state = self.capture.state = self.worker
        self._drop_back_to_back()
        self.pool = ReplayPool([self.worker], host)
        self.runner = PolicyRunner(self.log, self.pool, host, projection=projection)

    def _load(self, config: str, kind: StateKind) -> LuaState:
        state = LuaState(kind, self.host)
        self._ignore_calls(state)
        try:
            run_config(state, config)
        except StartupError as exc:
            raise ConfigError(str(exc)) from exc
        return state

    def _ignore_calls(self, state: LuaState) -> None:
        """Replace what a replay cannot honour by a no-op that leaves a note."""
        g = state.lua.globals()
        for name, why in IGNORED.items():
            g[name] = state.values.lib.wrap(guarded(self._noter(name, why), state), name)

    def _noter(self, name: str, why: str) -> Callable[..., None]:
        def note(*_args: Any) -> None:
            self._notes.setdefault(name, why)

        return note

    def _drop_back_to_back(self) -> None:
        """An interval of 0 runs back to back: on a virtual clock that never ends."""
        for job in list(self.scheduler.jobs):
            if isinstance(job.schedule, IntervalSchedule) and job.schedule.seconds <= 0:
                self.scheduler.jobs.remove(job)
                self._notes.setdefault(f"interval:{job.name}", "an interval of 0 (back to back) "
                                       f"is not replayed: background function {job.name} skipped")

    # -- running

    async def start(self, after_seq: int) -> None:
        await self.scheduler.start(self.pool)
        if self.runner.projection is not None:
            self.runner.projection.start_at(after_seq)

    async def stop(self) -> Outcome:
        await self.scheduler.stop()
        projection = self.runner.projection
        if projection is not None:
            projection.close()
            # its builder thread reads the log: let it see the stop before the log closes
            builder = getattr(projection, "_thread", None)
            if builder is not None:
                await asyncio.to_thread(builder.join, 10.0)
        self.pool.close()
        await self.log.close()
        return Outcome(
            self.findings, custom_stats=dict(sorted(self.findings.stat_totals.items())),
            background_runs={job.name: job.runs for job in self.scheduler.jobs},
        )

    def next_due(self) -> float | None:
        dues = [job.next_due for job in self.scheduler.jobs if job.next_due is not None]
        return min(dues) if dues else None

    async def feed(self, batch: list[Event], halted: Callable[[], bool] = lambda: False) -> None:
        """Run `report` over `batch`, firing the background functions due before each event;
        nothing more once `halted()` (a policy error stops the replay)."""
        i = 0
        while i < len(batch) and not halted():
            due = self.next_due()
            j = i
            while j < len(batch) and (due is None or batch[j].received < due):
                j += 1
            if j == i:  # batch[i] is received at or after `due`: those runs come first
                await self.advance_to(batch[i].received)
                if halted():
                    return
                j = i + 1
                due = self.next_due()
                while j < len(batch) and (due is None or batch[j].received < due):
                    j += 1
            await self._judge(batch[i:j])
            i = j

    async def _judge(self, events: list[Event]) -> None:
        def run(state: LuaState) -> None:
            self.position.events = {event.seq: event for event in events}
            self.runner.run_events(state, events)

        await self.pool.run("report", run)
        self.position.horizon = events[-1].seq + 1
        last = events[-1].received
        if last > self.clock.time():
            await self.clock.advance(last - self.clock.time())

    async def advance_to(self, when: float) -> None:
        """Run every background function due at or before `when`, each at its own time,
        seeing only the events received before it."""
        for _ in range(1_000_000):  # bounded: each round moves virtual time forward
            due = self.next_due()
            if due is None or due > when:
                break
            self.position.horizon = self.host.horizon = self.source.first_seq_from(due)
            await self.scheduler.run_until(due)
        self.host.horizon = None
        if when > self.clock.time():
            await self.clock.advance(when - self.clock.time())


@dataclass
class Replay:
    """One pass over the source with one or more runtimes (--compare: two)."""

    source: LogSource
    selection: Selection
    configs: list[str]
    keep_going: bool = False
    progress: Callable[[int], None] = lambda n: None
    log_sinks: list[Callable[[dict[str, Any]], None] | None] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    span: tuple[float | None, float | None] = (None, None)
    #: Stopped at a policy error (no --keep-going).
    stopped: bool = False

    async def run(self) -> list[Outcome]:
        first = self.source.first_received(self.selection)
        start = self.selection.start if self.selection.start is not None else first
        if start is None:
            start = self.selection.end if self.selection.end is not None else 0.0
        collector = LogCollector()
        runtimes = [Runtime(config, self.source, start, self.notes,
                            projection=not self.selection.logins) for config in self.configs]
        for runtime, sink in zip(runtimes, self.log_sinks):
            runtime.findings.log_sink = sink
        after, _ = self.source.bounds(self.selection)
        started = time.perf_counter()
        with _collecting(collector):
            for runtime in runtimes:
                await runtime.start(after)
            events, last = await self._pass(runtimes, collector)
            if self.selection.end is not None and not self.stopped:
                for runtime in runtimes:
                    collector.target = (runtime.findings, runtime.position, runtime.host)
                    await runtime.advance_to(self.selection.end)
            collector.target = None
            outcomes = [await runtime.stop() for runtime in runtimes]
        self.seconds = time.perf_counter() - started
        self.span = (start if events or self.selection.start is not None else None,
                     self.selection.end if self.selection.end is not None else last)
        for outcome in outcomes:
            outcome.events = events
        return outcomes

    async def _pass(self, runtimes: list[Runtime], collector: LogCollector) -> tuple[int, float | None]:
        events, last = 0, None
        def halted() -> bool:
            return not self.keep_going and any(r.findings.error_count for r in runtimes)

        for batch in self.source.batches(self.selection, BATCH):
            for runtime in runtimes:
                collector.target = (runtime.findings, runtime.position, runtime.host)
                await runtime.feed(batch, halted)
            self.progress(len(batch))
            failed = [e["seq"] for r in runtimes for e in r.findings.errors]
            if failed and not self.keep_going:
                self.stopped = True
                count, at = self._stop_at(min(failed), batch, runtimes)
                return events + count, at if at is not None else last
            events += len(batch)
            last = batch[-1].received
        return events, last

    @staticmethod
    def _stop_at(seq: int, batch: list[Event], runtimes: list[Runtime]) -> tuple[int, float | None]:
        """The outputs as if the replay had stopped right after event `seq`, its first error
        (the batch it was in ran on): how many events that is, and the last one's time."""
        for runtime in runtimes:
            runtime.findings.stop_at(seq)
        done = [event for event in batch if event.seq <= seq]
        return len(done), (done[-1].received if done else None)


@contextlib.contextmanager
def _collecting(collector: LogCollector) -> Iterator[None]:
    """Route the `trackalert` logger into the collector (and nowhere else) while replaying."""
    logger = log.logger
    saved = (list(logger.handlers), logger.level, logger.propagate)
    for handler in saved[0]:
        logger.removeHandler(handler)
    logger.addHandler(collector)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(collector)
        for handler in saved[0]:
            logger.addHandler(handler)
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
