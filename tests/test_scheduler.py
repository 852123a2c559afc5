"""Scheduled background functions: real Lua states and pool, driven by a virtual clock.

A week of cron firings takes a fraction of a second: the clock only moves when the test moves it,
and `Scheduler.idle()` waits until the runs that fell due have finished. The one real-time test
(a `* * * * *` function in a running daemon) is at the end.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from prometheus_client.parser import text_string_to_metric_families

from trackalert.clock import VirtualClock
from trackalert.lua.host import Host
from trackalert.lua.pool import LuaPool
from trackalert.lua.state import LuaError, LuaState, StateKind
from trackalert.scheduler import CronError, CronSchedule, Scheduler
from trackalert.testing import DaemonProcess, listener_config, wait_for

UTC = datetime.timezone.utc
#: Monday 29 January 2024, 00:00 UTC: the week after it contains 1 February and a Sunday.
MONDAY = datetime.datetime(2024, 1, 29, tzinfo=UTC)
WEEK = 7 * 24 * 60


class Harness:
    """A config state, worker states, a pool and a scheduler on one virtual clock."""

    def __init__(self, config: str, zone: str = "UTC", states: int = 2,
                 start: datetime.datetime = MONDAY) -> None:
        self.clock = VirtualClock(start.timestamp())
        self.host = Host(clock=self.clock)
        self.scheduler = Scheduler(
            self.clock, self.host.metrics, lambda: self.host.settings.num_scheduler_threads,
            zone=ZoneInfo(zone),
        )
        self.host.scheduler = self.scheduler
        self.config = LuaState(StateKind.CONFIG, self.host)
        self.config.execute(config, "trackalert.conf")
        self.workers = [LuaState(StateKind.WORKER, self.host, i) for i in range(states)]
        for worker in self.workers:
            worker.execute(config, "trackalert.conf")
        self.pool = LuaPool(self.workers, self.clock)

    async def __aenter__(self) -> "Harness":
        await self.scheduler.start(self.pool)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.scheduler.stop()
        self.pool.close()

    async def step(self, seconds: float) -> None:
        await self.clock.advance(seconds)
        await self.scheduler.idle()

    def lua_count(self, name: str) -> int:
        """How many times the Lua functions counted into the global `name`, over all states."""
        return sum(int(worker.lua.globals()[name] or 0) for worker in self.workers)

    def job(self, name: str):
        [job] = [j for j in self.scheduler.jobs if j.name == name]
        return job

    def metric(self, sample: str, **labels: str) -> float:
        text = self.host.metrics.render().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == sample and s.labels == labels:
                    return s.value
        return 0.0

    async def record_fires(self, names: list[str], minutes: int) -> dict[str, list[datetime.datetime]]:
        """Step one minute at a time; the start time of every run, per name."""
        fires: dict[str, list[datetime.datetime]] = {name: [] for name in names}
        seen = {name: 0 for name in names}
        for _ in range(minutes):
            await self.step(60)
            for name in names:
                job = self.job(name)
                if job.runs != seen[name]:
                    assert job.runs == seen[name] + 1, f"{name} ran twice in one minute"
                    seen[name] = job.runs
                    fires[name].append(datetime.datetime.fromtimestamp(job.last_started, UTC))
        return fires


COUNTING = """
local function counter(global)
  return function() _G[global] = (_G[global] or 0) + 1 end
end
setBackground("workdays", counter("workdays_runs"))
setBackground("firsts", counter("firsts_runs"))
cronScheduleBackgroundFunc("*/15 9-17 * * mon-fri", "workdays")
cronScheduleBackgroundFunc("5,35 */6 1 feb sun", "firsts")
"""


async def test_cron_ranges_steps_lists_and_names_fire_at_exactly_the_expected_minutes() -> None:
    async with Harness(COUNTING) as h:
        fires = await h.record_fires(["workdays", "firsts"], WEEK)
    minutes = [MONDAY + datetime.timedelta(minutes=m) for m in range(1, WEEK + 1)]
    expected_workdays = [t for t in minutes if t.minute % 15 == 0 and 9 <= t.hour <= 17 and t.weekday() < 5]
    # day-of-month OR day-of-week (Vixie cron): 1 February (a Thursday) and Sunday 4 February
    expected_firsts = [t for t in minutes if t.month == 2 and (t.day == 1 or t.weekday() == 6)
                       and t.hour % 6 == 0 and t.minute in (5, 35)]
    assert len(expected_workdays) == 5 * 9 * 4  # 09:00..17:45 every quarter hour, Mon-Fri
    assert len(expected_firsts) == 16
    assert fires["workdays"] == expected_workdays
    assert fires["firsts"] == expected_firsts
    assert h.lua_count("workdays_runs") == len(expected_workdays)
    assert h.lua_count("firsts_runs") == len(expected_firsts)
    assert h.metric("trackalert_background_runs_total", name="workdays", status="ok") == len(expected_workdays)
    assert h.metric("trackalert_lua_calls_total", kind="background") == len(expected_workdays) + 16


async def test_cron_uses_local_time() -> None:
    config = 'setBackground("nine", function() end)\ncronScheduleBackgroundFunc("0 9 * * *", "nine")\n'
    async with Harness(config, zone="Europe/Berlin") as h:
        fires = await h.record_fires(["nine"], 3 * 24 * 60)
    assert [t.strftime("%d %H:%M") for t in fires["nine"]] == ["29 08:00", "30 08:00", "31 08:00"]


def test_daylight_saving_time_in_cron() -> None:
    berlin = ZoneInfo("Europe/Berlin")

    def fires(expression: str, start: datetime.datetime, hours: int) -> list[str]:
        schedule = CronSchedule(expression, berlin)
        t, end, out = start.timestamp(), start.timestamp() + hours * 3600, []
        while (t := schedule.next_after(t)) < end:
            out.append(datetime.datetime.fromtimestamp(t, berlin).strftime("%d %H:%M %Z"))
        return out

    autumn = datetime.datetime(2024, 10, 26, 12, 0, tzinfo=berlin)
    # a fixed-time job runs once in the repeated hour; an hourly one runs every real hour
    assert fires("30 2 * * *", autumn, 48) == ["27 02:30 CEST", "28 02:30 CET"]
    assert [f for f in fires("30 * * * *", autumn, 48) if f.startswith("27 02")] == [
        "27 02:30 CEST", "27 02:30 CET"]
    spring = datetime.datetime(2024, 3, 30, 12, 0, tzinfo=berlin)
    # 02:30 does not exist on 31 March: the job runs as the clock jumps, as Vixie cron does
    assert fires("30 2 * * *", spring, 48) == ["31 03:00 CEST", "01 02:30 CEST"]


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("61 * * * *", "out of range"),
        ("* * * *", "expected 5 fields"),
        ("* * * * * *", "expected 5 fields"),
        ("*/0 * * * *", ""),
        ("0 0 31 2 *", ""),
        ("x y z w v", ""),
        ("@reboot", "expected 5 fields"),
    ],
)
def test_a_malformed_cron_expression_is_a_clear_load_time_error(expression: str, reason: str) -> None:
    host = Host(clock=VirtualClock())
    host.scheduler = Scheduler(host.clock, host.metrics)
    config = LuaState(StateKind.CONFIG, host)
    with pytest.raises(LuaError) as info:
        config.execute(f'cronScheduleBackgroundFunc("{expression}", "f")', "trackalert.conf")
    message = str(info.value)
    assert f"trackalert.conf:1: cronScheduleBackgroundFunc(): malformed cron string: {expression}" in message
    assert reason in message
    assert host.scheduler.jobs == []
    with pytest.raises(CronError):
        CronSchedule(expression)


def test_an_unparseable_interval_is_logged_and_an_error(caplog: pytest.LogCaptureFixture) -> None:
    host = Host(clock=VirtualClock())
    host.scheduler = Scheduler(host.clock, host.metrics)
    config = LuaState(StateKind.CONFIG, host)
    with caplog.at_level(logging.ERROR, logger="trackalert"):
        with pytest.raises(LuaError, match="Cannot parse duration string: soon"):
            config.execute('intervalScheduleBackgroundFunc("soon", "f")')
    assert "Cannot parse duration string: soon" in caplog.text


INTERVAL = """
setBackground("tick", function() ticks = (ticks or 0) + 1 end)
intervalScheduleBackgroundFunc("00:10:00", "tick")
"""


async def test_interval_first_run_one_interval_after_registration_then_every_interval() -> None:
    async with Harness(INTERVAL) as h:
        registered = h.job("tick").registered
        await h.step(599)
        assert h.lua_count("ticks") == 0
        await h.step(1)
        assert h.lua_count("ticks") == 1
        assert h.job("tick").last_started == registered + 600
        await h.step(599)
        assert h.lua_count("ticks") == 1
        await h.step(1)
        assert h.lua_count("ticks") == 2
        assert h.job("tick").last_started == registered + 1200
        await h.scheduler.run_until(registered + 5 * 600)
        assert h.lua_count("ticks") == 5
        assert h.job("tick").last_started == registered + 3000


def slow_config(directory: Path, schedule: str) -> str:
    """A function that notes its start in a file, then spins until the test creates `release`.

    Progress is read from files: a Lua runtime cannot be inspected while it runs."""
    return f"""
setBackground("slow", function()
  local log = io.open("{directory / 'started'}", "a"); log:write("run\\n"); log:close()
  while true do
    local f = io.open("{directory / 'release'}")
    if f then f:close() break end
  end
end)
{schedule}
"""


def started(directory: Path) -> int:
    path = directory / "started"
    return len(path.read_text().splitlines()) if path.exists() else 0


async def test_a_slow_cron_function_does_not_overlap_itself(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = slow_config(tmp_path, 'cronScheduleBackgroundFunc("* * * * *", "slow")')
    caplog.set_level(logging.WARNING, logger="trackalert")
    async with Harness(config, states=3) as h:
        await h.clock.advance(60)
        assert await wait_for(lambda: started(tmp_path) == 1)
        assert h.scheduler.running() == {"slow"}
        for _ in range(3):  # three more minutes go by while the first run is still going
            await h.clock.advance(60)
        assert started(tmp_path) == 1, "never two runs of one name at once"
        assert h.metric("trackalert_background_runs_total", name="slow", status="skipped") == 3
        assert caplog.text.count("Background function [slow] is still running: skipping") == 3
        (tmp_path / "release").touch()
        await h.scheduler.idle()
        assert h.metric("trackalert_background_runs_total", name="slow", status="ok") == 1
        await h.step(60)
        assert started(tmp_path) == 2
        assert h.metric("trackalert_background_runs_total", name="slow", status="ok") == 2


async def test_a_slow_interval_function_waits_an_interval_after_it_ends(tmp_path: Path) -> None:
    config = slow_config(tmp_path, 'intervalScheduleBackgroundFunc("00:01:00", "slow")')
    async with Harness(config) as h:
        start = h.clock.time()
        await h.clock.advance(60)
        assert await wait_for(lambda: started(tmp_path) == 1)
        await h.clock.advance(300)  # the run takes five (virtual) minutes
        assert started(tmp_path) == 1
        (tmp_path / "release").touch()
        await h.scheduler.idle()
        assert h.job("slow").last_finished == start + 360
        await h.step(59)
        assert started(tmp_path) == 1
        await h.step(1)
        assert started(tmp_path) == 2
        assert h.job("slow").last_started == start + 420


ERRORING = """
setBackground("bad", function()
  bad_runs = (bad_runs or 0) + 1
  error("boom " .. bad_runs)
end)
cronScheduleBackgroundFunc("*/2 * * * *", "bad")
"""


async def test_an_erroring_function_is_logged_counted_and_kept_scheduled(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="trackalert")
    async with Harness(ERRORING, states=1) as h:
        await h.record_fires(["bad"], 6)
        assert h.lua_count("bad_runs") == 3
        assert h.metric("trackalert_background_runs_total", name="bad", status="error") == 3
        assert h.metric("trackalert_lua_errors_total", function="background:bad") == 3
        assert h.job("bad").last_status == "error"
    lines = [r.getMessage() for r in caplog.records if "Lua background function [bad]" in r.getMessage()]
    assert len(lines) == 3
    assert lines[0].startswith("Lua background function [bad] exception: trackalert.conf:4: boom 1")
    assert "stack traceback" in lines[0]


async def test_an_unregistered_name_runs_nothing_and_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="trackalert")
    async with Harness('cronScheduleBackgroundFunc("* * * * *", "nobody")') as h:
        await h.record_fires(["nobody"], 3)
        assert h.metric("trackalert_background_runs_total", name="nobody", status="missing") == 3
    assert caplog.text.count("no worker state registered it") == 1


async def test_set_num_scheduler_threads_bounds_how_many_run_at_once(tmp_path: Path) -> None:
    body = f"""
  local log = io.open("{tmp_path / 'started'}", "a"); log:write("run\\n"); log:close()
  local f
  repeat f = io.open("{tmp_path / 'release'}") until f
  f:close()
"""
    config = "setNumSchedulerThreads(1)\n" + "".join(
        f'setBackground("f{i}", function() {body} end)\n'
        f'cronScheduleBackgroundFunc("* * * * *", "f{i}")\n' for i in range(3)
    )
    async with Harness(config, states=3) as h:
        await h.clock.advance(60)
        assert await wait_for(lambda: started(tmp_path) == 1)
        assert h.scheduler.running() == {"f0", "f1", "f2"}  # all due; two wait for the one slot
        assert started(tmp_path) == 1
        (tmp_path / "release").touch()
        await h.scheduler.idle()
        assert started(tmp_path) == 3
        assert [h.job(f"f{i}").last_status for i in range(3)] == ["ok", "ok", "ok"]


async def test_first_registration_of_a_name_wins_and_show_schedules() -> None:
    config = """
setBackground("twice", function() which = "first" end)
setBackground("twice", function() which = "second" end)
cronScheduleBackgroundFunc("0 * * * *", "twice")
intervalScheduleBackgroundFunc("1:30", "twice")
"""
    async with Harness(config, states=1) as h:
        await h.step(3600)
        assert h.workers[0].lua.globals().which == "first"
        h.config.execute("showSchedules()")
        lines = h.host.take_console_output().splitlines()
    assert lines[0].split() == ["Name", "Schedule", "Last", "run", "Status", "Next", "run"]
    assert lines[1] == f"{'twice':<20} {'cron 0 * * * *':<28} 2024-01-29 01:00:00 ok      2024-01-29 02:00:00"
    assert lines[2] == f"{'twice':<20} {'every 1h30m':<28} never               -       2024-01-29 01:30:00"


async def test_a_schedule_added_at_runtime_starts_at_once() -> None:
    async with Harness('setBackground("late", function() late_runs = (late_runs or 0) + 1 end)') as h:
        await h.step(600)
        h.config.execute('intervalScheduleBackgroundFunc("00:00:30", "late")')
        await h.scheduler.idle()
        await h.step(30)
        assert h.lua_count("late_runs") == 1


async def test_an_interval_of_zero_runs_back_to_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="trackalert")
    config = f"""
setBackground("busy", function()
  local f = io.open("{tmp_path / 'started'}", "a"); f:write("run\\n"); f:close()
end)
intervalScheduleBackgroundFunc("0", "busy")
"""
    async with Harness(config) as h:
        assert await wait_for(lambda: started(tmp_path) >= 20), "runs again and again without the clock moving"
        assert h.clock.pending() == 0
    assert "Background function [busy] has an interval of 0: it will run back to back" in caplog.text


def test_schedule_functions_are_no_ops_in_worker_and_client_states() -> None:
    host = Host(clock=VirtualClock())
    host.scheduler = Scheduler(host.clock, host.metrics)
    for kind in (StateKind.WORKER, StateKind.CLIENT):
        LuaState(kind, host).execute(
            'cronScheduleBackgroundFunc("* * * * *", "f"); intervalScheduleBackgroundFunc("1", "f")'
        )
    assert host.scheduler.jobs == []


async def test_a_cron_function_runs_in_the_real_daemon(tmp_path: Path) -> None:
    """The one real-time test: `* * * * *` really fires (within a minute) in a running daemon."""
    config = listener_config() + """
setBackground("minutely", function()
  local f = io.open("minutely.txt", "a")
  f:write(os.date("!%H:%M:%S") .. "\\n")
  f:close()
end)
cronScheduleBackgroundFunc("* * * * *", "minutely")
"""
    output = tmp_path / "minutely.txt"
    with DaemonProcess(tmp_path, config):
        assert await wait_for(output.exists, timeout=75, step=0.2)
    [line] = output.read_text().splitlines()[:1]
    second = int(line.rsplit(":", 1)[1])
    # Lua's os.date reads the coarse kernel clock, which may still show the previous second
    assert min(second, 60 - second) <= 5, f"ran at {line}, not at the start of a minute"


async def test_a_run_the_lease_gives_to_another_node_is_skipped_without_spinning() -> None:
    """With a lease (several nodes on one log), a run it refuses is left to the other node:
    nothing runs here, showSchedules says `elsewhere`, and a back-to-back schedule asks again
    a second later instead of asking in a loop."""
    config = """
setBackground("f", function() _G.runs = (_G.runs or 0) + 1 end)
intervalScheduleBackgroundFunc("00:00:00", "f")
cronScheduleBackgroundFunc("* * * * *", "f")
"""
    asked: list[tuple[str, float, float]] = []

    async def lease(name: str, due: float, ttl: float) -> bool:
        asked.append((name, due, ttl))
        return False

    async with Harness(config) as h:
        h.scheduler.set_lease(lease)
        await h.scheduler.run_until(h.clock.time() + 120)
    assert h.lua_count("runs") == 0
    assert {job.last_status for job in h.scheduler.jobs} == {"elsewhere"}
    cron = [a for a in asked if a[2] == 60.0]
    assert [due - MONDAY.timestamp() for _, due, _ in cron] == [60.0, 120.0]
    assert 100 <= len(asked) - len(cron) <= 125, "about one ask a second for the back-to-back one"
