"""Scheduled Lua background functions (reference §7) on an injectable clock.

The daemon runs the scheduler on the real clock; tests and the replay tool run it on a
`VirtualClock`, so a week of cron firings takes milliseconds and never a real minute.

Differences from the C++ daemon, on purpose:

* Cron takes the standard syntax (ranges, lists, steps, month and day names, `@daily`...)
  through croniter, and a malformed expression is an error at load time naming it. Day-of-month
  and day-of-week are ORed when both are restricted, as in Vixie cron (the original ANDed them).
* A name never overlaps itself: a run that falls due while the previous run of the same name is
  still going is skipped, logged and counted (`status="skipped"`), instead of running twice at
  once in two Lua states.
* In the hour repeated when daylight saving time ends, a fixed-time job (no `*` in its minute
  and hour fields) runs once, as Vixie cron does, not twice.
* Several nodes on one Elasticsearch log run each background run once in total: with a lease
  (`set_lease`), a node asks for every run before starting it, and a run another node claimed
  is left to it (eventlog/es_lease.py).
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol

from croniter import croniter
from croniter.croniter import CroniterError
from dateutil import tz as dateutil_tz

from trackalert import log
from trackalert.durations import format_span
from trackalert.lua.convert import protected_call

if TYPE_CHECKING:
    from trackalert.clock import Clock
    from trackalert.lua.pool import LuaPool
    from trackalert.lua.state import LuaState
    from trackalert.metrics import Metrics

__all__ = ["CronError", "CronSchedule", "IntervalSchedule", "Job", "Scheduler"]

#: The longest single wait: the wall clock is re-read at least this often, so a clock step
#: (NTP, suspend) delays a run by at most this much.
MAX_NAP = 60.0

#: A back-to-back (interval 0) job whose name is busy under another schedule looks again after
#: this long instead of spinning.
SKIPPED_RETRY = 1.0

#: Asked before a run: whether this node runs `name` due at `due`, keeping it `ttl` seconds.
Lease = Callable[[str, float, float], Awaitable[bool]]

_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


class CronError(ValueError):
    """A cron expression that cannot be used; the message names it."""


class Schedule(Protocol):
    def describe(self) -> str:
        """How `showSchedules()` shows it."""

    def first_due(self, registered: float) -> float:
        """When the first run is due, for a schedule registered at `registered`."""


class CronSchedule:
    """A five-field cron expression evaluated in local time (or the given zone)."""

    def __init__(self, expression: str, zone: datetime.tzinfo | None = None) -> None:
        text = " ".join(str(expression).split())
        fields = text.split(" ")
        if not (len(fields) == 5 or (len(fields) == 1 and text.lower() in _MACROS)):
            raise CronError(
                f"malformed cron string: {expression} (expected 5 fields: minute hour "
                "day-of-month month day-of-week, or @hourly, @daily, @weekly, @monthly, @yearly)"
            )
        self.expression = text
        self.zone = zone or dateutil_tz.tzlocal()
        # Vixie cron's "fixed-time" jobs: no `*` leading the minute or hour field.
        if len(fields) == 5:
            self._fixed_time = not fields[0].startswith("*") and not fields[1].startswith("*")
        else:
            self._fixed_time = text.lower() != "@hourly"
        try:
            croniter(text, self._local(0.0))
            self.next_after(0.0)
        except (CroniterError, ValueError, KeyError) as exc:
            raise CronError(f"malformed cron string: {expression} ({exc})") from None

    def describe(self) -> str:
        return f"cron {self.expression}"

    def first_due(self, registered: float) -> float:
        return self.next_after(registered)

    def next_after(self, now: float) -> float:
        """The first whole minute strictly after `now` at which the expression matches."""
        candidates = croniter(self.expression, self._local(now))
        while True:
            due = candidates.get_next(float)
            if not (self._fixed_time and _second_occurrence(self._local(due))):
                return due

    def _local(self, timestamp: float) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(timestamp, self.zone)


def _second_occurrence(moment: datetime.datetime) -> bool:
    """Whether a local time is the repeat of the hour that daylight saving time's end replays."""
    return bool(moment.fold) and moment.replace(fold=0).utcoffset() != moment.utcoffset()


class IntervalSchedule:
    """Every `seconds`: the first run one interval after registration, each next one an interval
    after the previous run ended (fixed delay, as the original)."""

    def __init__(self, seconds: int, text: str = "") -> None:
        self.seconds = seconds
        self.text = text or str(seconds)

    def describe(self) -> str:
        return f"every {format_span(self.seconds) if self.seconds > 0 else '0s'}"

    def first_due(self, registered: float) -> float:
        return registered + self.seconds


@dataclass
class Job:
    """One schedule of one background function name, and what it last did."""

    number: int
    name: str
    schedule: CronSchedule | IntervalSchedule
    registered: float
    next_due: float | None = None
    last_started: float | None = None
    last_finished: float | None = None
    last_status: str = ""
    runs: int = 0
    #: The job loop is waiting for its next due time (not starting or awaiting a run).
    waiting: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class _BackgroundError(Exception):
    """The Lua function raised; the message is Lua's, with its location and traceback."""


class Scheduler:
    """Runs each registered job on `clock`, through the Lua pool, never overlapping a name."""

    def __init__(
        self,
        clock: "Clock",
        metrics: "Metrics",
        max_running: Callable[[], int] = lambda: 4,
        zone: datetime.tzinfo | None = None,
        max_nap: float = MAX_NAP,
    ) -> None:
        self._clock = clock
        #: The longest single wait (MAX_NAP); a replay's virtual clock has no step to catch
        #: and passes infinity, so that a month of virtual time is not a month of naps.
        self._max_nap = max_nap
        self._metrics = metrics
        self._max_running = max_running
        self.zone = zone
        self.jobs: list[Job] = []
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._pool: "LuaPool | None" = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Condition | None = None
        self._active = 0
        self._running: set[str] = set()
        self._runs: set[asyncio.Task[None]] = set()
        self._idle: asyncio.Event | None = None
        self._warned_missing: set[str] = set()
        self._lease: Lease | None = None

    def set_lease(self, lease: Lease | None) -> None:
        """Share the schedules with other nodes: each run goes ahead only if `lease` grants it."""
        self._lease = lease

    # -- registration (config state: at load time or from the console) --------------------------

    def add_cron(self, expression: str, name: str) -> Job:
        """Schedule `name` by a cron expression; raises `CronError` naming a bad expression."""
        return self._add(name, CronSchedule(expression, self.zone))

    def add_interval(self, seconds: int, name: str, text: str = "") -> Job:
        """Schedule `name` every `seconds` (≤ 0: back to back, as the original)."""
        if seconds <= 0:
            log.logger.warning(
                "Background function [%s] has an interval of %s: it will run back to back",
                name, text or seconds,
            )
        return self._add(name, IntervalSchedule(seconds, text))

    def _add(self, name: str, schedule: CronSchedule | IntervalSchedule) -> Job:
        with self._lock:
            job = Job(next(self._numbers), name, schedule, self._clock.time())
            job.next_due = schedule.first_due(job.registered)
            self.jobs.append(job)
        self._metrics.register_background(name)
        log.logger.info("Scheduled background function [%s]: %s", name, schedule.describe())
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._spawn, job)
        return job

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, pool: "LuaPool") -> None:
        """Start every job registered so far; later registrations start at once."""
        self._pool = pool
        self._slots = asyncio.Condition()
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop = asyncio.get_running_loop()
        with self._lock:
            jobs = list(self.jobs)
        for job in jobs:
            self._spawn(job)

    async def stop(self, timeout: float = 3.0) -> None:
        """Stop scheduling; give runs in progress `timeout` to finish (a runaway LuaJIT loop
        cannot be interrupted, so it is not waited for longer)."""
        self._loop = None
        tasks = [job.task for job in self.jobs if job.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._runs:
            _, pending = await asyncio.wait(self._runs, timeout=timeout)
            for run in pending:  # only waiting for a slot or a state; Lua itself is not stopped
                run.cancel()

    async def idle(self, max_yields: int = 1000) -> None:
        """Wait until no background function runs and every job waits for its next time.

        Lets a test (or the replay tool) move a virtual clock on only once the effects of the
        runs due so far are complete.
        """
        for _ in range(max_yields):
            await asyncio.sleep(0)
            if self._idle is not None and not self._idle.is_set():
                await self._idle.wait()
                continue
            if all(job.task is None or job.task.done() or job.waiting for job in self.jobs):
                return

    async def run_until(self, when: float) -> None:
        """On a virtual clock: move time to `when` one due time at a time, letting the runs due
        at each finish before time moves on. A replay (or a test) gets the same runs at the
        same times whatever the speed of the machine; one big `advance` would let time run
        ahead of runs still in their threads."""
        advance = getattr(self._clock, "advance", None)
        if advance is None:
            raise TypeError("run_until needs a clock that can be advanced (VirtualClock)")
        while True:
            await self.idle()
            now = self._clock.time()
            dues = [job.next_due for job in self.jobs
                    if job.next_due is not None and job.task is not None and not job.task.done()]
            target = min([when, *dues])
            if target <= now and now >= when:
                return
            await advance(max(0.0, target - now))

    def running(self) -> set[str]:
        """The names running right now."""
        return set(self._running)

    # -- the job loops ---------------------------------------------------------------------------

    def _spawn(self, job: Job) -> None:
        if job.task is None:
            job.task = asyncio.get_running_loop().create_task(
                self._job_loop(job), name=f"background:{job.name}"
            )

    async def _job_loop(self, job: Job) -> None:
        due = job.next_due if job.next_due is not None else job.schedule.first_due(self._clock.time())
        while True:
            job.next_due = due
            await self._sleep_until(job, due)
            if isinstance(job.schedule, CronSchedule):
                # The next occurrence counts from the due time, not from when this run ends.
                self._start_run(job, due)
                due = job.schedule.next_after(max(due, self._clock.time()))
                continue
            job.next_due = None
            run = self._start_run(job, due)
            if run is not None:
                await asyncio.shield(run)  # stop() must not cancel a run that is in Lua
                if job.last_status == "elsewhere":  # another node runs it: ask again later
                    due = max(due, self._clock.time()) + max(job.schedule.seconds, SKIPPED_RETRY)
                    continue
                ended = job.last_finished if job.last_finished is not None else self._clock.time()
                due = ended + job.schedule.seconds
            else:  # skipped: another schedule of this name is running; never spin on it
                due = self._clock.time() + max(job.schedule.seconds, SKIPPED_RETRY)

    async def _sleep_until(self, job: Job, due: float) -> None:
        while True:
            remaining = due - self._clock.time()
            if remaining <= 0:
                return
            job.waiting = True
            try:
                await self._clock.sleep(min(remaining, self._max_nap))
            finally:
                job.waiting = False

    def _start_run(self, job: Job, due: float) -> asyncio.Task[None] | None:
        if job.name in self._running:
            job.last_status = "skipped"
            self._metrics.background_run(job.name, "skipped")
            log.logger.warning(
                "Background function [%s] is still running: skipping its run due at %s (%s)",
                job.name, self._format_time(due), job.schedule.describe(),
            )
            return None
        self._running.add(job.name)
        assert self._idle is not None
        self._idle.clear()
        task = asyncio.get_running_loop().create_task(self._run(job, due), name=f"run:{job.name}")
        self._runs.add(task)
        task.add_done_callback(self._run_done)
        return task

    def _run_done(self, task: asyncio.Task[None]) -> None:
        self._runs.discard(task)
        if not self._runs and self._idle is not None:
            self._idle.set()

    async def _run(self, job: Job, due: float) -> None:
        try:
            if not await self._granted(job, due):
                job.last_status = "elsewhere"
                return
            await self._acquire_slot()
            try:
                job.last_started = self._clock.time()
                job.runs += 1
                status = await self._call(job.name, due)
            finally:
                job.last_finished = self._clock.time()
                await self._release_slot()
            job.last_status = status
            self._metrics.background_run(job.name, status)
        finally:
            self._running.discard(job.name)

    async def _granted(self, job: Job, due: float) -> bool:
        """Whether this node runs `job` due at `due` (always, without a lease). A lease that
        cannot be asked (the cluster is away) runs nothing: every node would run it."""
        if self._lease is None:
            return True
        if isinstance(job.schedule, CronSchedule):
            ttl = job.schedule.next_after(due) - due  # the next due time is anybody's
        else:
            ttl = 2.0 * max(job.schedule.seconds, 1)
        try:
            return await self._lease(job.name, due, ttl)
        except Exception as exc:
            log.logger.error("Background function [%s]: cannot claim its run due at %s, not "
                             "running it: %s", job.name, self._format_time(due), exc)
            return False

    async def _call(self, name: str, due: float) -> str:
        """Run the function in a worker state behind the crash boundary; its status."""
        assert self._pool is not None
        try:
            status = await self._pool.run("background", lambda state: _call_in_state(state, name, due))
        except _BackgroundError as exc:
            log.logger.error("Lua background function [%s] exception: %s", name, exc)
            self._metrics.lua_error(f"background:{name}")
            status = "error"
        except Exception as exc:  # a fault outside Lua must not stop the schedule either
            log.logger.error("Exception in background function [%s] exception: %s", name, exc)
            self._metrics.lua_error(f"background:{name}")
            status = "error"
        if status != "missing":
            self._metrics.lua_calls("background")
        elif name not in self._warned_missing:
            self._warned_missing.add(name)
            log.logger.warning(
                "Background function [%s] is scheduled but no worker state registered it with "
                "setBackground(): nothing runs", name,
            )
        return status

    async def _acquire_slot(self) -> None:
        assert self._slots is not None
        async with self._slots:
            await self._slots.wait_for(lambda: self._active < max(1, self._max_running()))
            self._active += 1

    async def _release_slot(self) -> None:
        assert self._slots is not None
        async with self._slots:
            self._active -= 1
            self._slots.notify_all()

    # -- console ---------------------------------------------------------------------------------

    def show(self) -> str:
        """`showSchedules()`: each schedule with its last and next run, in local time."""
        fmt = "{:<20.20} {:<28.28} {:<19} {:<7} {:<19}\n"
        lines = [fmt.format("Name", "Schedule", "Last run", "Status", "Next run")]
        with self._lock:
            jobs = list(self.jobs)
        for job in jobs:
            lines.append(fmt.format(
                job.name, job.schedule.describe(), self._format_time(job.last_started),
                job.last_status or "-",
                "running" if job.next_due is None else self._format_time(job.next_due),
            ))
        return "".join(lines)

    def _format_time(self, timestamp: float | None) -> str:
        if timestamp is None:
            return "never"
        zone = self.zone or dateutil_tz.tzlocal()
        return datetime.datetime.fromtimestamp(timestamp, zone).strftime("%Y-%m-%d %H:%M:%S")


def _call_in_state(state: "LuaState", name: str, due: float) -> str:
    """Runs in a worker thread with the state locked. The run's name and due time are what
    caused the alerts it sends (their delivery ids derive from them)."""
    fn = state.backgrounds.get(name)
    if fn is None:
        return "missing"
    state.background_run = (name, due)
    try:
        result = protected_call(state, fn)
    finally:
        state.background_run = None
    if not result[0]:
        raise _BackgroundError(str(result[1]))
    return "ok"
