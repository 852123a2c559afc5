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

    def submit(self, report: "Report", delivery_id: str | None) -> "asyncio.Future[Appended]":
        """Enrich and append; the future resolves once the report is durable.

        The report is counted (and logged with -v) from a done-callback registered before the
        caller can await, so the count is up to date when the caller answers its 200.
        """
        enricher = self._host.enricher
        if enricher is not None:  # GeoIP and device attributes, frozen in the log
            report = enricher.enrich(report)
        future = self._log.submit(report, delivery_id)
        future.add_done_callback(functools.partial(self._stored, report))
        return future

    def _stored(self, report: "Report", future: "asyncio.Future[Appended]") -> None:
        if future.cancelled() or future.exception() is not None or future.result().duplicate:
            return
        self._host.count_report()
        if log.verbose():
            log.logger.info("%s", log.report_log_line(report))
