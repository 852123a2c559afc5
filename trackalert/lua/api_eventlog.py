"""Lua globals for the event log and the report policy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from trackalert.durations import parse_span
from trackalert.lua.convert import describe, lua_type, scalar_text
from trackalert.lua.registry import Where, lua_global

if TYPE_CHECKING:
    from trackalert.lua.state import LuaState


@lua_global(
    "setEventLog", Where.CONFIG, "setEventLog(url)",
    """Where reports are stored before the policy sees them. `sqlite:///relative/path.db` or
    `sqlite:////absolute/path.db` (the default is `trackalert-events.db` next to the config
    file), or an Elasticsearch/OpenSearch cluster shared by several trackalert nodes:
    `elasticsearch://[user:password@]host[:port][,host...]/prefix[?tls=1&ca_file=PATH&api_key=KEY&templates=0&node=NAME]`
    (docs/elasticsearch.md; `node` is this daemon's id among the nodes, the host name by
    default: each node runs `report` for the reports it stored). Read once at start; a cluster
    that cannot be reached then stops the start with an error.""",
    example='setEventLog("sqlite:////var/lib/trackalert/events.db")', topic="eventlog",
)
def _set_event_log(state: "LuaState") -> Callable[[Any], None]:
    def set_event_log(url: Any) -> None:
        state.host.settings.eventlog_url = scalar_text(url, "event log URL")

    return set_event_log


@lua_global(
    "setEventLogRetention", Where.CONFIG, "setEventLogRetention(span)",
    """Delete events older than `span` (`"400d"`, `"12w"`, `"36h"`, ...), checked at start and
    every hour in the background without blocking ingestion. By default events are kept
    forever.""",
    example='setEventLogRetention("400d")', topic="eventlog",
)
def _set_retention(state: "LuaState") -> Callable[[Any], None]:
    def set_retention(span: Any) -> None:
        seconds = parse_span(scalar_text(span, "retention"))
        if seconds <= 0:
            raise ValueError("retention must be longer than 0s")
        state.host.settings.retention_seconds = seconds

    return set_retention


@lua_global(
    "setReport", Where.WORKER, "setReport(function(lt))",
    """The policy run for every report, after it is stored in the event log. `lt` has `t`,
    `remote` (a ComboAddress), `login`, `pwhash`, `success`, `policy_reject`, `attrs`,
    `attrs_mv`, `protocol`, `tls`, `device_id`, `device_attrs`, `session_id` and `fail_type`.
    Each stored report is run at least once, even across a crash. Enrichment at ingest
    (`setEnrichment`) adds `country`, `city`, `isp` ("" when unknown) and `latitude`,
    `longitude`, `asn` (nil when unknown).""",
    example='setReport(function(lt) infoLog("report", {login=lt.login}) end)', topic="lua",
)
def _set_report(state: "LuaState") -> Callable[[Any], None]:
    def set_report(fn: Any) -> None:
        if lua_type(fn) != "function":
            raise TypeError(f"setReport needs a function, got {describe(fn)}")
        state.report_fn = fn

    return set_report


@lua_global(
    "setSlowLuaCallSeconds", Where.CONFIG, "setSlowLuaCallSeconds(seconds)",
    """Warn (log and `trackalert_lua_slow_calls_total`, `trackalert_lua_busy_states`) when a
    report, background or custom function runs longer than this (default 5). LuaJIT cannot
    interrupt a runaway loop; this makes one visible while the other worker states carry on.""",
    example="setSlowLuaCallSeconds(2)", topic="lua",
)
def _set_slow_call(state: "LuaState") -> Callable[[Any], None]:
    def set_slow_call(seconds: Any) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
            raise ValueError(f"setSlowLuaCallSeconds needs a positive number, got {describe(seconds)}")
        state.host.settings.slow_call_seconds = float(seconds)

    return set_slow_call
