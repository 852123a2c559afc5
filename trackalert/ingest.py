"""Where a validated report enters the event log, whichever way it came in.

A report reaches the log either from this process's own web server or from a web worker process
(through the supervisor). Both must enrich it, append it, count it and write the verbose report
log line exactly the same way, so those steps live here once.
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING

from trackalert import log

if TYPE_CHECKING:
    from trackalert.eventlog.base import Appended, EventLog
    from trackalert.lua.host import Host
    from trackalert.report import Report


class Ingest:
    def __init__(self, host: "Host", eventlog: "EventLog") -> None:
        self._host = host
        self._log = eventlog

    def submit(
        self, report: "Report", delivery_id: str | None, fingerprint: bytes | None = None
    ) -> "asyncio.Future[Appended]":
        """Enrich and append; the future resolves once the report is durable (or failed).

        Its result decides the caller's 200, so the report is counted (`stats` reports, what
        was acknowledged: retried deliveries too, they get their 200 as well) *before* the
        future resolves: a `stats` request never sees a 200 that is not counted yet. A caller
        that gave up (cancelled) answers nothing, and is not counted. Raises ReportError at
        once for a report the log cannot store.
        """
        enricher = self._host.enricher
        if enricher is not None:  # GeoIP and device attributes, frozen in the log
            report = enricher.enrich(report)
        stored = self._log.submit(report, delivery_id, fingerprint)
        acknowledged: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        stored.add_done_callback(functools.partial(self._settle, report, acknowledged))
        return acknowledged

    def _settle(
        self, report: "Report", acknowledged: "asyncio.Future[Appended]",
        stored: "asyncio.Future[Appended]",
    ) -> None:
        if acknowledged.cancelled():
            return
        if stored.cancelled():
            acknowledged.cancel()
            return
        exc = stored.exception()
        if exc is not None:
            acknowledged.set_exception(exc)
            return
        appended = stored.result()
        self._host.count_report()
        if log.verbose() and not appended.duplicate:
            log.logger.info("%s", log.report_log_line(report))
        acknowledged.set_result(appended)
