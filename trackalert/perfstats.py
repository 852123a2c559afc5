"""Five-minute windowed counters: perf stats, command stats and custom stats (reference §10.1).

These are the numbers `showPerfStats()`, `showCommandStats()`, `showCustomStats()`, the `stats`
endpoint and the every-300-s log lines report: "how much happened in the last five minutes". They
are kept apart from Prometheus, whose counters are cumulative and leave windowing to the server.

Time comes from an injected clock (monotonic seconds), so tests can expire a window by advancing a
`VirtualClock` instead of waiting five minutes, and a wall-clock step cannot corrupt the windows.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable, Iterable

from trackalert import log
from trackalert.clock import Clock

#: 20 windows of 15 s: the C++ daemon's 5-minute sliding window.
NUM_WINDOWS = 20
WINDOW_SECONDS = 15.0
#: How often the stats lines are logged, and the span they describe.
REPORT_INTERVAL = NUM_WINDOWS * WINDOW_SECONDS

#: Bucket suffixes, upper bounds in integer milliseconds (inclusive); anything above is `_Slow`.
_BUCKETS: tuple[tuple[str, int], ...] = (
    ("_0_1", 1),
    ("_1_10", 10),
    ("_10_100", 100),
    ("_100_1000", 1000),
)
_SLOW = "_Slow"
_SUFFIXES = tuple(suffix for suffix, _ in _BUCKETS) + (_SLOW,)
#: Display order of showPerfStats and the log line: queue waits first, then run times.
PERF_STAT_NAMES: tuple[str, ...] = tuple(
    f"{prefix}{suffix}" for prefix in ("WTW", "WTR") for suffix in _SUFFIXES
)


class WindowedCounters:
    """Exact named counters over a sliding window of `windows` × `width` seconds.

    Each window slot remembers which window index (time since start // width) it holds; a slot
    reached again after a full turn belongs to a new index and is cleared before use. Reads sum
    the slots whose index lies within the last `windows` indexes, current one included, so a slot
    that nobody wrote to for five minutes stops counting without any background sweeper.
    """

    def __init__(
        self, clock: Clock, windows: int = NUM_WINDOWS, width: float = WINDOW_SECONDS
    ) -> None:
        if windows < 1 or width <= 0:
            raise ValueError("need at least one window of positive width")
        self._clock = clock
        self._windows = windows
        self._width = width
        self._start = clock.monotonic()
        self._indexes = [-1] * windows
        self._counts: list[dict[str, int]] = [{} for _ in range(windows)]
        self._lock = threading.Lock()

    @property
    def span(self) -> float:
        """Seconds covered by the window (300 by default)."""
        return self._windows * self._width

    def _current_index(self) -> int:
        return int((self._clock.monotonic() - self._start) // self._width)

    def add(self, name: str, n: int = 1) -> None:
        """Count `n` occurrences of `name` now."""
        index = self._current_index()
        slot = index % self._windows
        with self._lock:
            if self._indexes[slot] != index:
                self._indexes[slot] = index
                self._counts[slot] = {}
            counts = self._counts[slot]
            counts[name] = counts.get(name, 0) + n

    def get(self, name: str) -> int:
        """Occurrences of `name` in the live windows."""
        return self.get_many((name,))[name]

    def get_many(self, names: Iterable[str]) -> dict[str, int]:
        """Several totals read under one lock, so they describe the same moment."""
        index = self._current_index()
        oldest = index - self._windows
        totals = {name: 0 for name in names}
        with self._lock:
            for slot_index, counts in zip(self._indexes, self._counts):
                if oldest < slot_index <= index:
                    for name in totals:
                        totals[name] += counts.get(name, 0)
        return totals


def _millis(seconds: float) -> int:
    """Whole milliseconds, truncated like the C++ `duration_cast<milliseconds>`.

    The nanosecond nudge absorbs binary rounding: 1.001 s * 1000 is 1000.9999999999999, which
    must file as 1001 ms, not 1000.
    """
    return max(0, int(seconds * 1000 + 1e-6))


def _bucket(prefix: str, seconds: float) -> str:
    millis = _millis(seconds)
    for suffix, upper in _BUCKETS:
        if millis <= upper:
            return prefix + suffix
    return prefix + _SLOW


class PerfStats:
    """The WTW_*/WTR_* latency buckets over the last five minutes."""

    def __init__(self, clock: Clock) -> None:
        self._counters = WindowedCounters(clock)

    def record_response(self, seconds: float) -> None:
        """File one command handler's run time (WTR_*), as every handled HTTP command does."""
        self._counters.add(_bucket("WTR", seconds))

    def record_responses(self, seconds: Iterable[float]) -> None:
        """`record_response` for many run times (a web worker's), one locked add per bucket."""
        filed: dict[str, int] = {}
        for value in seconds:
            name = _bucket("WTR", value)
            filed[name] = filed.get(name, 0) + 1
        for name, count in filed.items():
            self._counters.add(name, count)

    def record_wait(self, seconds: float) -> None:
        """File one worker queue wait (WTW_*); the C++ daemon never does, so these stay 0."""
        self._counters.add(_bucket("WTW", seconds))

    def snapshot(self) -> dict[str, int]:
        """The `perfstats` object of the `stats` endpoint: all ten counts, keys sorted bytewise."""
        values = self._counters.get_many(PERF_STAT_NAMES)
        return {name: values[name] for name in sorted(values)}

    def show(self) -> str:
        """`showPerfStats()` output: one `NAME=n` line per bucket, waits first."""
        values = self._counters.get_many(PERF_STAT_NAMES)
        return "".join(f"{name}={values[name]}\n" for name in PERF_STAT_NAMES)

    def log_line(self) -> str:
        """The perf line logged every five minutes (trailing space kept: log parsers expect it)."""
        values = self._counters.get_many(PERF_STAT_NAMES)
        pairs = "".join(f"{name}={values[name]} " for name in PERF_STAT_NAMES)
        return f"perf stats last {int(self._counters.span)} secs: {pairs}"


class NamedStats:
    """Per-name counts over five minutes: command stats (`title="command"`) or custom stats.

    Every name is counted, but only registered ones are shown: the web layer counts whatever
    command it ran, while operators see the commands and `declareCustomStat` names they expect.
    """

    def __init__(self, clock: Clock, title: str) -> None:
        self._counters = WindowedCounters(clock)
        self._title = title
        self._registered: set[str] = set()
        self._lock = threading.Lock()

    @property
    def title(self) -> str:
        """The word that starts the log line (`command` or `custom`)."""
        return self._title

    def register(self, name: str) -> None:
        """Make `name` visible (at 0 until counted)."""
        with self._lock:
            self._registered.add(name)

    def is_registered(self, name: str) -> bool:
        """Whether `name` was registered."""
        return name in self._registered

    def names(self) -> list[str]:
        """Registered names, sorted bytewise."""
        with self._lock:
            return sorted(self._registered)

    def add(self, name: str, n: int = 1) -> None:
        """Count `n` occurrences of `name`, registered or not."""
        self._counters.add(name, n)

    def get(self, name: str) -> int:
        """Occurrences of `name` in the last five minutes."""
        return self._counters.get(name)

    def snapshot(self) -> dict[str, int]:
        """Counts of the registered names, sorted bytewise."""
        names = self.names()
        values = self._counters.get_many(names)
        return {name: values[name] for name in names}

    def show(self) -> str:
        """`showCommandStats()` / `showCustomStats()` output: `name=n` lines, sorted."""
        return "".join(f"{name}={count}\n" for name, count in self.snapshot().items())

    def log_line(self) -> str | None:
        """The five-minute log line, or None when nothing is registered (nothing is logged)."""
        counts = self.snapshot()
        if not counts:
            return None
        pairs = "".join(f"{name}={count} " for name, count in counts.items())
        return f"{self._title} stats last {int(self._counters.span)} secs: {pairs}"


def report_lines(perf: PerfStats, *named: NamedStats) -> list[str]:
    """The lines logged every five minutes: perf, then each named stats' line when it has one."""
    lines = [perf.log_line()]
    for stats in named:
        line = stats.log_line()
        if line is not None:
            lines.append(line)
    return lines


async def log_every(
    clock: Clock, interval: float, lines: Callable[[], list[str]]
) -> None:
    """Log `lines()` at notice level every `interval` seconds of `clock`, until cancelled.

    A failure to build the lines is logged and the loop goes on: a stats bug must not silently
    stop the reporting for the rest of the process's life.
    """
    while True:
        await clock.sleep(interval)
        try:
            for line in lines():
                log.notice(line)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - see docstring
            log.logger.exception("Failed to produce the periodic stats lines")
