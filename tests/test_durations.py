"""Duration strings: boost's `h[h][:mm][:ss]` (reference §7.2) and human spans."""

from __future__ import annotations

import pytest

from trackalert.durations import DurationError, format_span, parse_hms, parse_span

# --------------------------------------------------------------------------------------------
# parse_hms


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10", 10 * 3600),
        ("1", 3600),
        ("0", 0),
        ("5:01", 5 * 3600 + 60),
        ("00:00:01", 1),
        ("00:01:00", 60),
        ("01:00:00", 3600),
        ("1:2:3", 3723),
        ("0:0:1.9", 1),
        ("0:0:1,9", 1),
        ("0:0:59.999999", 59),
        ("0:90", 90 * 60),
        ("0:0:90", 90),
        ("0:0:65535", 65535),
        ("100", 360000),
        ("-5", -5 * 3600),
        ("-0:30", -30 * 60),
        ("-00:00:01", -1),
        ("-0", 0),
        (" 0:0:5 ", 5),
    ],
)
def test_parse_hms(text: str, seconds: int) -> None:
    result = parse_hms(text)
    assert result == seconds
    assert isinstance(result, int)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "abc",
        "10s",
        "1h",
        "1:2:3:4",
        "1.5",
        "1:",
        ":30",
        "1::2",
        "--1",
        "+1",
        "1:-2",
        "0:0:1.",
        "0:0:.5",
        "1 : 2",
        "0:65536",
        "0:0:65536",
        "2147483648",
        "١",  # non-ASCII digit
    ],
)
def test_parse_hms_rejects(text: str) -> None:
    with pytest.raises(DurationError) as info:
        parse_hms(text)
    assert str(info.value).startswith(f"Cannot parse duration string: {text}")


def test_parse_hms_rejects_non_strings() -> None:
    with pytest.raises(DurationError):
        parse_hms(10)  # type: ignore[arg-type]


def test_duration_error_is_value_error_with_exact_prefix() -> None:
    with pytest.raises(ValueError):
        parse_hms("x")
    assert str(DurationError("x")) == "Cannot parse duration string: x"
    assert DurationError("x").text == "x"


# --------------------------------------------------------------------------------------------
# parse_span


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("400d", 400 * 86400),
        ("12h", 12 * 3600),
        ("1d12h", 36 * 3600),
        ("90m", 5400),
        ("1.5h", 5400),
        ("30s", 30),
        ("2w", 14 * 86400),
        ("1w1d1h1m1s", 604800 + 86400 + 3600 + 60 + 1),
        ("1d 12h", 36 * 3600),
        ("30", 30),
        ("1.5", 1.5),
        ("0", 0),
        ("0s", 0),
        ("0d", 0),
        (".5h", 1800),
        ("0.25s", 0.25),
        (" 7d ", 7 * 86400),
    ],
)
def test_parse_span(text: str, seconds: float) -> None:
    result = parse_span(text)
    assert result == seconds
    assert isinstance(result, float)


@pytest.mark.parametrize(
    "text",
    ["", " ", "d", "h12", "1y", "1D", "90ms", "1 d", "1d-1h", "1h30", "1e3", "nan", "inf", "1..5h",
     "1d,12h", "12:00", "abc", "1.2.3s", "١d"],
)
def test_parse_span_rejects_and_names_input_and_units(text: str) -> None:
    with pytest.raises(DurationError) as info:
        parse_span(text)
    message = str(info.value)
    assert message.startswith(f"Cannot parse duration string: {text}")
    assert "w, d, h, m, s" in message


@pytest.mark.parametrize("text", ["-1d", "-30", "-0.5h", " -1s"])
def test_parse_span_rejects_negatives(text: str) -> None:
    with pytest.raises(DurationError, match="negative"):
        parse_span(text)


def test_parse_span_rejects_non_strings() -> None:
    with pytest.raises(DurationError):
        parse_span(400)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# format_span


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (1, "1s"),
        (59, "59s"),
        (60, "1m"),
        (90, "1m30s"),
        (3600, "1h"),
        (5400, "1h30m"),
        (86400, "1d"),
        (129600, "1d12h"),
        (90061, "1d1h1m1s"),
        (400 * 86400, "400d"),
        (604800, "7d"),
        (86401, "1d1s"),
        (1.5, "1.5s"),
        (0.25, "0.25s"),
        (3661.25, "1h1m1.25s"),
        (0.1 + 0.2, "0.3s"),
        (59.9999999, "1m"),
        (-90, "-1m30s"),
        (86400.0, "1d"),
    ],
)
def test_format_span(seconds: float, text: str) -> None:
    assert format_span(seconds) == text


@pytest.mark.parametrize(
    "seconds",
    [0, 1, 30, 59, 60, 61, 90, 3599, 3600, 86399, 86400, 90061, 34560000, 1.5, 0.125, 7200.5],
)
def test_format_span_round_trips_through_parse_span(seconds: float) -> None:
    assert parse_span(format_span(seconds)) == seconds


@pytest.mark.parametrize("text", ["400d", "1d12h", "90m", "1.5h", "30s", "2w"])
def test_parse_then_format_then_parse_is_stable(text: str) -> None:
    seconds = parse_span(text)
    assert parse_span(format_span(seconds)) == seconds


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_format_span_rejects_non_finite(bad: float) -> None:
    with pytest.raises(ValueError):
        format_span(bad)


@pytest.mark.parametrize("bad", ["90", None, True])
def test_format_span_rejects_non_numbers(bad: object) -> None:
    with pytest.raises(TypeError):
        format_span(bad)  # type: ignore[arg-type]
