"""Injectable time: the daemon runs on `RealClock`, tests and the replay tool on `VirtualClock`.

Everything that stamps, waits or schedules takes a clock instead of calling `time` directly, so a
test can advance a week in microseconds and a replay can fire background functions at their
historical times.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds since the epoch."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (for durations)."""

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` of this clock's time."""


class RealClock:
    """The system clock."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class VirtualClock:
    """A clock that only moves when told to; sleepers wake in deadline order as it passes them."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._start = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now - self._start

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + max(0.0, seconds), next(self._order), future))
        await future

    def pending(self) -> int:
        """How many sleepers are waiting (lets a test check that something is scheduled)."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking each sleeper at its own deadline and letting it run."""
        target = self._now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, future = heapq.heappop(self._sleepers)
            if future.done():
                continue
            self._now = max(self._now, deadline)
            future.set_result(None)
            # Let the woken task (and whatever it schedules) run before time moves on.
            for _ in range(10):
                await asyncio.sleep(0)
        self._now = max(self._now, target)
