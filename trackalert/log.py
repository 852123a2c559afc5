"""The daemon's logging: syslog always, stdout while the console is on (reference §11).

Built on stdlib `logging` so that aiohttp, lupa glue and our own code share one thread-safe
pipeline, and a disabled level costs one integer comparison (`Logger.isEnabledFor` is cached).
The C++ daemon's behaviour is kept where operators can see it: bare message lines on stdout,
`-D` timestamps, `-l` filtering only stdout, `-v` gating the verbose calls. Unlike the C++ daemon
we honour `-f`: the facility it parses is the one syslog gets.

Messages are never used as format strings: we pass them as the record's `msg` with no `args`, so a
`%` in a login name or a Lua message is printed as is.
"""

from __future__ import annotations

import logging
import sys
import syslog
import threading
from typing import IO, Iterable, Mapping, Sequence

from trackalert.report import Report

#: stdlib has no NOTICE; syslog does and the C++ daemon uses it (ACL, control socket, stats lines).
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")

#: The one logger of the daemon; modules log through it (or through the helpers below).
logger = logging.getLogger("trackalert")

#: Syslog facility names accepted by `-f` (glibc's `facilitynames`, less the internal `mark`).
_FACILITIES: Mapping[str, int] = {
    "auth": syslog.LOG_AUTH,
    "authpriv": getattr(syslog, "LOG_AUTHPRIV", 10 << 3),
    "cron": syslog.LOG_CRON,
    "daemon": syslog.LOG_DAEMON,
    "ftp": 11 << 3,  # Python's syslog module has no LOG_FTP constant; glibc's value.
    "kern": syslog.LOG_KERN,
    "lpr": syslog.LOG_LPR,
    "mail": syslog.LOG_MAIL,
    "news": syslog.LOG_NEWS,
    "security": syslog.LOG_AUTH,  # deprecated glibc alias of auth, accepted by the C++ daemon
    "syslog": syslog.LOG_SYSLOG,
    "user": syslog.LOG_USER,
    "uucp": syslog.LOG_UUCP,
    **{f"local{i}": getattr(syslog, f"LOG_LOCAL{i}") for i in range(8)},
}

#: stdlib level -> syslog priority, as ">= threshold" so an in-between custom level maps down.
_PRIORITIES: Sequence[tuple[int, int]] = (
    (logging.CRITICAL, syslog.LOG_CRIT),
    (logging.ERROR, syslog.LOG_ERR),
    (logging.WARNING, syslog.LOG_WARNING),
    (NOTICE, syslog.LOG_NOTICE),
    (logging.INFO, syslog.LOG_INFO),
)

_lock = threading.Lock()
_verbose = False
_console_handler: logging.Handler | None = None
_syslog_handler: logging.Handler | None = None


def valid_facility(name: str) -> bool:
    """Whether `-f NAME` names a syslog facility (case-sensitive, like the C++ `strcmp` lookup)."""
    return name in _FACILITIES


def stdout_threshold(level: int) -> int:
    """The stdlib level passing syslog priorities 0..`level` (`-l` is not range-checked)."""
    if level >= 7:
        return logging.DEBUG
    if level == 6:
        return logging.INFO
    if level == 5:
        return NOTICE
    if level == 4:
        return logging.WARNING
    if level == 3:
        return logging.ERROR
    if level >= 0:
        return logging.CRITICAL  # emerg, alert and crit all travel as CRITICAL
    return logging.CRITICAL + 1  # a negative level silences stdout entirely


def syslog_priority(levelno: int) -> int:
    """The syslog priority for a stdlib level."""
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return syslog.LOG_DEBUG


class _SyslogHandler(logging.Handler):
    """Send records through libc `syslog()` (the stdlib `syslog` module), as the C++ daemon does.

    `logging.handlers.SysLogHandler` speaks the socket protocol itself and would not write the
    `trackalert[pid]:` tag the same way journald and rsyslog expect from `openlog(LOG_PID)`.
    """

    def __init__(self, facility: int) -> None:
        super().__init__(logging.NOTSET)
        syslog.openlog("trackalert", syslog.LOG_PID, facility)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # syslog() takes a C string: an embedded NUL (possible in a Lua string) would raise.
            message = self.format(record).replace("\0", "\\0")
            syslog.syslog(syslog_priority(record.levelno), message)
        except Exception:  # noqa: BLE001 - logging must never take the daemon down
            self.handleError(record)

    def close(self) -> None:
        syslog.closelog()
        super().close()


class _StdoutHandler(logging.StreamHandler):
    """A stream handler that looks up `sys.stdout` at each write.

    The daemon may replace stdout (daemonizing, pytest's capture), so binding the object at
    configuration time would write to a stale file.
    """

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return sys.stdout

    @stream.setter
    def stream(self, value: IO[str]) -> None:  # StreamHandler.__init__ assigns it; ignore
        pass


def _console_formatter(timestamps: bool) -> logging.Formatter:
    # stdlib's default asctime is exactly `YYYY-MM-DD HH:MM:SS,mmm` in local time, as -D prints.
    return logging.Formatter("[%(asctime)s] %(message)s" if timestamps else "%(message)s")


def configure(
    level: int = 6,
    verbose: bool = False,
    console: bool = True,
    timestamps: bool = False,
    facility: str | None = "daemon",
    stream: IO[str] | None = None,
) -> None:
    """Set up logging for the daemon; safe to call again (it replaces what it installed before).

    `level` is the syslog-style `-l` threshold for stdout only; syslog receives every record the
    logger emits. `verbose` (`-v`) lets debug records and `vinfo` through at all — without it they
    are dropped before any formatting, like the C++ `vinfolog`/`debuglog`. The caller applies the
    C++ rule that `-v` alone raises `level` to 7. `facility=None` disables syslog (tests, tools).
    """
    global _verbose, _console_handler, _syslog_handler
    if facility is not None and not valid_facility(facility):
        raise ValueError(f"unknown syslog facility {facility!r}")
    with _lock:
        _remove_handlers()
        _verbose = verbose
        console_handler: logging.Handler = (
            _StdoutHandler() if stream is None else logging.StreamHandler(stream)
        )
        console_handler.setLevel(stdout_threshold(level))
        console_handler.setFormatter(_console_formatter(timestamps))
        _console_handler = console_handler
        if facility is not None:
            _syslog_handler = _SyslogHandler(_FACILITIES[facility])
            logger.addHandler(_syslog_handler)
        if console:
            logger.addHandler(console_handler)
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
        # We own the output now; a handler someone put on the root logger must not repeat lines.
        logger.propagate = False


def set_console(enabled: bool) -> None:
    """Switch stdout logging on or off (off after config load for `-s`/`-d`); syslog stays."""
    with _lock:
        if _console_handler is None:
            return
        if enabled:
            logger.addHandler(_console_handler)  # no-op when already present
        else:
            logger.removeHandler(_console_handler)


def reset() -> None:
    """Undo `configure`: no handlers of ours, default level, propagation back to the root logger.

    For tests and tools that embed the daemon's modules without its logging setup.
    """
    global _verbose, _console_handler
    with _lock:
        _remove_handlers()
        _console_handler = None
        _verbose = False
        logger.setLevel(logging.NOTSET)
        logger.propagate = True


def _remove_handlers() -> None:
    global _syslog_handler
    if _console_handler is not None:
        logger.removeHandler(_console_handler)
        if isinstance(_console_handler, _StdoutHandler):
            _console_handler.flush()
    if _syslog_handler is not None:
        logger.removeHandler(_syslog_handler)
        _syslog_handler.close()
        _syslog_handler = None


def verbose() -> bool:
    """Whether the daemon was started with `-v` (gates vinfoLog, debugLog and the report log)."""
    return _verbose


def notice(msg: str) -> None:
    """Log at syslog NOTICE, the level of the C++ daemon's ACL, control-socket and stats lines."""
    logger.log(NOTICE, msg)


def vinfo(msg: str) -> None:
    """Info only with `-v` (the C++ `vinfolog`): chatty lines an operator asks for explicitly."""
    if _verbose:
        logger.info(msg)


def format_kv(message: str, pairs: Iterable[tuple[str, str]]) -> str:
    """The text of a Lua `infoLog(msg, {k=v})` call: `msg: k="v" ` (values not escaped).

    Kept byte-identical to the C++ daemon because operators grep and parse these lines.
    """
    body = "".join(f'{key}="{value}" ' for key, value in pairs)
    return f"{message}: {body}" if body else message


def report_log_line(report: Report) -> str:
    """The `-v` line logged for each accepted report (reference §11.2), byte-identical to C++."""
    return (
        "reportLog: "
        f'remote="{report.remote}" '
        f'login="{report.login}" '
        f'success="{int(report.success)}" '
        f'policy_reject="{int(report.policy_reject)}" '
        f'pwhash="{report.pwhash}" '
        f'protocol="{report.protocol}" '
        f'device_id="{report.device_id}" '
        f"device_attrs={{{_quoted_pairs(report.device_attrs)}}} "
        f"attrs={{{_attrs_body(report.attrs, report.attrs_mv)}}} "
    )


def _bytewise(keys: Iterable[str]) -> list[str]:
    # Code-point order is UTF-8 byte order (std::map<std::string> order), surrogates included.
    return sorted(keys)


def _quoted_pairs(values: Mapping[str, str]) -> str:
    return ", ".join(f'{key}="{values[key]}"' for key in _bytewise(values))


def _quoted_list(values: Sequence[str]) -> str:
    return ", ".join(f'"{value}"' for value in values)


def _attrs_body(single: Mapping[str, str], multi: Mapping[str, Sequence[str]]) -> str:
    body = _quoted_pairs(single)
    if multi:
        # The C++ loop writes ", " before the first multi-valued attribute unconditionally,
        # so `attrs={, k=[...]}` appears when there are no single-valued ones. Kept on purpose.
        body += ", " + ", ".join(f"{key}=[{_quoted_list(multi[key])}]" for key in _bytewise(multi))
    return body
