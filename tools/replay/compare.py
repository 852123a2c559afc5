"""Two configs' alerts over the same events: what deploying the new one would change.

Two alerts are the same when their (seq, hook, body) are (their time follows from the seq).
Counted as multisets: a policy sending one alert twice for an event, where the baseline sent it
once, has one added.
"""

from __future__ import annotations

import collections
import json
from typing import Any

Alert = dict[str, Any]


def _key(alert: Alert) -> tuple[int, str, str]:
    return alert["seq"], alert["hook"], json.dumps(alert["body"], sort_keys=True, ensure_ascii=False)


def _minus(alerts: list[Alert], other: list[Alert]) -> tuple[list[Alert], int]:
    """The alerts of `alerts` not matched by one of `other` (in order), and how many matched."""
    left = collections.Counter(_key(alert) for alert in other)
    extra, matched = [], 0
    for alert in alerts:
        key = _key(alert)
        if left[key]:
            left[key] -= 1
            matched += 1
        else:
            extra.append(alert)
    return extra, matched


def compare(alerts: list[Alert], baseline: list[Alert]) -> dict[str, Any]:
    """The compare dict of the shared interface: `alerts` (the new config) against `baseline`."""
    added, unchanged = _minus(alerts, baseline)
    removed, _ = _minus(baseline, alerts)
    per_policy: dict[str, dict[str, int]] = {}

    def count(alert: Alert, what: str) -> None:
        row = per_policy.setdefault(alert["policy"] or "-", {"added": 0, "removed": 0, "unchanged": 0})
        row[what] += 1

    for alert in added:
        count(alert, "added")
    for alert in removed:
        count(alert, "removed")
    removed_keys = collections.Counter(_key(alert) for alert in added)
    for alert in alerts:
        key = _key(alert)
        if removed_keys[key]:
            removed_keys[key] -= 1
        else:
            count(alert, "unchanged")
    return {"added": added, "removed": removed, "unchanged": unchanged,
            "per_policy": {name: per_policy[name] for name in sorted(per_policy)}}


def render(result: dict[str, Any], examples: int = 3) -> str:
    """The comparison as a person reads it: counts per policy, then a few examples of each."""
    lines = [f"compare: {len(result['added']):,} added, {len(result['removed']):,} removed, "
             f"{result['unchanged']:,} unchanged"]
    for policy, row in result["per_policy"].items():
        lines.append(f"  {policy}: +{row['added']:,} -{row['removed']:,} ={row['unchanged']:,}")
    for what, sign in (("added", "+"), ("removed", "-")):
        for alert in result[what][:examples]:
            who = alert["login"] or alert["remote"] or "-"
            lines.append(f"  {sign} event {alert['seq']} {alert['hook']} {alert['policy'] or '-'} "
                         f"{who}: {json.dumps(alert['body'], ensure_ascii=False)[:160]}")
    return "\n".join(lines)
