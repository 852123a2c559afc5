"""Retention: keep the event log (its alerts and the delivery-id index) from growing without bound.

A separate loop rather than work done on append, so that the cost of deleting is paid in chunks
in the background, where it can interleave with ingestion, and so that tests can drive it with a
virtual clock.
"""

from __future__ import annotations

import asyncio
import logging

from trackalert.clock import Clock
from trackalert.eventlog.base import EventLog

logger = logging.getLogger("trackalert")


async def run_retention(
    log: EventLog,
    clock: Clock,
    keep_seconds: float,
    every: float = 3600.0,
    delivery_window: float = 86400.0,
) -> None:
    """Prune forever: events and alerts older than `keep_seconds`, delivery ids older than
    `delivery_window`.

    Runs one pass at once, then one every `every` seconds of `clock` time. A failed pass is
    logged and retried at the next interval: retention falling behind for an hour is harmless,
    a dead retention task is a disk slowly filling up.
    """
    while True:
        await retention_pass(log, clock, keep_seconds, delivery_window)
        await clock.sleep(every)


async def retention_pass(
    log: EventLog, clock: Clock, keep_seconds: float, delivery_window: float
) -> tuple[int, int, int] | None:
    """One pruning pass; returns (events, delivery ids, alerts) removed, or None when it failed.
    Alerts go by the same age as events (an alert's time is its event's received)."""
    now = clock.time()
    try:
        removed_events = await log.prune(now - keep_seconds)
        removed_deliveries = await log.prune_deliveries(now - delivery_window)
        removed_alerts = await asyncio.to_thread(log.alerts().prune, now - keep_seconds)
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("event log retention on %s failed; retrying later", log.location)
        return None
    logger.info(
        "event log retention on %s: removed %d events and %d alerts older than %.0f s and %d "
        "delivery ids older than %.0f s",
        log.location, removed_events, removed_alerts, keep_seconds, removed_deliveries,
        delivery_window,
    )
    return removed_events, removed_deliveries, removed_alerts
