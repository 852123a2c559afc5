"""Where a validated report enters the event log, whichever way it came in.

A report reaches the log either from this process's own web server or from a web worker process
(through the supervisor). Both must enrich it, encode it, append it, count it and write the
verbose report log line exactly the same way, so those steps live here once:

* `prepare` enriches and encodes a report into the row it is stored as, plus its maps. A web
  worker runs it (`Handover`) and sends the result: the core process, whose CPU bounds the whole
  daemon's ingest rate, then only rebuilds the `Report` the policies need and inserts the row.
* `Ingest` (in the core process) appends prepared reports, counts the acknowledged ones before
  their answer leaves, and logs them.
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING, Any, Callable, Mapping

from trackalert import log
from trackalert.eventlog.base import delivery_key
from trackalert.eventlog.rows import DELIVERY_COLUMN, encode_enriched, report_from_row
from trackalert.report import Report, parse_delivery_id

if TYPE_CHECKING:
    from trackalert.enrich import Enricher
    from trackalert.eventlog.base import Appended, EventLog
    from trackalert.lua.host import Host

#: A report as handed over: (row as `encode_row` builds it, (attrs, attrs_mv, device_attrs,
#: extra)) -- builtins only, so it crosses a process boundary with marshal.
Prepared = tuple[tuple, tuple[dict, dict, dict, dict]]
#: What the log appends: (row, report, delivery key or None).
Append = tuple[tuple, Report, Any]
Outcomes = list["Appended | Exception"]


def prepare(enricher: "Enricher | None", report: Report, delivery_id: str | None) -> Prepared:
    """The enriched report's row and maps, for a report `parse_report` validated (its texts are
    proven Unicode: the row's UTF-8 proof is not repeated). Raises ReportError for a report the
    log cannot store, so that it fails alone, before it joins anything."""
    delivery_id = parse_delivery_id(delivery_id)
    if enricher is None:
        device_attrs, device_json, geo = report.device_attrs, None, report.geo
    else:
        device_attrs, device_json, geo = enricher.lookup(report)
    row = encode_enriched(report, delivery_id, device_attrs, device_json, geo, text_proven=True)
    return row, (report.attrs, report.attrs_mv, device_attrs, report.extra)


def unpack(prepared: Prepared, fingerprint: bytes | None) -> Append:
    """What the log appends for a prepared report: the row, the report rebuilt from it (what
    the policies and the log's listeners see), and its delivery key."""
    row, maps = prepared
    report = report_from_row(row, *maps)
    delivery_id = row[DELIVERY_COLUMN]
    if delivery_id is None:
        return row, report, None
    if fingerprint is None:
        return row, report, delivery_key(report, delivery_id, None)
    return row, report, (delivery_id, fingerprint)


class Handover:
    """A web worker's half of ingest: enrich and encode each report before it goes to the core.

    The enricher is built from the `enrichment` part of the settings the core pushes (the
    databases its own enricher reads, the device parser's regexes, the reload generation), and
    rebuilt whenever that changes. If it cannot be built here (a database file that will not
    open), reports go as plain fields and the core enriches them as it would its own.
    """

    def __init__(self) -> None:
        self._seen: Any = None
        self._snapshot: Any = None
        self._enricher: "Enricher | None" = None
        self._usable = False

    def __call__(
        self, report: Report, delivery_id: str | None, fingerprint: bytes | None,
        settings: Mapping[str, Any],
    ) -> tuple[tuple, str | None, bytes | None]:
        """(payload, delivery id, fingerprint) for the core: the payload is a `Prepared`, or
        (None, report fields) when this worker cannot enrich."""
        snapshot = settings.get("enrichment")
        if snapshot is not self._seen:
            self._update(snapshot)
        if not self._usable:
            return (None, report.fields()), delivery_id, fingerprint
        return prepare(self._enricher, report, delivery_id), delivery_id, fingerprint

    def enricher(self, settings: Mapping[str, Any]) -> "Enricher | None":
        """The enricher this worker prepares reports with under `settings`; None when it
        cannot enrich (then only `__call__` knows what to hand over). For a web worker that
        encodes the row without a Report (frontend/report_row.py)."""
        snapshot = settings.get("enrichment")
        if snapshot is not self._seen:
            self._update(snapshot)
        return self._enricher if self._usable else None

    def _update(self, snapshot: Any) -> None:
        self._seen = snapshot
        if snapshot == self._snapshot and snapshot is not None:
            return
        self._snapshot = snapshot
        previous, self._enricher, self._usable = self._enricher, None, False
        if snapshot is None:
            return
        from trackalert.enrich import Enricher  # GeoIP and ua-parser: only where they are used
        from trackalert.geoip import GeoIPError

        try:
            self._enricher = Enricher.from_snapshot(snapshot, previous)
        except (GeoIPError, Exception) as exc:  # a database, or the -R regexes, will not load
            log.logger.error("Web worker cannot open the enrichment databases (%s): the core "
                             "process enriches its reports instead", exc)
            return
        self._usable = True


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
        append = unpack(prepare(self._host.enricher, report, delivery_id), fingerprint)
        acknowledged: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        self._log.submit_rows([append], functools.partial(self._settle_one, append, acknowledged))
        return acknowledged

    def submit_prepared(
        self, handed: list[tuple], done: Callable[[Outcomes], None],
    ) -> None:
        """Append reports a web worker handed over (`Handover`), as one group; `done` gets every
        outcome in order (an `Appended`, or the exception of a report that failed), once all
        are settled and the acknowledged ones counted. Reports the worker could not prepare are
        prepared here; one that cannot be stored fails alone.

        Each item is the worker's message as it came: (kind, request id, payload, delivery id,
        fingerprint), read in place (no slice or intermediate tuple per report: the core
        process's CPU per report bounds the whole daemon's ingest rate)."""
        appends: list[Append] = []
        append = appends.append
        failed: dict[int, Exception] | None = None
        for index, item in enumerate(handed):
            payload = item[2]
            try:
                row = payload[0]
                if row is None:  # plain fields: the worker could not enrich
                    row, maps = prepare(self._host.enricher, Report(*payload[1]), item[3])
                else:
                    maps = payload[1]
                delivery_id = row[DELIVERY_COLUMN]
                report = report_from_row(row, *maps)
                if delivery_id is None:
                    append((row, report, None))
                elif item[4] is None:
                    append((row, report, delivery_key(report, delivery_id, None)))
                else:
                    append((row, report, (delivery_id, item[4])))
            except Exception as exc:
                if failed is None:
                    failed = {}
                failed[index] = exc
        if failed:
            done = functools.partial(_merge_failures, failed, len(handed), done)
        self._log.submit_rows(appends, functools.partial(self._settle, appends, done))

    def _settle(self, appends: list[Append], done: Callable[[Outcomes], None],
                outcomes: Outcomes) -> None:
        if log.verbose():
            accepted = 0
            for (_row, report, _key), outcome in zip(appends, outcomes):
                if isinstance(outcome, BaseException):
                    continue
                accepted += 1
                if not outcome.duplicate:
                    log.logger.info("%s", log.report_log_line(report))
        else:
            accepted = len(outcomes) - sum(isinstance(o, BaseException) for o in outcomes)
        if accepted:
            self._host.count_report(accepted)
        done(outcomes)

    def _settle_one(self, append: Append, acknowledged: "asyncio.Future[Appended]",
                    outcomes: Outcomes) -> None:
        if acknowledged.cancelled():
            return
        outcome = outcomes[0]
        if isinstance(outcome, BaseException):
            acknowledged.set_exception(outcome)
            return
        self._host.count_report()
        if log.verbose() and not outcome.duplicate:
            log.logger.info("%s", log.report_log_line(append[1]))
        acknowledged.set_result(outcome)


def _merge_failures(failed: dict[int, Exception], size: int, done: Callable[[Outcomes], None],
                    stored: Outcomes) -> None:
    """The outcomes in the order handed over: the failures of preparation among the appended."""
    appended = iter(stored)
    done([failed[i] if i in failed else next(appended) for i in range(size)])
