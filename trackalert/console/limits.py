"""Bounds of the control socket: how many connections it holds, and a log that a flood cannot flood.

The C++ daemon held every console connection for as long as the peer liked: 2,000 idle
connections that never sent a nonce took its file descriptors, and the REST API stopped answering
with them. Here the server admits at most `max_conns` connections (`setMaxConsoleConns`). When
it is full, a newcomer takes the place of the oldest connection that has not proved the key yet
(it has sent no valid command): a flood of idle connections then only ever holds the slots of its
own newest members, while an operator's client, which proves the key within one round trip,
still gets in. Only when every slot holds an authenticated session is a newcomer refused.

Every refusal, eviction and timeout is logged, but at most `burst` lines per `period` for each
kind of message; the rest are counted and summed up in one line, so a flood costs a few lines.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from trackalert import log

if TYPE_CHECKING:
    from trackalert.clock import Clock

#: Lines of one kind logged per period before the rest are only counted.
LOG_BURST = 10
LOG_PERIOD = 10.0


class LogThrottle:
    """One kind of log message, at most `burst` lines per `period` seconds of `clock`. The lines
    left out are summed up in one line when the period ends (on the clock, so a virtual clock
    drives it in tests) or, without an event loop, before the next line."""

    def __init__(
        self,
        clock: "Clock",
        what: str,
        level: int = logging.INFO,
        burst: int = LOG_BURST,
        period: float = LOG_PERIOD,
    ) -> None:
        self._clock = clock
        self._what = what
        self._level = level
        self._burst = burst
        self._period = period
        self._start = clock.monotonic()
        self._logged = 0
        self._summary: asyncio.Task[None] | None = None
        self.suppressed = 0

    def log(self, message: str, *args: Any) -> None:
        now = self._clock.monotonic()
        if now - self._start >= self._period:
            self._new_period(now)
        if self._logged < self._burst:
            self._logged += 1
            log.logger.log(self._level, message, *args)
            return
        self.suppressed += 1
        if self._summary is None:
            self._summary = _spawn(self._summarise_at_period_end())

    def flush(self) -> None:
        """Log how many lines were left out since the last summary, if any."""
        summary, self._summary = self._summary, None
        if summary is not None and not _is_current(summary):
            summary.cancel()
        if self.suppressed:
            log.logger.log(
                self._level, "%d more %s in %g s were not logged one by one",
                self.suppressed, self._what, self._period,
            )
            self.suppressed = 0

    def _new_period(self, now: float) -> None:
        self.flush()
        self._start, self._logged = now, 0

    async def _summarise_at_period_end(self) -> None:
        await self._clock.sleep(max(0.0, self._start + self._period - self._clock.monotonic()))
        self._new_period(self._clock.monotonic())


def _is_current(task: "asyncio.Task[None]") -> bool:
    try:
        return task is asyncio.current_task()
    except RuntimeError:  # no running loop: certainly not that task
        return False


def _spawn(coroutine: Any) -> "asyncio.Task[None] | None":
    """A task for `coroutine` on the running loop; None (and the coroutine closed) without one."""
    try:
        return asyncio.get_running_loop().create_task(coroutine)
    except RuntimeError:
        coroutine.close()
        return None


@dataclass(eq=False)
class Slot:
    """One admitted connection: who it is and whether it has proved the key yet."""

    peer: str
    task: "asyncio.Task[None]"
    authenticated: bool = False


class ConnectionTable:
    """The admitted connections, oldest first, bounded by `limit()` (read on every admission)."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self._slots: dict["asyncio.Task[None]", Slot] = {}

    def __len__(self) -> int:
        return len(self._slots)

    def admit(self, slot: Slot) -> tuple[bool, Slot | None]:
        """(admitted, evicted): a free slot, else the oldest unauthenticated one's, else none.
        An evicted slot is out of the table at once; its owner still has to close it."""
        evicted = None
        if len(self._slots) >= max(1, self._limit()):
            evicted = next((s for s in self._slots.values() if not s.authenticated), None)
            if evicted is None:
                return False, None
            del self._slots[evicted.task]
        self._slots[slot.task] = slot
        return True, evicted

    def release(self, task: "asyncio.Task[None]") -> None:
        self._slots.pop(task, None)

    def tasks(self) -> list["asyncio.Task[None]"]:
        return list(self._slots)
