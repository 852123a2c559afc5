"""Lua globals for scheduled background functions (reference §7).

The functions are registered per worker state with `setBackground`, and scheduled by name from
the config state; the scheduler itself lives on the host (`Host.scheduler`), so this module
never imports anything above the Lua layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from trackalert import log
from trackalert.durations import DurationError, parse_hms
from trackalert.lua.convert import describe, lua_type, scalar_text
from trackalert.lua.registry import Where, lua_global

if TYPE_CHECKING:
    from trackalert.lua.host import BackgroundScheduler
    from trackalert.lua.state import LuaState


def _scheduler(state: "LuaState") -> "BackgroundScheduler":
    scheduler = state.host.scheduler
    if scheduler is None:
        raise RuntimeError("background functions cannot be scheduled in this process")
    return scheduler


@lua_global(
    "setBackground", Where.WORKER, "setBackground(name, function())",
    """Register a background function under `name` in this worker state; the schedules
    (`cronScheduleBackgroundFunc`, `intervalScheduleBackgroundFunc`) refer to it by name. It is
    called with no arguments in a free worker state. The first registration of a name wins.
    An error is logged as `Lua background function [<name>] exception: <message>` with its
    `file:line` and traceback, and counted; the schedule goes on.""",
    example='setBackground("sweep", function() infoLog("sweeping", {}) end)', topic="schedule",
)
def _set_background(state: "LuaState") -> Callable[[Any, Any], None]:
    def set_background(name: Any, fn: Any) -> None:
        name = scalar_text(name, "background function name")
        if lua_type(fn) != "function":
            raise TypeError(f"setBackground needs a function, got {describe(fn)}")
        state.backgrounds.setdefault(name, fn)

    return set_background


@lua_global(
    "cronScheduleBackgroundFunc", Where.CONFIG, "cronScheduleBackgroundFunc(cron, name)",
    """Run the background function `name` at the times of a standard five-field cron
    expression (minute hour day-of-month month day-of-week, local time): `*`, numbers, ranges
    `1-5`, lists `1,15`, steps `*/10` or `0-30/5`, month and day names (`jan`, `mon-fri`),
    7 for Sunday, and `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`. When both
    day-of-month and day-of-week are restricted a day matching either runs (Vixie cron; the C++
    daemon required both and took only the first number of a field). A malformed expression is
    an error naming it, fatal at load time. A run that falls due while the previous run of
    the same name is still going is skipped, logged and counted as `skipped`.""",
    example='cronScheduleBackgroundFunc("*/15 9-17 * * mon-fri", "sweep")', topic="schedule",
)
def _cron_schedule(state: "LuaState") -> Callable[[Any, Any], None]:
    def cron_schedule(expression: Any, name: Any) -> None:
        _scheduler(state).add_cron(
            scalar_text(expression, "cron expression"), scalar_text(name, "background function name")
        )

    return cron_schedule


@lua_global(
    "intervalScheduleBackgroundFunc", Where.CONFIG, "intervalScheduleBackgroundFunc(duration, name)",
    """Run the background function `name` every `duration` (`h[h][:mm][:ss]`: `"10"` is ten
    hours, `"00:05:00"` five minutes). The first run is one interval after the call; each next
    one an interval after the previous run ended, so a name never overlaps itself. An
    unparseable duration is logged and is an error (fatal at load time); 0 runs back to back.""",
    example='intervalScheduleBackgroundFunc("00:05:00", "sweep")', topic="schedule",
)
def _interval_schedule(state: "LuaState") -> Callable[[Any, Any], None]:
    def interval_schedule(duration: Any, name: Any) -> None:
        text = scalar_text(duration, "duration")
        try:
            seconds = parse_hms(text)
        except DurationError as exc:
            log.logger.error("%s", exc)
            raise
        _scheduler(state).add_interval(seconds, scalar_text(name, "background function name"), text)

    return interval_schedule


@lua_global(
    "setNumSchedulerThreads", Where.CONFIG, "setNumSchedulerThreads(n)",
    """The most background functions running at once (default 4); more wait for a turn. Each
    run also needs a free worker state (`setNumLuaStates`). The C++ daemon counted its
    dispatcher thread in `n`; here `n` is only the runners.""",
    example="setNumSchedulerThreads(2)", topic="schedule",
)
def _num_scheduler_threads(state: "LuaState") -> Callable[[Any], None]:
    def set_threads(n: Any) -> None:
        if isinstance(n, bool) or not isinstance(n, (int, float)) or int(n) < 1:
            raise ValueError(f"setNumSchedulerThreads needs a positive number, got {describe(n)}")
        state.host.settings.num_scheduler_threads = int(n)

    return set_threads


@lua_global(
    "showSchedules", Where.CONFIG, "showSchedules()",
    """Console output: one line per schedule with the background function's name, its
    schedule, when it last started, how that run ended (ok, error, skipped, missing) and when it
    runs next (local time).""",
    topic="console",
)
def _show_schedules(state: "LuaState") -> Callable[[], None]:
    return lambda: state.host.console_replace(_scheduler(state).show())
