"""trackalert.perfstats: bucket boundaries, window expiry on a virtual clock, exact output text."""

from __future__ import annotations

import asyncio
import io
import threading
from typing import Iterator

import pytest

from trackalert import log
from trackalert.clock import VirtualClock
from trackalert.perfstats import (
    PERF_STAT_NAMES,
    NamedStats,
    PerfStats,
    WindowedCounters,
    log_every,
    report_lines,
)


@pytest.fixture(autouse=True)
def _clean_logging() -> Iterator[None]:
    log.reset()
    yield
    log.reset()


def _wtr(perf: PerfStats) -> dict[str, int]:
    return {k: v for k, v in perf.snapshot().items() if k.startswith("WTR")}


# -- buckets ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "bucket"),
    [
        (0.0, "WTR_0_1"),
        (0.0005, "WTR_0_1"),
        (0.001, "WTR_0_1"),
        (0.0015, "WTR_0_1"),  # 1.5 ms truncates to 1
        (0.00199, "WTR_0_1"),
        (0.002, "WTR_1_10"),
        (0.010, "WTR_1_10"),
        (0.0109, "WTR_1_10"),
        (0.011, "WTR_10_100"),
        (0.100, "WTR_10_100"),
        (0.1009, "WTR_10_100"),  # 100.9 ms truncates to 100
        (0.101, "WTR_100_1000"),
        (1.000, "WTR_100_1000"),
        (1.0009, "WTR_100_1000"),
        (1.001, "WTR_Slow"),  # 1.001 * 1000 is 1000.999… in binary: still 1001 ms
        (30.0, "WTR_Slow"),
        (-0.5, "WTR_0_1"),  # a clock hiccup must not crash or vanish
    ],
)
def test_response_buckets(seconds: float, bucket: str) -> None:
    perf = PerfStats(VirtualClock())
    perf.record_response(seconds)
    counts = perf.snapshot()
    assert counts[bucket] == 1
    assert sum(counts.values()) == 1


def test_wait_buckets_stay_zero_unless_recorded() -> None:
    perf = PerfStats(VirtualClock())
    perf.record_response(0.05)
    assert all(v == 0 for k, v in perf.snapshot().items() if k.startswith("WTW"))
    perf.record_wait(0.05)
    assert perf.snapshot()["WTW_10_100"] == 1


def test_snapshot_keys_sorted_bytewise() -> None:
    assert list(PerfStats(VirtualClock()).snapshot()) == [
        "WTR_0_1", "WTR_100_1000", "WTR_10_100", "WTR_1_10", "WTR_Slow",
        "WTW_0_1", "WTW_100_1000", "WTW_10_100", "WTW_1_10", "WTW_Slow",
    ]


# -- windows ------------------------------------------------------------------------------------


async def test_counts_expire_after_300_seconds() -> None:
    clock = VirtualClock()
    perf = PerfStats(clock)
    perf.record_response(0.0005)
    await clock.advance(150)
    perf.record_response(0.0005)
    assert _wtr(perf)["WTR_0_1"] == 2
    await clock.advance(149.9)  # 299.9 s: the first window (0-15 s) is still live
    assert _wtr(perf)["WTR_0_1"] == 2
    await clock.advance(0.1)  # 300 s: window 0's slot now belongs to window 20
    assert _wtr(perf)["WTR_0_1"] == 1
    await clock.advance(150)
    assert _wtr(perf)["WTR_0_1"] == 0


async def test_windows_align_to_start_and_reused_slot_is_cleared() -> None:
    clock = VirtualClock()
    counters = WindowedCounters(clock)
    counters.add("x", 5)  # window 0
    await clock.advance(14.9)
    counters.add("x")  # still window 0
    await clock.advance(300)  # 314.9 s: window 20, same slot as window 0
    assert counters.get("x") == 0
    counters.add("x", 2)  # reuses the slot: old 6 must not come back
    assert counters.get("x") == 2


async def test_stale_slot_not_counted_after_long_idle() -> None:
    clock = VirtualClock()
    counters = WindowedCounters(clock)
    await clock.advance(40)  # window 2
    counters.add("y", 3)
    await clock.advance(3 * 300)  # a quarter hour with nothing written
    assert counters.get("y") == 0


async def test_custom_window_geometry() -> None:
    clock = VirtualClock()
    counters = WindowedCounters(clock, windows=2, width=1.0)
    assert counters.span == 2.0
    counters.add("a")
    await clock.advance(1)
    counters.add("a")
    assert counters.get_many(["a", "b"]) == {"a": 2, "b": 0}
    await clock.advance(1)
    assert counters.get("a") == 1


def test_invalid_geometry_rejected() -> None:
    with pytest.raises(ValueError):
        WindowedCounters(VirtualClock(), windows=0)
    with pytest.raises(ValueError):
        WindowedCounters(VirtualClock(), width=0)


def test_concurrent_adds_are_not_lost() -> None:
    counters = WindowedCounters(VirtualClock())

    def adder() -> None:
        for _ in range(5000):
            counters.add("n")

    threads = [threading.Thread(target=adder) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counters.get("n") == 40000


# -- text ---------------------------------------------------------------------------------------


def test_show_exact_text() -> None:
    perf = PerfStats(VirtualClock())
    for seconds in (0.0005, 0.0005, 0.005, 0.05, 0.5, 2.0, 2.5):
        perf.record_response(seconds)
    assert perf.show() == (
        "WTW_0_1=0\nWTW_1_10=0\nWTW_10_100=0\nWTW_100_1000=0\nWTW_Slow=0\n"
        "WTR_0_1=2\nWTR_1_10=1\nWTR_10_100=1\nWTR_100_1000=1\nWTR_Slow=2\n"
    )


def test_log_line_exact_text() -> None:
    perf = PerfStats(VirtualClock())
    perf.record_response(0.003)
    assert perf.log_line() == (
        "perf stats last 300 secs: WTW_0_1=0 WTW_1_10=0 WTW_10_100=0 WTW_100_1000=0 "
        "WTW_Slow=0 WTR_0_1=0 WTR_1_10=1 WTR_10_100=0 WTR_100_1000=0 WTR_Slow=0 "
    )


def test_perf_stat_names_order() -> None:
    assert PERF_STAT_NAMES == (
        "WTW_0_1", "WTW_1_10", "WTW_10_100", "WTW_100_1000", "WTW_Slow",
        "WTR_0_1", "WTR_1_10", "WTR_10_100", "WTR_100_1000", "WTR_Slow",
    )


def test_named_stats_registered_vs_unregistered() -> None:
    stats = NamedStats(VirtualClock(), "command")
    for name in ("stats", "report", "readyz", "livez"):
        stats.register(name)
    stats.add("report")
    stats.add("report")
    stats.add("stats")
    stats.add("nosuchcommand")
    assert stats.get("nosuchcommand") == 1  # counted…
    assert stats.show() == "livez=0\nreadyz=0\nreport=2\nstats=1\n"  # …but never displayed
    assert stats.log_line() == "command stats last 300 secs: livez=0 readyz=0 report=2 stats=1 "
    assert stats.names() == ["livez", "readyz", "report", "stats"]
    assert stats.snapshot() == {"livez": 0, "readyz": 0, "report": 2, "stats": 1}


def test_named_stats_counted_before_registration_show_up() -> None:
    stats = NamedStats(VirtualClock(), "custom")
    stats.add("Zeta", 3)
    stats.register("Zeta")
    stats.register("alpha")
    assert stats.show() == "Zeta=3\nalpha=0\n"  # bytewise: upper case first


def test_named_stats_nothing_registered() -> None:
    stats = NamedStats(VirtualClock(), "custom")
    stats.add("x")
    assert stats.show() == ""
    assert stats.log_line() is None


async def test_named_stats_expire() -> None:
    clock = VirtualClock()
    stats = NamedStats(clock, "custom")
    stats.register("hits")
    stats.add("hits")
    await clock.advance(300)
    assert stats.show() == "hits=0\n"


def test_report_lines_skip_empty_named_stats() -> None:
    clock = VirtualClock()
    commands = NamedStats(clock, "command")
    commands.register("report")
    custom = NamedStats(clock, "custom")
    lines = report_lines(PerfStats(clock), commands, custom)
    assert len(lines) == 2
    assert lines[0].startswith("perf stats last 300 secs: ")
    assert lines[1] == "command stats last 300 secs: report=0 "


# -- periodic logging ---------------------------------------------------------------------------


async def test_log_every_logs_notice_lines_each_interval() -> None:
    stream = io.StringIO()
    log.configure(level=5, facility=None, stream=stream)  # notice passes, info would not
    clock = VirtualClock()
    perf = PerfStats(clock)
    calls = 0

    def lines() -> list[str]:
        nonlocal calls
        calls += 1
        return [perf.log_line(), "second line"]

    task = asyncio.create_task(log_every(clock, 300, lines))
    await asyncio.sleep(0)
    await clock.advance(100)  # (a record in the first window would have expired at 300 s)
    perf.record_response(0.0001)
    await clock.advance(199)
    assert stream.getvalue() == ""
    await clock.advance(1)
    assert calls == 1
    assert stream.getvalue() == (
        "perf stats last 300 secs: WTW_0_1=0 WTW_1_10=0 WTW_10_100=0 WTW_100_1000=0 "
        "WTW_Slow=0 WTR_0_1=1 WTR_1_10=0 WTR_10_100=0 WTR_100_1000=0 WTR_Slow=0 \n"
        "second line\n"
    )
    await clock.advance(300)
    assert calls == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_log_every_survives_a_failing_source() -> None:
    stream = io.StringIO()
    log.configure(facility=None, stream=stream)
    clock = VirtualClock()
    results: list[list[str]] = []

    def lines() -> list[str]:
        if not results:
            results.append([])
            raise RuntimeError("boom")
        results.append(["ok"])
        return ["ok"]

    task = asyncio.create_task(log_every(clock, 10, lines))
    await asyncio.sleep(0)
    await clock.advance(10)
    assert "Failed to produce the periodic stats lines" in stream.getvalue()
    await clock.advance(10)
    assert stream.getvalue().endswith("ok\n")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_many_run_times_at_once_file_like_one_by_one() -> None:
    """A web worker's run times merged in one call fill the same WTR buckets."""
    durations = [0.0, 0.001, 0.0015, 0.002, 0.0109, 0.011, 0.1009, 0.101, 1.0009, 1.001, 30.0,
                 -0.5] * 4
    one, bulk = PerfStats(VirtualClock()), PerfStats(VirtualClock())
    for seconds in durations:
        one.record_response(seconds)
    bulk.record_responses(durations)
    assert bulk.snapshot() == one.snapshot()
    assert sum(bulk.snapshot().values()) == len(durations)
