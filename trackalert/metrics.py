"""Prometheus metrics: the C++ daemon's families first, in its order, then ours (reference §10.3).

Dashboards and alerts written for the C++ trackalert keep working because the first eleven
families have its names, HELP strings, labels and buckets. The families after them describe what
the Python daemon adds: the event log, policy lag and the Lua runtime.

`Metrics` owns a private `CollectorRegistry`: tests can create as many as they like, and nothing a
library registers on the global registry leaks into `/metrics`. The per-request methods only look
up pre-built children and do a locked add, so they are cheap enough for the hot path. Numbers
another component already keeps (connections, policy lag, event-log totals) are read at scrape
time through callbacks instead of being pushed on every change.
"""

from __future__ import annotations

import bisect
import logging
import math
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

#: Content-Type of `render()`'s output. Hard-coded: prometheus_client ≥ 0.22 makes
#: `CONTENT_TYPE_LATEST` the 1.0.0 format, but `generate_latest` writes 0.0.4.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: The C++ daemon's worker histograms.
WORKER_BUCKETS = (0.001, 0.01, 0.1, 1.0)
#: Append latency: an SQLite WAL commit takes ~0.1-1 ms, a slow disk or Elasticsearch up to ~1 s.
APPEND_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)
#: Reasons a report is refused before it reaches the log (created at 0 so rate() works at once).
REJECT_REASONS = ("json", "field", "remote", "too_large", "signature")
#: Kinds of Lua call, created at 0.
LUA_KINDS = ("report", "custom", "background")
#: The helpers a projection answers, created at 0 for both sources.
PROJECTED_HELPERS = ("countReports", "countDistinct", "recentReports", "lastSeen")

_log = logging.getLogger("trackalert")


class EventLogStats(Protocol):
    """What the event log's `stats` object offers (`trackalert.eventlog.base.AppendStats`)."""

    appended_total: int
    duplicates_total: int
    delivery_id_collisions_total: int
    commits_total: int
    last_batch_size: int
    pending: int


def _safe(source: Callable[[], float], what: str) -> Callable[[], float]:
    """Wrap a gauge callback so a failing one yields NaN instead of breaking the whole scrape."""

    def call() -> float:
        try:
            return float(source())
        except Exception:  # noqa: BLE001 - a scrape must always succeed
            _log.warning("metrics: the %s source failed", what, exc_info=True)
            return math.nan

    return call


class _EventLogCollector:
    """The event log's own counters, read at scrape time from its `stats` object.

    The log keeps plain integers (one writer, no locks) rather than calling into this module on
    every commit, so these families are built here from a snapshot instead of being pushed.
    """

    def __init__(self) -> None:
        self.source: Callable[[], EventLogStats] | None = None

    def collect(self) -> Iterator[Metric]:
        stats = self._read()
        counters = (
            ("trackalert_eventlog_appends",
             "Events durably written to the event log (all sources: HTTP, import).",
             "appended_total"),
            ("trackalert_eventlog_duplicates",
             "Appends acknowledged without writing because their delivery id was already "
             "stored (a retried wforce webhook).", "duplicates_total"),
            ("trackalert_eventlog_delivery_id_collisions",
             "Appends stored as new reports although their delivery id was stored before, "
             "with another body (wforce's ids are not unique).", "delivery_id_collisions_total"),
            ("trackalert_eventlog_commits",
             "Event-log commits; appends_total / commits_total is the mean group-commit "
             "batch size over any range.", "commits_total"),
        )
        for name, help_text, field in counters:
            family = CounterMetricFamily(name, help_text)
            if stats is not None:
                family.add_metric([], getattr(stats, field))
            yield family
        gauges = (
            ("trackalert_eventlog_commit_batch_size",
             "Events in the most recent event-log commit (group commit batches all appends "
             "that arrive while one commit is in flight).", "last_batch_size"),
            ("trackalert_eventlog_pending_appends",
             "Appends waiting for a commit; a growing number means storage cannot keep up.",
             "pending"),
        )
        for name, help_text, field in gauges:
            family = GaugeMetricFamily(name, help_text)
            if stats is not None:
                family.add_metric([], getattr(stats, field))
            yield family
        if stats is not None and hasattr(stats, "spool_depth"):  # an Elasticsearch log's spool
            yield from self._spool(stats)

    @staticmethod
    def _spool(stats: Any) -> Iterator[Metric]:
        families = (
            (GaugeMetricFamily, "trackalert_eventlog_spool_depth",
             "Reports in the local spool, answered 200 but not yet forwarded to the cluster.",
             "spool_depth"),
            (GaugeMetricFamily, "trackalert_eventlog_spool_age_seconds",
             "How long the oldest spooled report has been waiting for the cluster (0: empty).",
             "spool_age_seconds"),
            (CounterMetricFamily, "trackalert_eventlog_spooled",
             "Appends answered from the spool because the cluster was away.", "spooled_total"),
            (CounterMetricFamily, "trackalert_eventlog_spool_refused",
             "Spooled reports the cluster refused when they were forwarded (logged, dropped).",
             "spool_refused_total"),
        )
        for kind, name, help_text, field in families:
            family = kind(name, help_text)
            family.add_metric([], getattr(stats, field))
            yield family

    def _read(self) -> EventLogStats | None:
        if self.source is None:
            return None
        try:
            return self.source()
        except Exception:  # noqa: BLE001 - a scrape must always succeed
            _log.warning("metrics: the event log stats source failed", exc_info=True)
            return None


class _ProjectionCollector:
    """trackalert_projection_answers_total, read at scrape time from the projection's own
    counts: the policy runner adds to a plain dict on each helper call (measured: 158 ns, where
    a Prometheus child's locked inc costs 363 ns and looking the child up 1.2 µs more), so
    nothing is pushed from the hot path."""

    HELP = ("Long-term helper calls inside report(lt), by helper and by what answered them: "
            "source=projection (in-memory read models kept in step with the policy runner) or "
            "sql (a query: the filter is not covered, its shape is being built, or a key was "
            "loaded).")

    def __init__(self) -> None:
        self.calls: Mapping[tuple[str, str], int] | None = None

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("trackalert_projection_answers", self.HELP,
                                     labels=["helper", "source"])
        # a C-level copy, whole under the GIL, while the runner thread goes on counting
        counts = {(h, s): 0 for h in PROJECTED_HELPERS for s in ("projection", "sql")}
        counts.update(dict(self.calls) if self.calls is not None else {})
        for (helper, source), n in sorted(counts.items()):
            family.add_metric([helper, source], n)
        yield family


class _WithoutCreated:
    """A collector view of a registry without the `_created` samples.

    The C++ exposition has none and they double the series count. Filtering here instead of
    calling `prometheus_client.disable_created_metrics()` avoids flipping a process-wide switch
    that other registries (a library's, a test's) would also feel.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            created = family.name + "_created"
            family.samples = [s for s in family.samples if s.name != created]
            yield family


def observe_many(histogram: Histogram, values: Iterable[float]) -> None:
    """`histogram.observe(v)` for every value, with one locked add per bucket and one for the sum.

    The core merges its web workers' latencies every half second: observing them one by one
    (a lock and a walk over the buckets each) cost the core ~1.5 µs per report and histogram.
    Same bucket rule as `observe`: the first upper bound >= the value.
    """
    bounds = histogram._upper_bounds  # noqa: SLF001 - prometheus_client has no bulk observe
    counts = [0] * len(bounds)
    total = 0.0
    find = bisect.bisect_left
    for value in values:
        counts[find(bounds, value)] += 1
        total += value
    histogram._sum.inc(total)  # noqa: SLF001
    for bucket, count in zip(histogram._buckets, counts):  # noqa: SLF001
        if count:
            bucket.inc(count)


class Metrics:
    """Every metric the daemon exposes, with the small methods the other components call."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._commands: dict[str, Counter] = {}
        self._custom: dict[str, Counter] = {}
        self._eventlog = _EventLogCollector()
        self._projection = _ProjectionCollector()
        self._build_compat_families()
        self._build_own_families()
        self._build_schedule_webhook_families()
        self._view = _WithoutCreated(self.registry)

    # -- construction ----------------------------------------------------------------------------

    def _build_compat_families(self) -> None:
        r = self.registry
        self._worker_queue = Histogram(
            "trackalert_worker_queue_duration_seconds",
            "How many seconds do worker threads have to wait to run?",
            buckets=WORKER_BUCKETS, registry=r)
        self._worker_response = Histogram(
            "trackalert_worker_response_duration_seconds",
            "How many seconds do worker threads take to run?",
            buckets=WORKER_BUCKETS, registry=r)
        self._connections = Gauge(
            "trackalert_active_http_connections",
            "How many active connections to the REST API?", registry=r)
        Gauge("trackalert_web_queue_size",
              "How full is the REST API worker thread queue?", registry=r)
        self._webhook_queue = Gauge(
            "trackalert_webhook_queue_size",
            "How full is the webhook worker thread queue?", registry=r)
        self._command_counter = Counter(
            "trackalert_commands_total",
            "How many commands have been received?", ["cmd"], registry=r)
        self._custom_counter = Counter(
            "trackalert_custom_stats_total",
            "Count of custom stats (by type)", ["metric"], registry=r)
        self._dns_queries = Counter(
            "trackalert_dns_queries_total",
            "How many DNS queries were performed?", ["resolver"], registry=r)
        self._dns_response = Histogram(
            "trackalert_dns_query_response_seconds",
            "How long do DNS queries take?", ["resolver"], buckets=WORKER_BUCKETS, registry=r)
        Counter("trackalert_webhook_events_total",
                "How many webhook events occurred?", ["id", "url", "status"], registry=r)
        self._custom_webhooks = Counter(
            "trackalert_custom_webhook_events_total",
            "How many custom webhook events occurred?", ["id", "url", "status"], registry=r)

    def _build_own_families(self) -> None:
        r = self.registry
        self._reports = Counter(
            "trackalert_reports_total",
            "Reports acknowledged (200) by the report endpoint, retried deliveries included "
            "(the `reports` of stats).", registry=r)
        self._rejected = Counter(
            "trackalert_reports_rejected_total",
            "Reports refused before reaching the event log, by reason (json: body not a JSON "
            "object, field: a field of the wrong type, remote: unparseable address, "
            "too_large: body over the size limit, signature: X-Wforce-Signature missing or "
            "wrong under setReportSecret).", ["reason"], registry=r)
        self._append_duration = Histogram(
            "trackalert_eventlog_append_duration_seconds",
            "Time from an append request to its durable acknowledgement, group-commit wait "
            "included: the latency the event log adds to each report response.",
            buckets=APPEND_BUCKETS, registry=r)
        r.register(self._eventlog)
        self._lag_events = Gauge(
            "trackalert_policy_lag_events",
            "Logged events the report policy has not run on yet.", registry=r)
        self._lag_seconds = Gauge(
            "trackalert_policy_lag_seconds",
            "Age of the oldest logged event the report policy has not run on yet "
            "(0 when caught up).", registry=r)
        r.register(self._projection)
        self._lua_errors = Counter(
            "trackalert_lua_errors_total",
            "Lua calls that raised an error, by function (report, custom:<name>, "
            "background:<name>, ...).", ["function"], registry=r)
        self._lua_calls = Counter(
            "trackalert_lua_calls_total",
            "Lua policy calls made, by kind (report, custom, background).", ["kind"], registry=r)
        self._lua_slow = Counter(
            "trackalert_lua_slow_calls_total",
            "Lua calls that ran past the slow-call threshold (each also logged as a warning), "
            "by kind; counted while still running.", ["kind"], registry=r)
        self._lua_busy_by_source: dict[str, int] = {}
        self._lua_busy = Gauge(
            "trackalert_lua_busy_states",
            "Lua states running one call past the slow-call threshold right now. A runaway "
            "LuaJIT loop cannot be interrupted; this shows it holding a state.", registry=r)
        for reason in REJECT_REASONS:
            self._rejected.labels(reason=reason)
        for kind in LUA_KINDS:
            self._lua_calls.labels(kind=kind)
            self._lua_slow.labels(kind=kind)

    # -- exposition ------------------------------------------------------------------------------

    def render(self) -> bytes:
        """The text exposition (format 0.0.4) for `GET /metrics`; send it with `CONTENT_TYPE`."""
        return generate_latest(self._view)  # type: ignore[arg-type]

    # -- web layer -------------------------------------------------------------------------------

    def response_duration(self, seconds: float) -> None:
        """A command handler's run time (the C++ `worker_response_duration`)."""
        self._worker_response.observe(seconds)

    def response_durations(self, seconds: Iterable[float]) -> None:
        """Many run times at once (what a web worker measured since its last statistics)."""
        observe_many(self._worker_response, seconds)

    def queue_duration(self, seconds: float) -> None:
        """A worker queue wait; the C++ daemon never observes it, so the family stays at zero."""
        self._worker_queue.observe(seconds)

    def set_active_connections(self, count: int) -> None:
        """Push the current REST API connection count."""
        self._connections.set(count)

    def set_connection_source(self, source: Callable[[], float]) -> None:
        """Read the connection count at scrape time instead (always current, no refresh loop)."""
        self._connections.set_function(_safe(source, "connection count"))

    def register_command(self, name: str) -> None:
        """Create the `cmd` series at 0 (report, stats, readyz, livez, custom endpoints)."""
        self._commands[name] = self._command_counter.labels(cmd=name)

    def command(self, name: str, count: int = 1) -> None:
        """Count one command. Unregistered names are ignored: they come from request paths, and
        counting them would let any client create series without bound."""
        child = self._commands.get(name)
        if child is not None:
            child.inc(count)

    def report_accepted(self, count: int = 1) -> None:
        """Reports were acknowledged (the C++ `reports` count, as a counter)."""
        self._reports.inc(count)

    def report_rejected(self, reason: str, count: int = 1) -> None:
        """Reports were refused before the log; `reason` is one of `REJECT_REASONS`."""
        self._rejected.labels(reason=reason).inc(count)

    # -- custom stats and webhooks ---------------------------------------------------------------

    def register_custom_stat(self, name: str) -> None:
        """`declareCustomStat(name)`: create the series at 0."""
        self._custom[name] = self._custom_counter.labels(metric=name)

    def inc_custom_stat(self, name: str) -> None:
        """`incCustomStat(name)`; undeclared names are ignored, as in the C++ daemon."""
        child = self._custom.get(name)
        if child is not None:
            child.inc()

    def register_custom_webhook(self, hook_id: int | str, url: str) -> None:
        """Create the ok and error series of a custom webhook at 0."""
        for status in ("ok", "error"):
            self._custom_webhooks.labels(id=str(hook_id), url=url, status=status)

    def webhook_result(self, hook_id: int | str, url: str, ok: bool) -> None:
        """Count one custom webhook delivery attempt's outcome."""
        status = "ok" if ok else "error"
        self._custom_webhooks.labels(id=str(hook_id), url=url, status=status).inc()

    def set_webhook_queue_size(self, size: int) -> None:
        """Push the number of webhook deliveries waiting."""
        self._webhook_queue.set(size)

    def set_webhook_queue_source(self, source: Callable[[], float]) -> None:
        """Read the webhook queue depth at scrape time instead."""
        self._webhook_queue.set_function(_safe(source, "webhook queue"))

    def dns_query(self, resolver: str, seconds: float) -> None:
        """A DNS lookup by a named resolver (parity only: trackalert's Lua has no resolvers)."""
        self._dns_queries.labels(resolver=resolver).inc()
        self._dns_response.labels(resolver=resolver).observe(seconds)

    # -- event log and policy runner -------------------------------------------------------------

    def append_duration(self, seconds: float) -> None:
        """One append acknowledged after `seconds` (duplicates included: they answer wforce too)."""
        self._append_duration.observe(seconds)

    def append_durations(self, seconds: Iterable[float]) -> None:
        """Many appends' durations at once (a web worker's, since its last statistics)."""
        observe_many(self._append_duration, seconds)

    def set_eventlog_source(self, source: Callable[[], EventLogStats]) -> None:
        """Register the event log's stats object; it is read at each scrape."""
        self._eventlog.source = source

    def set_lag_source(self, events: Callable[[], float], seconds: Callable[[], float]) -> None:
        """Register the policy runner's lag callbacks; they are read at each scrape."""
        self._lag_events.set_function(_safe(events, "policy lag (events)"))
        self._lag_seconds.set_function(_safe(seconds, "policy lag (seconds)"))

    def set_projection_calls(self, calls: Mapping[tuple[str, str], int]) -> None:
        """Register the projection's (helper, source) -> calls counts; read at each scrape."""
        self._projection.calls = calls

    # -- Lua runtime -----------------------------------------------------------------------------

    def lua_calls(self, kind: str, count: int = 1) -> None:
        """`count` Lua calls of `kind` were made (the runner counts a batch at once)."""
        self._lua_calls.labels(kind=kind).inc(count)

    def lua_error(self, function: str) -> None:
        """A Lua call raised; `function` is `report`, `custom:<name>`, `background:<name>`..."""
        self._lua_errors.labels(function=function).inc()

    def lua_slow_call(self, kind: str) -> None:
        """A Lua call of `kind` crossed the slow-call threshold (counted once per call)."""
        self._lua_slow.labels(kind=kind).inc()

    def set_lua_busy_states(self, count: int, source: str = "core") -> None:
        """How many of `source`'s states are running a call past the threshold (each process's
        watchdog polls its pool, so a call that never returns is still seen); the gauge is the
        sum over the core and the policy process."""
        self._lua_busy_by_source[source] = count
        self._lua_busy.set(sum(self._lua_busy_by_source.values()))

    # -- background functions and the webhook outbox ---------------------------------------------

    def _build_schedule_webhook_families(self) -> None:
        r = self.registry
        self._background_runs = Counter(
            "trackalert_background_runs",
            "Scheduled background function runs, by name and status (ok, error, skipped: the "
            "previous run of that name was still going, missing: no worker state registered "
            "the name with setBackground).", ["name", "status"], registry=r)
        self._outbox_depth = Gauge(
            "trackalert_webhook_outbox_depth",
            "Custom webhook deliveries in the persisted outbox, waiting to be sent or retried.",
            registry=r)
        self._webhook_retries = Counter(
            "trackalert_webhook_retries",
            "Custom webhook deliveries rescheduled after a failed attempt (transport error, "
            "timeout, 5xx, 408, 429).", ["id", "url"], registry=r)
        self._webhook_expired = Counter(
            "trackalert_webhook_expired",
            "Custom webhook deliveries given up because their expiry (setWebHookExpiry) "
            "passed before a receiver accepted them; each is logged.", ["id", "url"], registry=r)
        self._webhook_permanent = Counter(
            "trackalert_webhook_permanent_failures",
            "Custom webhook deliveries refused by the receiver with a 4xx other than 408/429: "
            "not retried; each is logged.", ["id", "url"], registry=r)
        self._webhook_outbox_full = Counter(
            "trackalert_webhook_outbox_full",
            "runCustomWebHook calls refused because the outbox held setWebHookQueueSize "
            "deliveries (the call returned false and was logged).", ["id", "url"], registry=r)

    def register_background(self, name: str) -> None:
        """Create a scheduled name's ok, error and skipped series at 0."""
        for status in ("ok", "error", "skipped"):
            self._background_runs.labels(name=name, status=status)

    def background_run(self, name: str, status: str) -> None:
        """One scheduled run of `name` ended with `status` (ok, error, skipped, missing)."""
        self._background_runs.labels(name=name, status=status).inc()

    def set_webhook_outbox_source(self, source: Callable[[], float]) -> None:
        """Read the outbox depth at scrape time."""
        self._outbox_depth.set_function(_safe(source, "webhook outbox depth"))

    def register_webhook_outcomes(self, hook_id: int | str, url: str) -> None:
        """Create a custom webhook's retry, expiry, permanent-failure and full series at 0."""
        for family in (self._webhook_retries, self._webhook_expired, self._webhook_permanent,
                       self._webhook_outbox_full):
            family.labels(id=str(hook_id), url=url)

    def webhook_retry(self, hook_id: int | str, url: str) -> None:
        """A failed delivery attempt was rescheduled."""
        self._webhook_retries.labels(id=str(hook_id), url=url).inc()

    def webhook_expired(self, hook_id: int | str, url: str) -> None:
        """A delivery was given up after its expiry."""
        self._webhook_expired.labels(id=str(hook_id), url=url).inc()

    def webhook_permanent_failure(self, hook_id: int | str, url: str) -> None:
        """A receiver refused a delivery for good (4xx other than 408/429)."""
        self._webhook_permanent.labels(id=str(hook_id), url=url).inc()

    def webhook_outbox_full(self, hook_id: int | str, url: str) -> None:
        """runCustomWebHook was refused: the outbox is full."""
        self._webhook_outbox_full.labels(id=str(hook_id), url=url).inc()
