"""Make a runaway Lua call loud: LuaJIT cannot interrupt a loop, so it is logged and counted.

The core and the policy process (trackalert.policyproc) each watch their own states: a report
that never returns holds a state of the policy process, not of the core, and without a watchdog
there it would be invisible. Each process counts into its own Metrics; the policy process sends
its figures to the core with its other counters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from trackalert import log

if TYPE_CHECKING:
    from trackalert.clock import Clock
    from trackalert.lua.pool import LuaPool
    from trackalert.metrics import Metrics

INTERVAL = 1.0


def check_states(pool: "LuaPool", threshold: float, metrics: "Metrics", where: str = "") -> int:
    """One look at the pool: warn once per call past `threshold` seconds (and count it);
    the number of states held by such calls right now."""
    slow = 0
    for busy in pool.busy():
        elapsed = pool.elapsed(busy)
        if elapsed < threshold:
            continue
        slow += 1
        if not busy.warned:
            busy.warned = True
            metrics.lua_slow_call(busy.kind)
            log.logger.warning(
                "Lua %s function has been running for %.0f s in worker state %d%s "
                "(LuaJIT cannot interrupt it; the other states carry on)",
                busy.kind, elapsed, busy.index, where,
            )
    metrics.set_lua_busy_states(slow)
    return slow


async def watch_states(pool: "LuaPool", clock: "Clock", threshold: Callable[[], float],
                       metrics: "Metrics", where: str = "", interval: float = INTERVAL) -> None:
    """`check_states` every `interval` seconds of `clock`, until cancelled. The threshold is
    read each time (setSlowLuaCallSeconds may change it from the console)."""
    while True:
        await clock.sleep(interval)
        check_states(pool, threshold(), metrics, where)
