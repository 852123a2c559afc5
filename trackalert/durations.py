"""Duration strings: the C++ daemon's `h[h][:mm][:ss]` and human spans for new settings.

`intervalScheduleBackgroundFunc` must keep reading existing configs the way boost's
`duration_from_string` did, so `"10"` stays ten *hours*. New settings such as
`setEventLogRetention("400d")` use explicit units instead, where a bare number is seconds; the
two syntaxes are kept apart so neither can be mistaken for the other.
"""

from __future__ import annotations

import math
import re

__all__ = ["DurationError", "format_span", "parse_hms", "parse_span"]

_SPAN_UNITS: dict[str, int] = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_SPAN_HINT = (
    "expected <number><unit> groups with units w, d, h, m, s (e.g. '400d', '1d12h', '1.5h', "
    "'30s'); a bare number is seconds"
)
# re.ASCII throughout: `\d` would otherwise accept digits such as '١' that nobody types on purpose.
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_SPAN_GROUP_RE = re.compile(rf"\s*({_NUMBER})([a-zA-Z]+)", re.ASCII)
_BARE_NUMBER_RE = re.compile(_NUMBER, re.ASCII)

# boost keeps hours in an int and minutes/seconds in unsigned shorts; larger values were errors.
_HMS_RE = re.compile(r"(-)?(\d+)(?::(\d+)(?::(\d+)(?:[.,](\d+))?)?)?", re.ASCII)
_MAX_HOURS = 2**31 - 1
_MAX_MIN_SEC = 65535


class DurationError(ValueError):
    """A duration string that cannot be understood; says what was expected when it can."""

    def __init__(self, text: object, hint: str = "") -> None:
        message = f"Cannot parse duration string: {text}"
        super().__init__(f"{message} ({hint})" if hint else message)
        self.text = text


def parse_hms(text: str) -> int:
    """Whole seconds from boost's `h[h][:mm][:ss[.fff]]` (fraction truncated, `-` negates).

    Minutes and seconds above 59 are added, as boost does (`0:90` is 90 minutes). Forms boost
    happened to tolerate by treating `.`, `,` and `-` as separators (`1.5` meaning 1 h 5 min,
    `1:2:3:4`) are rejected rather than given a surprising meaning.
    """
    if not isinstance(text, str):
        raise DurationError(text, "expected a string such as '10', '5:01' or '00:00:01'")
    match = _HMS_RE.fullmatch(text.strip())
    if match is None:
        raise DurationError(text, "expected h[h][:mm][:ss], e.g. '10' (hours), '5:01', '00:00:01'")
    negative, hours, minutes, seconds, _fraction = match.groups()
    h, m, s = int(hours), int(minutes or 0), int(seconds or 0)
    if h > _MAX_HOURS or m > _MAX_MIN_SEC or s > _MAX_MIN_SEC:
        raise DurationError(text, "value out of range")
    total = h * 3600 + m * 60 + s
    return -total if negative else total


def parse_span(text: str) -> float:
    """Seconds from a span such as `400d`, `1d12h`, `1.5h` or `90` (seconds).

    Zero is allowed (it means "no wait"/"keep nothing" to the caller); negatives are not, since
    no setting has a use for a span that points backwards.
    """
    if not isinstance(text, str):
        raise DurationError(text, _SPAN_HINT)
    stripped = text.strip()
    if stripped.startswith("-"):
        raise DurationError(text, "negative durations are not allowed")
    if _BARE_NUMBER_RE.fullmatch(stripped):
        return float(stripped)
    return _sum_span_groups(text, stripped)


def _sum_span_groups(text: str, stripped: str) -> float:
    total = 0.0
    position = 0
    while position < len(stripped):
        group = _SPAN_GROUP_RE.match(stripped, position)
        if group is None or group.group(2) not in _SPAN_UNITS:
            raise DurationError(text, _SPAN_HINT)
        total += float(group.group(1)) * _SPAN_UNITS[group.group(2)]
        position = group.end()
    if position == 0 or not math.isfinite(total):
        raise DurationError(text, _SPAN_HINT)
    return total


def format_span(seconds: float) -> str:
    """The shortest `parse_span` text for a value, for logs and `show*` console output.

    Days are the largest unit: `400d` reads better than `57w1d` when echoing a retention.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"seconds must be a number, got {type(seconds).__name__}")
    if not math.isfinite(seconds):
        raise ValueError(f"cannot format a non-finite duration: {seconds}")
    if seconds < 0:
        return "-" + format_span(-seconds)
    whole = int(seconds)
    fraction = round(seconds - whole, 6)
    if fraction >= 1:  # rounding carried into the next second
        whole, fraction = whole + 1, 0.0
    parts = []
    for unit in ("d", "h", "m"):
        count, whole = divmod(whole, _SPAN_UNITS[unit])
        if count:
            parts.append(f"{count}{unit}")
    if whole or fraction or not parts:
        parts.append(f"{_format_seconds(whole, fraction)}s")
    return "".join(parts)


def _format_seconds(whole: int, fraction: float) -> str:
    if not fraction:
        return str(whole)
    return f"{whole + fraction:.6f}".rstrip("0").rstrip(".")
