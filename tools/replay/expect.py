"""Expectations: does a replay send exactly the alerts an operator wrote down, and if not, what?

A scenario test for a policy is a small log plus the alerts it must give, one JSON object a line,
in the replay's own alert format (`--out`). An expected line names only what matters to it: a
line `{"seq": 12, "hook": "alert", "body": {"policy": "new-country"}}` passes for an alert of
event 12 to hook `alert` whose body's `policy` is `new-country`, whatever else it says (the rule
applies inside JSON objects too; lists and other values must be equal). A check passes when
every expected line is matched by its own alert and no alert is left over.

The diff is for a person who just changed a policy: per event (seq order), the alerts that went
missing, the ones that are new, and for an expected line with an alert of the same event that
differs, the fields that differ, with the file's line number of each expectation.
"""

from __future__ import annotations

import collections
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = ["ExpectationError", "ExpectedAlerts", "FIELDS", "check", "load_expected"]

#: The fields of an alert record, in their order.
FIELDS = ("seq", "time", "hook", "login", "remote", "policy", "body")
_ABSENT = object()


class ExpectationError(ValueError):
    """An expected file that cannot be used; the message names the file and line."""


class ExpectedAlerts(list):
    """Expected alerts as loaded, remembering each one's line (for the diff)."""

    def __init__(self, alerts: Iterable[dict] = (), lines: Sequence[int] = (), path: str = "") -> None:
        super().__init__(alerts)
        self.lines = list(lines)
        self.path = path


# -- loading -----------------------------------------------------------------------------------


def load_expected(path: str | Path) -> ExpectedAlerts:
    """Read an expected NDJSON file; blank lines and lines starting with `#` are skipped.

    Every problem is reported with its line number, since the file is written by hand."""
    alerts, lines = [], []
    with open(path, encoding="utf-8") as source:
        for number, line in enumerate(source, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            alerts.append(_parse_line(text, f"{path}:{number}"))
            lines.append(number)
    return ExpectedAlerts(alerts, lines, str(path))


def _parse_line(text: str, where: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExpectationError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, dict):
        raise ExpectationError(f"{where}: an expected alert must be a JSON object, not {_kind(value)}")
    unknown = [key for key in value if key not in FIELDS]
    if unknown:
        raise ExpectationError(f"{where}: unknown field {unknown[0]!r} (an alert has {', '.join(FIELDS)})")
    for key, item in value.items():
        problem = _type_problem(key, item)
        if problem:
            raise ExpectationError(f"{where}: {key} {problem}, got {json.dumps(item)}")
    return value


def _type_problem(key: str, value: Any) -> str:
    if key == "seq" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        return "must be a positive integer"
    if key == "time" and (isinstance(value, bool) or not isinstance(value, (int, float))
                          or not math.isfinite(value)):
        return "must be a number (epoch seconds)"
    if key in ("hook", "login", "remote") and not isinstance(value, str):
        return "must be a string"
    if key == "policy" and value is not None and not isinstance(value, str):
        return "must be a string or null"
    return ""


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


# -- comparing ---------------------------------------------------------------------------------


def _differences(expected: Any, actual: Any, path: str) -> list[tuple[str, Any, Any]]:
    """(field path, expected, actual) for each difference; an object is compared on the keys the
    expected one gives. True is not 1 and 1 is 1.0, as in JSON."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        found = []
        for key, item in expected.items():
            found += _differences(item, actual.get(key, _ABSENT), f"{path}.{key}" if path else key)
        return found
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        found = []
        for index, (item, other) in enumerate(zip(expected, actual)):
            found += _differences(item, other, f"{path}[{index}]")
        return found
    if _same_scalar(expected, actual):
        return []
    return [(path, expected, actual)]


def _same_scalar(expected: Any, actual: Any) -> bool:
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(expected) is type(actual) and expected == actual
    if isinstance(expected, (int, float)) and isinstance(actual, (int, float)):
        return expected == actual
    return type(expected) is type(actual) and not isinstance(expected, (dict, list)) and expected == actual


def _matches(expected: dict, actual: dict) -> bool:
    return not _differences(expected, actual, "")


def _candidates(expected: Sequence[dict], actual: Sequence[dict]) -> list[list[int]]:
    """For each expected alert, the actual alerts it matches (by seq index when it gives one)."""
    by_seq: dict[Any, list[int]] = collections.defaultdict(list)
    for index, alert in enumerate(actual):
        by_seq[alert.get("seq")].append(index)
    every = range(len(actual))
    return [[i for i in (by_seq.get(e["seq"], []) if "seq" in e else every) if _matches(e, actual[i])]
            for e in expected]


def _pair(candidates: list[list[int]]) -> dict[int, int]:
    """A largest pairing of expected to actual alerts (augmenting paths), so that a general
    expectation never takes the one alert a more specific one needed."""
    owner: dict[int, int] = {}  # actual index -> expected index
    for start in range(len(candidates)):
        parent: dict[int, tuple[int, int | None]] = {}  # actual -> (expected, previous actual)
        frontier, previous, end = [start], {start: None}, None
        while frontier and end is None:
            nxt = []
            for e in frontier:
                for a in candidates[e]:
                    if a in parent:
                        continue
                    parent[a] = (e, previous[e])
                    if a not in owner:
                        end = a
                        break
                    previous[owner[a]] = a
                    nxt.append(owner[a])
                if end is not None:
                    break
            frontier = nxt
        while end is not None:
            e, before = parent[end]
            owner[end] = e
            end = before
    return {e: a for a, e in owner.items()}


@dataclass
class _Outcome:
    missing: list[int]
    unexpected: list[int]
    different: list[tuple[int, int]]


def _outcome(expected: Sequence[dict], actual: Sequence[dict]) -> _Outcome:
    paired = _pair(_candidates(expected, actual))
    used = set(paired.values())
    loose = [i for i in range(len(actual)) if i not in used]
    outcome = _Outcome([], [], [])
    for e in (i for i in range(len(expected)) if i not in paired):
        close = [a for a in loose if "seq" in expected[e] and actual[a].get("seq") == expected[e]["seq"]]
        if close:
            best = min(close, key=lambda a: len(_differences(expected[e], actual[a], "")))
            loose.remove(best)
            outcome.different.append((e, best))
        else:
            outcome.missing.append(e)
    outcome.unexpected = loose
    return outcome


# -- the diff ----------------------------------------------------------------------------------


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value, ensure_ascii=False)


def _record(alert: dict) -> str:
    return json.dumps(alert, ensure_ascii=False, separators=(",", ":"))


def _where(expected: Sequence[dict], index: int) -> str:
    lines = getattr(expected, "lines", None)
    if lines and index < len(lines):
        return f"{getattr(expected, 'path', '') or 'expected'}:{lines[index]}"
    return f"expected #{index + 1}"


def check(actual: list[dict], expected: list[dict]) -> tuple[bool, str]:
    """(ok, diff): ok when the alerts are exactly the expected ones, each expected line
    compared only on the fields it gives. The diff lists problems per event in seq order."""
    outcome = _outcome(expected, actual)
    entries: list[tuple[float, int, int, str]] = []  # (seq, kind, order, text)
    for order, e in enumerate(outcome.missing):
        entries.append((expected[e].get("seq", math.inf), 0, order,
                        f"missing:    {_where(expected, e)}  {_record(expected[e])}"))
    for order, (e, a) in enumerate(outcome.different):
        fields = "".join(f"\n    {path}: expected {_show(want)}, got {_show(got)}"
                         for path, want, got in _differences(expected[e], actual[a], ""))
        entries.append((expected[e]["seq"], 1, order, f"different:  {_where(expected, e)}  "
                        f"seq {expected[e]['seq']} hook {actual[a].get('hook')}{fields}"))
    for order, a in enumerate(outcome.unexpected):
        entries.append((actual[a].get("seq", math.inf), 2, order, f"unexpected: {_record(actual[a])}"))
    if not entries:
        return True, f"{len(expected)} expected alerts, all matched, none unexpected"
    head = (f"{len(expected)} expected alerts, {len(actual)} actual: {len(outcome.missing)} missing, "
            f"{len(outcome.unexpected)} unexpected, {len(outcome.different)} different")
    return False, "\n".join([head, *(entry[3] for entry in sorted(entries, key=lambda x: x[:3]))])
