"""The replay's summary: the shared summary dict, and how a person reads it.

Every collection in it is ordered by something in the data (counts, then names), never by
arrival, so that two runs over the same input give the same bytes.
"""

from __future__ import annotations

import collections
import datetime
import json
from typing import Any, Iterable

#: The only fields that depend on the machine; left out of every deterministic output.
TIMING_FIELDS = ("run_seconds", "events_per_second")
TOP = 10


def _top(values: Iterable[str]) -> list[list[Any]]:
    counts = collections.Counter(value for value in values if value)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [[value, count] for value, count in ranked[:TOP]]


def _per(values: Iterable[str]) -> dict[str, int]:
    counts = collections.Counter(values)
    return {key: counts[key] for key in sorted(counts)}


def build(events: int, span: tuple[float | None, float | None], alerts: list[dict[str, Any]],
          error_count: int, errors: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The summary dict of the shared interface, keys in their documented order."""
    return {
        "events": events,
        "from": span[0],
        "to": span[1],
        "alerts": len(alerts),
        "alerts_per_hook": _per(alert["hook"] for alert in alerts),
        "alerts_per_policy": _per(alert["policy"] or "-" for alert in alerts),
        "top_logins": _top(alert["login"] for alert in alerts),
        "top_remotes": _top(alert["remote"] for alert in alerts),
        "lua_errors": error_count,
        "errors": errors,
        "run_seconds": round(seconds, 3),
        "events_per_second": round(events / seconds, 1) if seconds > 0 else 0.0,
    }


def deterministic(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary without its timing fields."""
    return {key: value for key, value in summary.items() if key not in TIMING_FIELDS}


def dumps(value: Any) -> str:
    """How every replay output serialises a record."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def _pairs(items: Iterable[tuple[str, Any]]) -> str:
    text = ", ".join(f"{key} {value:,}" if isinstance(value, int) else f"{key} {value}"
                     for key, value in items)
    return text or "none"


def render(summary: dict[str, Any], title: str = "replay") -> str:
    """The summary as a person reads it on a terminal."""
    lines = [
        f"{title}: {summary['events']:,} events, {_when(summary['from'])} .. {_when(summary['to'])}",
        f"  alerts: {summary['alerts']:,}",
        f"    per hook: {_pairs(summary['alerts_per_hook'].items())}",
        f"    per policy: {_pairs(summary['alerts_per_policy'].items())}",
        f"    top logins: {_pairs((k, v) for k, v in summary['top_logins'])}",
        f"    top remotes: {_pairs((k, v) for k, v in summary['top_remotes'])}",
        f"  Lua errors: {summary['lua_errors']:,}",
    ]
    for error in summary["errors"]:
        first = error["message"].splitlines()[0] if error["message"] else ""
        lines.append(f"    event {error['seq']}: {first}")
    lines.append(f"  run time: {summary['run_seconds']:.2f} s "
                 f"({summary['events_per_second']:,.0f} events/s)")
    return "\n".join(lines)
