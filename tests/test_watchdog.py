"""The watchdog on a virtual clock: a call past the threshold is warned about once and counted
once, holds the busy gauge while it runs, and frees it when it returns."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from trackalert.clock import VirtualClock
from trackalert.lua.host import Host
from trackalert.lua.pool import LuaPool
from trackalert.lua.state import LuaState, StateKind
from trackalert.lua.watchdog import watch_states
from trackalert.metrics import Metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise AssertionError(f"no sample {name}{labels}")


async def test_a_runaway_call_is_warned_once_counted_once_and_freed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = VirtualClock()
    host = Host()
    pool = LuaPool([LuaState(StateKind.WORKER, host, 0), LuaState(StateKind.WORKER, host, 1)], clock)
    metrics = Metrics()
    release = threading.Event()
    watchdog = asyncio.create_task(watch_states(pool, clock, lambda: 5.0, metrics, " of a test"))
    call = asyncio.create_task(pool.run("report", lambda state: release.wait(30)))
    try:
        while not pool.busy():  # the call has taken its state in the pool's thread
            await asyncio.sleep(0.001)
        with caplog.at_level(logging.WARNING, logger="trackalert"):
            await clock.advance(4.0)
            assert sample(metrics, "trackalert_lua_busy_states") == 0
            assert sample(metrics, "trackalert_lua_slow_calls_total", kind="report") == 0
            await clock.advance(3.0)  # the 1 s ticks reach 5 s: at the threshold
            assert sample(metrics, "trackalert_lua_busy_states") == 1
            await clock.advance(10.0)  # still running: not counted or warned about again
            assert sample(metrics, "trackalert_lua_slow_calls_total", kind="report") == 1
        warnings = [r.getMessage() for r in caplog.records if "has been running" in r.getMessage()]
        assert warnings == ["Lua report function has been running for 5 s in worker state 0 of a "
                            "test (LuaJIT cannot interrupt it; the other states carry on)"]
        release.set()
        assert await call is True
        await clock.advance(1.0)
        assert sample(metrics, "trackalert_lua_busy_states") == 0
    finally:
        release.set()
        watchdog.cancel()
        pool.close()


def test_the_busy_gauge_sums_the_core_and_the_policy_process() -> None:
    metrics = Metrics()
    metrics.set_lua_busy_states(1)
    metrics.set_lua_busy_states(2, source="policy process")
    assert sample(metrics, "trackalert_lua_busy_states") == 3
    metrics.set_lua_busy_states(0, source="policy process")  # it restarted
    assert sample(metrics, "trackalert_lua_busy_states") == 1
