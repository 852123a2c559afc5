"""Lua globals: the alerts policies sent, as records (eventlog/alerts.py, docs/alerts.md).

`countAlerts`/`recentAlerts` ask the store `runCustomWebHook` records into (`Host.webhooks.alerts`):
the event log's alerts in the daemon, the captured alerts in a replay, so that a replay answers
from what it would have sent, as the daemon answers from what it sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from trackalert.eventlog.alerts import (
    ALERT_FILTER_KEYS, MAX_RECENT, AlertFilter, AlertStore, parse_alert_filter,
)
from trackalert.eventlog.filters import AsOf, FilterError
from trackalert.lua.convert import LT_TIME, describe, is_table
from trackalert.lua.registry import Where, lua_global

if TYPE_CHECKING:
    from trackalert.lua.state import LuaState

#: Worker states, and the config state that answers console commands (as the event helpers).
HELPERS = Where.WORKER | Where.CONFIG

_FILTER_DOC = f"""`filter` is a table; every key given must match: `policy`, `login`, `remote` (the
alert body's own `policy`/`login`/`remote` when it is a JSON object, as the starter policies
send), `hook` (the webhook name), `outcome` (`pending`, `delivered`, `refused`, `expired` or
`dropped`), and a time window: `window` (`"1d"`, or seconds) and/or `since`/`until` (epoch
seconds). An alert's time is the `received` of the report that caused it (else when it was sent).
Inside `report(lt)` only alerts caused by reports logged before `lt` are seen (windows end when
`lt` was received), the same ones a replay has captured at that point; alerts of background and
custom functions are seen there only outside `report`. Elsewhere every alert up to now. An unknown
key ({", ".join(ALERT_FILTER_KEYS)} are known) or a value of the wrong type raises a Lua error
naming it."""


def report_time(state: "LuaState") -> float | None:
    """When the lt of the running report(lt) was received (None outside report)."""
    seq = state.as_of_seq
    if seq is None:
        return None
    lt_seq, received = state.cache.get(LT_TIME, (None, None))
    return received if lt_seq == seq else None


def _store(state: "LuaState") -> AlertStore:
    webhooks = state.host.webhooks
    alerts = webhooks.alerts if webhooks is not None else None
    if alerts is None:
        raise RuntimeError("alerts are not recorded in this process (the event log is not open)")
    return alerts


def _as_of(state: "LuaState") -> AsOf:
    if state.as_of_seq is not None:
        return AsOf(before_seq=state.as_of_seq, now=report_time(state))
    return AsOf(now=state.host.clock.time())


def _filter(state: "LuaState", value: Any) -> AlertFilter:
    if value is None:
        return AlertFilter()
    if not is_table(value):
        raise FilterError(f"alert filter must be a table, got {describe(value)}")
    return parse_alert_filter((key, state.values.plain(item)) for key, item in value.items())


@lua_global(
    "countAlerts", HELPERS, "countAlerts(filter) -> number",
    "How many recorded alerts (`runCustomWebHook` calls) match `filter`, e.g. to tell a user "
    "once a day. " + _FILTER_DOC,
    example='if countAlerts({policy="new_country", login=lt.login, window="1d"}) == 0 then ... end',
    topic="helpers",
)
def _count_alerts(state: "LuaState") -> Callable[[Any], int]:
    def count_alerts(flt: Any = None) -> int:
        return _store(state).count(_filter(state, flt), _as_of(state))

    return count_alerts


@lua_global(
    "recentAlerts", HELPERS, "recentAlerts(filter, n) -> {alert, ...}",
    f"""Up to `n` (at most {MAX_RECENT}) recorded alerts matching `filter`, newest first, as
    tables with `delivery_id`, `time`, `created` (when it was sent), `seq` (the report that
    caused it; nil for background and custom functions), `hook`, `policy`, `login`, `remote`,
    `outcome`, `attempts`, `error`, `settled` and `body` (a table when the body is JSON, else its
    text). """ + _FILTER_DOC,
    example='for _, a in ipairs(recentAlerts({login=lt.login, window="7d"}, 5)) do\n'
            '  infoLog("earlier alert", {policy=a.policy or "", time=a.time})\nend',
    topic="helpers",
)
def _recent_alerts(state: "LuaState") -> Callable[[Any, Any], Any]:
    def recent_alerts(flt: Any = None, n: Any = 10) -> Any:
        if isinstance(n, bool) or not isinstance(n, (int, float)) or n != n:
            raise ValueError(f"recentAlerts: n must be a number, got {describe(n)}")
        found = _store(state).recent(_filter(state, flt), min(max(0, int(n)), MAX_RECENT),
                                     _as_of(state))
        return state.values.to_lua([alert.to_json_dict() for alert in found])

    return recent_alerts
