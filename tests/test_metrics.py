"""trackalert.metrics: the exposition text, parsed back; compat family order; our families."""

from __future__ import annotations

import math

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from trackalert.eventlog.base import AppendStats
from trackalert.metrics import CONTENT_TYPE, Metrics

#: Reference §10.3, in the C++ order, with HELP strings and types.
COMPAT_FAMILIES = [
    ("trackalert_worker_queue_duration_seconds", "histogram",
     "How many seconds do worker threads have to wait to run?"),
    ("trackalert_worker_response_duration_seconds", "histogram",
     "How many seconds do worker threads take to run?"),
    ("trackalert_active_http_connections", "gauge", "How many active connections to the REST API?"),
    ("trackalert_web_queue_size", "gauge", "How full is the REST API worker thread queue?"),
    ("trackalert_webhook_queue_size", "gauge", "How full is the webhook worker thread queue?"),
    ("trackalert_commands", "counter", "How many commands have been received?"),
    ("trackalert_custom_stats", "counter", "Count of custom stats (by type)"),
    ("trackalert_dns_queries", "counter", "How many DNS queries were performed?"),
    ("trackalert_dns_query_response_seconds", "histogram", "How long do DNS queries take?"),
    ("trackalert_webhook_events", "counter", "How many webhook events occurred?"),
    ("trackalert_custom_webhook_events", "counter", "How many custom webhook events occurred?"),
]

OWN_FAMILIES = [
    ("trackalert_reports", "counter"),
    ("trackalert_reports_rejected", "counter"),
    ("trackalert_eventlog_append_duration_seconds", "histogram"),
    ("trackalert_eventlog_appends", "counter"),
    ("trackalert_eventlog_duplicates", "counter"),
    ("trackalert_eventlog_delivery_id_collisions", "counter"),
    ("trackalert_eventlog_commits", "counter"),
    ("trackalert_eventlog_commit_batch_size", "gauge"),
    ("trackalert_eventlog_pending_appends", "gauge"),
    ("trackalert_policy_lag_events", "gauge"),
    ("trackalert_policy_lag_seconds", "gauge"),
    ("trackalert_projection_answers", "counter"),
    ("trackalert_lua_errors", "counter"),
    ("trackalert_lua_calls", "counter"),
    ("trackalert_lua_slow_calls", "counter"),
    ("trackalert_lua_busy_states", "gauge"),
    ("trackalert_background_runs", "counter"),
    ("trackalert_webhook_outbox_depth", "gauge"),
    ("trackalert_webhook_retries", "counter"),
    ("trackalert_webhook_expired", "counter"),
    ("trackalert_webhook_permanent_failures", "counter"),
    ("trackalert_webhook_outbox_full", "counter"),
]


def _text(metrics: Metrics) -> str:
    return metrics.render().decode("utf-8")


def _families(metrics: Metrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(_text(metrics))}


def _value(metrics: Metrics, sample_name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(_text(metrics)):
        for sample in family.samples:
            if sample.name == sample_name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"no sample {sample_name}{labels}")


def test_content_type_is_the_0_0_4_text_format() -> None:
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_family_order_names_types_and_help() -> None:
    families = list(text_string_to_metric_families(_text(Metrics())))
    got = [(f.name, f.type) for f in families]
    assert got == [(n, t) for n, t, _ in COMPAT_FAMILIES] + OWN_FAMILIES
    for family, (_, _, help_text) in zip(families, COMPAT_FAMILIES):
        assert family.documentation == help_text
    for family in families[len(COMPAT_FAMILIES):]:
        assert len(family.documentation) > 20, family.name


def test_help_and_type_lines_use_the_total_suffix() -> None:
    text = _text(Metrics())
    assert "# HELP trackalert_commands_total How many commands have been received?\n" in text
    assert "# TYPE trackalert_commands_total counter\n" in text
    assert "# TYPE trackalert_worker_response_duration_seconds histogram\n" in text


def test_no_created_series_and_no_timestamps() -> None:
    metrics = Metrics()
    metrics.register_command("report")
    metrics.response_duration(0.002)
    text = _text(metrics)
    assert "_created" not in text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert samples
    assert all(s.timestamp is None for s in samples)


def test_global_registry_untouched() -> None:
    Metrics()
    assert REGISTRY.get_sample_value("trackalert_reports_total") is None


def test_two_instances_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.report_accepted()
    assert _value(a, "trackalert_reports_total") == 1.0
    assert _value(b, "trackalert_reports_total") == 0.0


def test_worker_histogram_buckets_render_like_the_cpp_labels() -> None:
    metrics = Metrics()
    metrics.response_duration(0.0005)
    metrics.response_duration(0.05)
    metrics.response_duration(3.0)
    text = _text(metrics)
    assert 'trackalert_worker_response_duration_seconds_bucket{le="0.001"} 1.0\n' in text
    assert 'trackalert_worker_response_duration_seconds_bucket{le="0.01"} 1.0\n' in text
    assert 'trackalert_worker_response_duration_seconds_bucket{le="0.1"} 2.0\n' in text
    assert 'trackalert_worker_response_duration_seconds_bucket{le="+Inf"} 3.0\n' in text
    assert "trackalert_worker_response_duration_seconds_count 3.0\n" in text
    # Never observed in the C++ daemon either, but present with all buckets at zero.
    assert 'trackalert_worker_queue_duration_seconds_bucket{le="0.001"} 0.0\n' in text
    les = [s.labels["le"] for s in _families(metrics)[
        "trackalert_worker_queue_duration_seconds"].samples if s.name.endswith("_bucket")]
    assert [float(le) for le in les] == [0.001, 0.01, 0.1, 1.0, math.inf]


def test_commands_created_at_zero_and_counted() -> None:
    metrics = Metrics()
    for name in ("report", "stats", "readyz", "custom"):
        metrics.register_command(name)
    text = _text(metrics)
    assert 'trackalert_commands_total{cmd="report"} 0.0\n' in text
    assert 'trackalert_commands_total{cmd="custom"} 0.0\n' in text
    metrics.command("report")
    metrics.command("report")
    metrics.command("unregistered")  # from a request path: must not create a series
    assert _value(metrics, "trackalert_commands_total", cmd="report") == 2.0
    assert 'cmd="unregistered"' not in _text(metrics)


def test_custom_stats_only_declared_names() -> None:
    metrics = Metrics()
    assert "trackalert_custom_stats_total{" not in _text(metrics)
    metrics.register_custom_stat("bad_logins")
    assert 'trackalert_custom_stats_total{metric="bad_logins"} 0.0\n' in _text(metrics)
    metrics.inc_custom_stat("bad_logins")
    metrics.inc_custom_stat("undeclared")
    assert _value(metrics, "trackalert_custom_stats_total", metric="bad_logins") == 1.0
    assert "undeclared" not in _text(metrics)


def test_custom_webhook_series() -> None:
    metrics = Metrics()
    metrics.register_custom_webhook(1, "http://hooks.example/alert")
    labels = {"id": "1", "url": "http://hooks.example/alert"}
    assert _value(metrics, "trackalert_custom_webhook_events_total", status="ok", **labels) == 0
    assert _value(metrics, "trackalert_custom_webhook_events_total", status="error", **labels) == 0
    metrics.webhook_result(1, "http://hooks.example/alert", ok=True)
    metrics.webhook_result(1, "http://hooks.example/alert", ok=True)
    metrics.webhook_result(1, "http://hooks.example/alert", ok=False)
    assert _value(metrics, "trackalert_custom_webhook_events_total", status="ok", **labels) == 2
    assert _value(metrics, "trackalert_custom_webhook_events_total", status="error", **labels) == 1


def test_unused_labelled_families_have_no_series() -> None:
    families = _families(Metrics())
    for name in ("trackalert_dns_queries", "trackalert_dns_query_response_seconds",
                 "trackalert_webhook_events"):
        assert families[name].samples == []


def test_dns_query_observation() -> None:
    metrics = Metrics()
    metrics.dns_query("local", 0.02)
    assert _value(metrics, "trackalert_dns_queries_total", resolver="local") == 1
    assert _value(metrics, "trackalert_dns_query_response_seconds_count", resolver="local") == 1


def test_gauges_set_and_sources() -> None:
    metrics = Metrics()
    metrics.set_active_connections(7)
    metrics.set_webhook_queue_size(3)
    assert _value(metrics, "trackalert_active_http_connections") == 7
    assert _value(metrics, "trackalert_webhook_queue_size") == 3
    depth = [11]
    metrics.set_webhook_queue_source(lambda: depth[0])
    assert _value(metrics, "trackalert_webhook_queue_size") == 11
    depth[0] = 12
    assert _value(metrics, "trackalert_webhook_queue_size") == 12
    metrics.set_connection_source(lambda: 2)
    assert _value(metrics, "trackalert_active_http_connections") == 2
    assert _value(metrics, "trackalert_web_queue_size") == 0


def test_reports_and_rejections() -> None:
    metrics = Metrics()
    for reason in ("json", "field", "remote", "too_large"):
        assert _value(metrics, "trackalert_reports_rejected_total", reason=reason) == 0
    metrics.report_accepted()
    metrics.report_rejected("remote")
    metrics.report_rejected("remote")
    assert _value(metrics, "trackalert_reports_total") == 1
    assert _value(metrics, "trackalert_reports_rejected_total", reason="remote") == 2


def test_append_duration_buckets() -> None:
    metrics = Metrics()
    metrics.append_duration(0.0003)
    metrics.append_duration(0.0004)
    metrics.append_duration(2.0)
    name = "trackalert_eventlog_append_duration_seconds"
    assert _value(metrics, f"{name}_bucket", le="0.0001") == 0
    assert _value(metrics, f"{name}_bucket", le="0.0005") == 2
    assert _value(metrics, f"{name}_bucket", le="1.0") == 2
    assert _value(metrics, f"{name}_count") == 3


def test_eventlog_families_read_the_stats_object_at_scrape_time() -> None:
    metrics = Metrics()
    # Without a source the families are present but empty.
    assert _families(metrics)["trackalert_eventlog_appends"].samples == []
    stats = AppendStats()
    metrics.set_eventlog_source(lambda: stats)
    assert _value(metrics, "trackalert_eventlog_appends_total") == 0
    stats.appended_total = 41
    stats.duplicates_total = 2
    stats.commits_total = 3
    stats.last_batch_size = 17
    stats.pending = 4
    assert _value(metrics, "trackalert_eventlog_appends_total") == 41
    assert _value(metrics, "trackalert_eventlog_duplicates_total") == 2
    assert _value(metrics, "trackalert_eventlog_commits_total") == 3
    assert _value(metrics, "trackalert_eventlog_commit_batch_size") == 17
    assert _value(metrics, "trackalert_eventlog_pending_appends") == 4


def test_failing_eventlog_source_leaves_families_empty() -> None:
    metrics = Metrics()

    def broken() -> AppendStats:
        raise RuntimeError("closed")

    metrics.set_eventlog_source(broken)
    families = _families(metrics)
    assert families["trackalert_eventlog_commits"].samples == []
    assert families["trackalert_reports"].samples  # the rest of the scrape is intact


def test_policy_lag_sources_read_at_scrape_time() -> None:
    metrics = Metrics()
    assert _value(metrics, "trackalert_policy_lag_events") == 0
    lag = {"events": 5, "seconds": 1.5}
    metrics.set_lag_source(lambda: lag["events"], lambda: lag["seconds"])
    assert _value(metrics, "trackalert_policy_lag_events") == 5
    assert _value(metrics, "trackalert_policy_lag_seconds") == 1.5
    lag["events"] = 0
    assert _value(metrics, "trackalert_policy_lag_events") == 0


def test_failing_source_does_not_break_the_scrape() -> None:
    metrics = Metrics()

    def broken() -> float:
        raise RuntimeError("cursor closed")

    metrics.set_lag_source(broken, lambda: 2.0)
    assert math.isnan(_value(metrics, "trackalert_policy_lag_events"))
    assert _value(metrics, "trackalert_policy_lag_seconds") == 2.0


def test_lua_calls_slow_calls_and_busy_states() -> None:
    metrics = Metrics()
    for kind in ("report", "custom", "background"):
        assert _value(metrics, "trackalert_lua_calls_total", kind=kind) == 0
        assert _value(metrics, "trackalert_lua_slow_calls_total", kind=kind) == 0
    metrics.lua_calls("report", 25)
    metrics.lua_calls("report")
    metrics.lua_slow_call("background")
    metrics.set_lua_busy_states(2)
    assert _value(metrics, "trackalert_lua_calls_total", kind="report") == 26
    assert _value(metrics, "trackalert_lua_slow_calls_total", kind="background") == 1
    assert _value(metrics, "trackalert_lua_busy_states") == 2
    metrics.set_lua_busy_states(0)
    assert _value(metrics, "trackalert_lua_busy_states") == 0


def test_lua_errors_by_function() -> None:
    metrics = Metrics()
    metrics.lua_error("custom:checkUser")
    metrics.lua_error("custom:checkUser")
    metrics.lua_error("background:hourly")
    assert _value(metrics, "trackalert_lua_errors_total", function="custom:checkUser") == 2
    assert _value(metrics, "trackalert_lua_errors_total", function="background:hourly") == 1


def test_label_values_are_escaped() -> None:
    metrics = Metrics()
    metrics.register_custom_stat('a"b\\c')
    assert 'trackalert_custom_stats_total{metric="a\\"b\\\\c"} 0.0\n' in _text(metrics)
    assert _value(metrics, "trackalert_custom_stats_total", metric='a"b\\c') == 0


#: Durations on and around every bucket bound of both latency families, and past the last.
_DURATIONS = [0.0, 0.00005, 0.0001, 0.00011, 0.00025, 0.0005, 0.001, 0.0012, 0.0025, 0.005,
              0.01, 0.0101, 0.025, 0.05, 0.1, 0.25, 0.5, 0.99, 1.0, 1.01, 7.5] * 3


def _buckets_and_count(metrics: Metrics, family: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for s in _families(metrics)[family].samples if not s.name.endswith("_sum")}


def test_bulk_observations_match_one_by_one() -> None:
    """A web worker's latencies merged at once land in the buckets `observe` would choose."""
    one, bulk = Metrics(), Metrics()
    for seconds in _DURATIONS:
        one.response_duration(seconds)
        one.append_duration(seconds)
    bulk.response_durations(_DURATIONS)
    bulk.append_durations(_DURATIONS)
    for family in ("trackalert_worker_response_duration_seconds",
                   "trackalert_eventlog_append_duration_seconds"):
        assert _buckets_and_count(bulk, family) == _buckets_and_count(one, family)
        assert _value(bulk, family + "_sum") == pytest.approx(_value(one, family + "_sum"))
        assert _value(bulk, family + "_count") == len(_DURATIONS)


def test_counts_of_many_reports_at_once() -> None:
    metrics = Metrics()
    metrics.report_accepted(5)
    metrics.report_accepted()
    metrics.report_rejected("json", 3)
    assert _value(metrics, "trackalert_reports_total") == 6
    assert _value(metrics, "trackalert_reports_rejected_total", reason="json") == 3
