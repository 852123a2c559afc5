"""trackalert.log: stdout format, thresholds, -D timestamps, -v gating, exact text formats."""

from __future__ import annotations

import io
import logging
import re
import threading
from typing import Iterator

import pytest

from trackalert import log
from trackalert.report import Report


@pytest.fixture(autouse=True)
def _clean_logging() -> Iterator[None]:
    log.reset()
    yield
    log.reset()


def _configure(**kwargs: object) -> io.StringIO:
    stream = io.StringIO()
    log.configure(facility=None, stream=stream, **kwargs)  # type: ignore[arg-type]
    return stream


def _emit_all_levels() -> None:
    log.logger.critical("crit")
    log.logger.error("err")
    log.logger.warning("warn")
    log.notice("note")
    log.logger.info("info")
    log.logger.debug("debug")


# -- stdout lines and thresholds ---------------------------------------------------------------


def test_stdout_lines_are_the_bare_message() -> None:
    stream = _configure()
    log.logger.info("Read configuration from 'trackalert.conf'")
    log.notice("ACL allowing queries from: 127.0.0.0/8, 10.0.0.0/8")
    assert stream.getvalue() == (
        "Read configuration from 'trackalert.conf'\n"
        "ACL allowing queries from: 127.0.0.0/8, 10.0.0.0/8\n"
    )


def test_default_level_six_shows_info_but_not_debug_even_when_verbose_logger() -> None:
    stream = _configure(level=6, verbose=True)
    _emit_all_levels()
    assert stream.getvalue().splitlines() == ["crit", "err", "warn", "note", "info"]


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        (7, ["crit", "err", "warn", "note", "info", "debug"]),
        (5, ["crit", "err", "warn", "note"]),
        (4, ["crit", "err", "warn"]),
        (3, ["crit", "err"]),
        (2, ["crit"]),
        (0, ["crit"]),
        (-1, []),
        (12, ["crit", "err", "warn", "note", "info", "debug"]),
    ],
)
def test_level_threshold(level: int, expected: list[str]) -> None:
    stream = _configure(level=level, verbose=True)
    _emit_all_levels()
    assert stream.getvalue().splitlines() == expected


def test_debug_needs_verbose_even_at_level_seven() -> None:
    stream = _configure(level=7, verbose=False)
    log.logger.debug("hidden")
    assert not log.logger.isEnabledFor(logging.DEBUG)
    assert stream.getvalue() == ""


def test_message_is_never_a_format_string() -> None:
    stream = _configure()
    log.logger.info("login=%s 100%% %d")
    log.notice("%(name)s")
    assert stream.getvalue() == "login=%s 100%% %d\n%(name)s\n"


def test_timestamps_prefix_matches_docker_format() -> None:
    stream = _configure(timestamps=True)
    log.logger.warning("Starting webserver")
    line = stream.getvalue()
    assert re.fullmatch(
        r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\] Starting webserver\n", line
    ), line


def test_set_console_switches_stdout_off_and_on() -> None:
    stream = _configure()
    log.logger.info("before")
    log.set_console(False)
    log.logger.error("while off")
    log.set_console(True)
    log.set_console(True)  # idempotent: no duplicated lines
    log.logger.info("after")
    assert stream.getvalue() == "before\nafter\n"


def test_console_false_starts_silent() -> None:
    stream = _configure(console=False)
    log.logger.error("nope")
    assert stream.getvalue() == ""


def test_reconfigure_replaces_the_previous_handler() -> None:
    first = _configure()
    second = _configure()
    log.logger.info("once")
    assert first.getvalue() == ""
    assert second.getvalue() == "once\n"


def test_default_stream_is_the_current_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure(facility=None)
    log.logger.info("to stdout")
    assert capsys.readouterr().out == "to stdout\n"


def test_syslog_handler_can_be_installed() -> None:
    # Real syslog: nothing to assert on the receiving side, but configure and a write must work.
    stream = io.StringIO()
    log.configure(facility="local3", stream=stream)
    log.logger.info("syslog smoke test from trackalert tests")
    assert stream.getvalue() == "syslog smoke test from trackalert tests\n"


def test_configure_rejects_unknown_facility() -> None:
    with pytest.raises(ValueError):
        log.configure(facility="nonsense", stream=io.StringIO())


def test_concurrent_writers_never_interleave_lines() -> None:
    stream = _configure()

    def writer(n: int) -> None:
        for i in range(200):
            log.logger.info(f"thread {n} line {i} " + "x" * 50)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 8 * 200
    assert all(re.fullmatch(r"thread \d line \d+ x{50}", line) for line in lines)


# -- verbose helpers ----------------------------------------------------------------------------


def test_vinfo_only_when_verbose() -> None:
    stream = _configure(verbose=False)
    log.vinfo("quiet")
    assert not log.verbose()
    assert stream.getvalue() == ""
    stream = _configure(verbose=True)
    log.vinfo("loud")
    assert log.verbose()
    assert stream.getvalue() == "loud\n"


def test_notice_level_is_registered() -> None:
    assert logging.getLevelName(log.NOTICE) == "NOTICE"
    assert logging.INFO < log.NOTICE < logging.WARNING


# -- facilities ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["auth", "authpriv", "cron", "daemon", "kern", "lpr", "mail", "news", "syslog", "user",
     "uucp", "local0", "local7"],
)
def test_valid_facility(name: str) -> None:
    assert log.valid_facility(name)


@pytest.mark.parametrize("name", ["", "DAEMON", "local8", "mark", "daemon "])
def test_invalid_facility(name: str) -> None:
    assert not log.valid_facility(name)


# -- format_kv ----------------------------------------------------------------------------------


def test_format_kv_reference_example() -> None:
    assert log.format_kv("Received report", [("login", "bob")]) == 'Received report: login="bob" '


def test_format_kv_without_pairs_is_just_the_message() -> None:
    assert log.format_kv("Received report", []) == "Received report"


def test_format_kv_keeps_order_and_does_not_escape() -> None:
    text = log.format_kv("m", [("b", '1"2'), ("a", "x\\y")])
    assert text == 'm: b="1"2" a="x\\y" '


# -- report_log_line ----------------------------------------------------------------------------


def test_report_log_line_minimal() -> None:
    report = Report(remote="192.0.2.1", login="alice")
    assert log.report_log_line(report) == (
        'reportLog: remote="192.0.2.1" login="alice" success="0" policy_reject="0" '
        'pwhash="" protocol="" device_id="" device_attrs={} attrs={} '
    )


def test_report_log_line_full() -> None:
    report = Report(
        remote="2001:db8::1",
        login="bob",
        pwhash="f0a1",
        success=True,
        policy_reject=True,
        protocol="imap",
        device_id="Thunderbird",
        device_attrs={"os.family": "Linux", "browser.family": "Firefox"},
        attrs={"zone": "b", "a": "1"},
        attrs_mv={"groups": ("staff", "admin"), "aliases": ("x",)},
    )
    assert log.report_log_line(report) == (
        'reportLog: remote="2001:db8::1" login="bob" success="1" policy_reject="1" '
        'pwhash="f0a1" protocol="imap" device_id="Thunderbird" '
        'device_attrs={browser.family="Firefox", os.family="Linux"} '
        'attrs={a="1", zone="b", aliases=["x"], groups=["staff", "admin"]} '
    )


def test_report_log_line_multi_valued_only_keeps_the_leading_separator_quirk() -> None:
    report = Report(login="carol", attrs_mv={"g": ("1", "2")})
    assert log.report_log_line(report) == (
        'reportLog: remote="0.0.0.0" login="carol" success="0" policy_reject="0" '
        'pwhash="" protocol="" device_id="" device_attrs={} attrs={, g=["1", "2"]} '
    )


def test_report_log_line_single_valued_attrs_and_empty_list() -> None:
    report = Report(attrs={"k": "v"}, attrs_mv={"empty": ()})
    assert log.report_log_line(report).endswith('attrs={k="v", empty=[]} ')


def test_report_log_line_sorts_bytewise() -> None:
    # Upper case sorts before lower case, '_' (0x5f) between them, non-ASCII last.
    report = Report(device_attrs={"b": "1", "B": "2", "_": "3", "é": "4"})
    assert 'device_attrs={B="2", _="3", b="1", é="4"} ' in log.report_log_line(report)
