"""The worker Lua states and the threads that run them.

Lua never runs on the event loop: a call takes a free worker state (LIFO, as the original: the most
recently used state is warm), runs in a worker thread (lupa releases the GIL while Lua runs) and
gives the state back. When every state is busy, callers wait their turn instead of the C++
daemon's undefined behaviour. LuaJIT cannot interrupt a runaway loop, so the pool records how long
each state has been busy: the daemon logs and exports calls that run too long.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, TypeVar

from trackalert.clock import Clock
from trackalert.lua.state import LuaState

T = TypeVar("T")


@dataclass
class BusyState:
    index: int
    kind: str
    since: float
    warned: bool = False


class LuaPool:
    def __init__(self, states: list[LuaState], clock: Clock) -> None:
        if not states:
            raise ValueError("the Lua pool needs at least one worker state")
        self.states = states
        self._clock = clock
        self._free: list[LuaState] = list(reversed(states))
        self._waiters: collections.deque[asyncio.Future[LuaState]] = collections.deque()
        self._executor = ThreadPoolExecutor(len(states), thread_name_prefix="lua")
        self._busy: dict[int, BusyState] = {}
        self._busy_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.states)

    async def run(self, kind: str, fn: Callable[[LuaState], T]) -> T:
        """Run `fn(state)` in a free worker state, in a worker thread."""
        state = await self._acquire()
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._call, state, kind, fn)
        finally:
            self._release(state)

    async def run_everywhere(self, fn: Callable[[LuaState], T]) -> list[T]:
        """Run `fn` in every worker state in turn (console commands change every state)."""
        results = []
        loop = asyncio.get_running_loop()
        for state in self.states:
            results.append(await loop.run_in_executor(self._executor, self._call, state, "console", fn))
        return results

    def busy(self) -> list[BusyState]:
        """States currently running a call, with when they started."""
        with self._busy_lock:
            return list(self._busy.values())

    def elapsed(self, busy: BusyState) -> float:
        return self._clock.monotonic() - busy.since

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _call(self, state: LuaState, kind: str, fn: Callable[[LuaState], T]) -> T:
        with state.lock:
            with self._busy_lock:
                self._busy[state.index] = BusyState(state.index, kind, self._clock.monotonic())
            try:
                return fn(state)
            finally:
                with self._busy_lock:
                    self._busy.pop(state.index, None)

    async def _acquire(self) -> LuaState:
        if self._free:
            return self._free.pop()
        waiter: asyncio.Future[LuaState] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            # Cancelled just after being handed a state: pass it on rather than leak it.
            if waiter.done() and not waiter.cancelled():
                self._release(waiter.result())
            raise

    def _release(self, state: LuaState) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(state)
                return
        self._free.append(state)
