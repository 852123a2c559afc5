"""Alerts are records too (DESIGN §4): what every `runCustomWebHook` call sent, next to the events.

An alert is keyed by its delivery id (`X-Wforce-Delivery`), the id the outbox already gives each
delivery: the outbox holds a delivery while it is in flight, the alert record keeps it for as
long as retention keeps events, with the delivery's outcome written back when it is settled.
The same alert sent again for the same cause (a policy re-run after a crash) has the same id and
is one record.

This module holds what every store shares: the record, the filter of `countAlerts` and
`recentAlerts` (validated here once, like the event filter, so a typo is an error naming the key),
the as-of rule, and `MemoryAlerts`, the store of a replay. The SQLite and Elasticsearch stores
live beside their event logs (sqlite_alerts.py, es_alerts.py).

As-of rule. Inside `report(lt)` a policy sees the alerts caused by events before `lt` in log order
(the alert's `seq` < lt's seq), windows ending when lt was received; it does not see alerts of
background functions, custom endpoints or the console, nor its own alerts for lt. Alerts of
earlier events are recorded before their `report` call returned, and the runner judges events one
at a time in log order, so this is exactly the set a replay has captured at the same point: live
and replayed answers agree, and a policy re-run for lt after a crash decides as the first run did
(the same alert, the same delivery id). The time of a report's alert is the causing event's
`received`, not the moment the policy ran, for the same reason (a lagging runner would otherwise
shift it). Elsewhere (background, custom functions, console) every alert with a time up to now.
"""

from __future__ import annotations

import abc
import datetime
import json
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator

from trackalert.eventlog.filters import AsOf, FilterError, _kind, _number, _remote, _text, _window

__all__ = [
    "ALERT_FILTER_KEYS", "OUTCOMES", "Alert", "AlertFilter", "AlertStore",
    "MemoryAlerts", "alert_table", "new_alert", "parse_alert_filter",
]

ALERT_FILTER_KEYS = ("policy", "login", "remote", "hook", "outcome", "window", "since", "until")
#: pending: in the outbox; delivered: a receiver accepted it; refused: a 4xx for good;
#: expired: retried until setWebHookExpiry; dropped: never queued (outbox full or unwritable).
OUTCOMES = ("pending", "delivered", "refused", "expired", "dropped")
#: The most alerts recentAlerts returns at once.
MAX_RECENT = 10_000


@dataclass(frozen=True, slots=True)
class Alert:
    """One `runCustomWebHook` call and what became of it."""

    delivery_id: str
    hook: str
    body: bytes
    #: The causing event's `received` for a report's alert, else the clock at the call: the
    #: time windows and `--from` compare with.
    time: float
    #: The clock when runCustomWebHook ran.
    created: float
    #: The event whose report(lt) sent it; None for background, custom endpoint, console.
    seq: int | None = None
    #: Read from a JSON body's `policy`, `login`, `remote` (the starter policies' shape).
    policy: str | None = None
    login: str | None = None
    remote: str | None = None
    outcome: str = "pending"
    attempts: int = 0
    error: str = ""
    #: When the outcome was settled (None while pending).
    settled: float | None = None

    def decoded_body(self) -> Any:
        """The body as JSON when it is JSON, else as text."""
        text = self.body.decode("utf-8", errors="replace")
        try:
            return json.loads(text)
        except ValueError:
            return text

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "delivery_id": self.delivery_id, "time": self.time, "created": self.created,
            "seq": self.seq, "hook": self.hook, "policy": self.policy, "login": self.login,
            "remote": self.remote, "outcome": self.outcome, "attempts": self.attempts,
            "error": self.error, "settled": self.settled, "body": self.decoded_body(),
        }


def new_alert(delivery_id: str, hook: str, body: bytes, time: float, created: float,
              seq: int | None = None, outcome: str = "pending", error: str = "") -> Alert:
    """The record of one call, its policy/login/remote read from the body when it is a JSON
    object (the alert says whom it is about; a background alert has no event to ask)."""
    policy = login = remote = None
    try:
        decoded = json.loads(body)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict):
        policy, login, remote = (_body_text(decoded.get(k)) for k in ("policy", "login", "remote"))
        if remote is not None:
            try:
                remote = _remote(remote)  # stored as filters compare it (IPv4-mapped unmapped)
            except FilterError:
                pass
    return Alert(delivery_id=delivery_id, hook=hook, body=body, time=time, created=created,
                 seq=seq, policy=policy, login=login, remote=remote, outcome=outcome, error=error)


def _body_text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class AlertFilter:
    """Which alerts countAlerts/recentAlerts look at; None = no condition."""

    policy: str | None = None
    login: str | None = None
    remote: str | None = None
    hook: str | None = None
    outcome: str | None = None
    window: float | None = None
    since: float | None = None
    until: float | None = None


def parse_alert_filter(items: Iterable[tuple[Any, Any]]) -> AlertFilter:
    """An `AlertFilter` from (key, value) pairs, e.g. a Lua table's items."""
    values: dict[str, Any] = {}
    for key, value in items:
        if not isinstance(key, str):
            raise FilterError(f"alert filter keys must be strings, got {_kind(key)} {key!r}")
        if key in ("policy", "login", "hook"):
            values[key] = _text(key, value)
        elif key == "remote":
            values[key] = _remote(value)
        elif key == "outcome":
            text = _text(key, value)
            if text not in OUTCOMES:
                raise FilterError(f"alert filter key 'outcome' must be one of {', '.join(OUTCOMES)}, "
                                  f"got {text!r}")
            values[key] = text
        elif key == "window":
            values[key] = _window(value)
        elif key in ("since", "until"):
            values[key] = _number(key, value)
        else:
            raise FilterError(f"unknown alert filter key '{key}' (known keys: "
                              f"{', '.join(ALERT_FILTER_KEYS)})")
    return AlertFilter(**values)


def time_bounds(flt: AlertFilter, as_of: AsOf) -> tuple[float | None, float | None]:
    """(lowest, highest) alert time, both inclusive, the filter and the as-of rule allow."""
    low, high = flt.since, flt.until
    if as_of.now is not None:
        high = as_of.now if high is None else min(high, as_of.now)
        if flt.window is not None:
            start = as_of.now - flt.window
            low = start if low is None else max(low, start)
    return low, high


def matches(alert: Alert, flt: AlertFilter, as_of: AsOf) -> bool:
    """The rule every store implements, spelt out once (MemoryAlerts uses it; the SQL and
    Elasticsearch stores translate it and are tested against it)."""
    if as_of.before_seq is not None and (alert.seq is None or alert.seq >= as_of.before_seq):
        return False
    low, high = time_bounds(flt, as_of)
    if (low is not None and alert.time < low) or (high is not None and alert.time > high):
        return False
    return all(getattr(flt, key) is None or getattr(alert, key) == getattr(flt, key)
               for key in ("policy", "login", "remote", "hook", "outcome"))


class AlertStore(abc.ABC):
    """Where a log keeps its alerts. Synchronous: written from Lua worker threads (the call
    returns once the record is stored) and from the webhook sender's outbox thread."""

    @abc.abstractmethod
    def record(self, alert: Alert) -> bool:
        """Store `alert`; one already stored under its delivery id is left as it is (False)."""

    @abc.abstractmethod
    def settle(self, delivery_id: str, outcome: str, attempts: int, error: str,
               at: float | None) -> None:
        """Write a delivery's outcome (or, with outcome pending, a failed attempt) back."""

    @abc.abstractmethod
    def count(self, flt: AlertFilter, as_of: AsOf) -> int:
        """How many alerts match."""

    @abc.abstractmethod
    def recent(self, flt: AlertFilter, n: int, as_of: AsOf) -> list[Alert]:
        """Up to `n` matching alerts, newest first (by time, then delivery id)."""

    @abc.abstractmethod
    def prune(self, older_than: float) -> int:
        """Delete alerts with a time before `older_than` (retention); how many went."""

    def close(self) -> None:
        """Release connections."""


class MemoryAlerts(AlertStore):
    """The alerts of one replay, in memory: the replay captures runCustomWebHook instead of
    sending, and its countAlerts/recentAlerts answer from what it captured, so a replay asks
    the same questions of the same alerts the daemon would have stored."""

    def __init__(self) -> None:
        self._alerts: dict[str, Alert] = {}

    def record(self, alert: Alert) -> bool:
        return self._alerts.setdefault(alert.delivery_id, alert) is alert

    def settle(self, delivery_id: str, outcome: str, attempts: int, error: str,
               at: float | None) -> None:
        alert = self._alerts.get(delivery_id)
        if alert is not None:
            self._alerts[delivery_id] = replace(alert, outcome=outcome, attempts=attempts,
                                                error=error, settled=at)

    def count(self, flt: AlertFilter, as_of: AsOf) -> int:
        return sum(1 for _ in self._matching(flt, as_of))

    def recent(self, flt: AlertFilter, n: int, as_of: AsOf) -> list[Alert]:
        found = sorted(self._matching(flt, as_of), key=lambda a: (a.time, a.delivery_id), reverse=True)
        return found[:max(0, n)]

    def prune(self, older_than: float) -> int:
        old = [key for key, alert in self._alerts.items() if alert.time < older_than]
        for key in old:
            del self._alerts[key]
        return len(old)

    def _matching(self, flt: AlertFilter, as_of: AsOf) -> Iterator[Alert]:
        return (alert for alert in self._alerts.values() if matches(alert, flt, as_of))


def alert_table(alerts: Iterable[Alert]) -> Iterator[str]:
    """`trackalert alerts` as a table: one line per alert, the fields an operator scans."""
    fmt = "{:<20} {:<16.16} {:<20.20} {:<24.24} {:<39} {:<9} {:<10} {}"
    yield fmt.format("Time (UTC)", "Policy", "Login", "Hook", "Remote", "Seq", "Outcome", "Error")
    for a in alerts:
        when = datetime.datetime.fromtimestamp(a.time, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        yield fmt.format(when, a.policy or "-", a.login or "-", a.hook, a.remote or "-",
                         "-" if a.seq is None else a.seq, a.outcome,
                         a.error.replace("\n", " ") or "-").rstrip()
