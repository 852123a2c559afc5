"""The `trackalert` command line, option for option compatible with the C++ daemon (reference §2).

Differences on purpose: `-f` selects the syslog facility for real, `-R` is honoured (device
parsing), `-d` is a real daemon whose parent waits for readiness, and every start-up failure exits
non-zero with a message that says what to fix.

New: `trackalert export` and `trackalert import` move a log's history as NDJSON (docs/history.md);
`trackalert alerts` lists the alerts policies sent (docs/alerts.md).
A first argument that names a subcommand picks it; anything else is the daemon's command line,
so every C++ option keeps working as it was.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import io
import math
import os
import sys
from typing import IO, Any, Callable, NoReturn, Sequence

from trackalert import __version__, log

SYSCONFDIR = "/etc"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"trackalert: {message}\n")
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="trackalert",
        description="Track login reports in a persisted event log and run Lua policies over them.",
        epilog="subcommands:\n  export    write the event log (or part of it) as NDJSON\n"
               "  import    load NDJSON exports or wforce report lines into an event log\n"
               "  alerts    list the alerts the policies sent\n"
               "(`trackalert export --help`, `trackalert import --help`, ...)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-C", "--config", metavar="FILE", help="configuration file")
    parser.add_argument(
        "-c", "--client", nargs="?", const="", metavar="FILE",
        help="console client mode (optionally with this config file)",
    )
    parser.add_argument("-e", "--execute", metavar="CMD", help="send one console command and print the reply")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("-s", "--systemd", action="store_true", help="foreground, no console, no stdout logging (systemd)")
    mode.add_argument("-d", "--daemon", action="store_true", help="run in the background")
    mode.add_argument("-D", "--docker", action="store_true", help="foreground with timestamped stdout logging")
    parser.add_argument("-f", "--facility", metavar="NAME", default="daemon", help="syslog facility (default daemon)")
    parser.add_argument("-l", "--loglevel", metavar="N", help="stdout log level 0-7 (default 6)")
    parser.add_argument("-v", "--verbose", action="store_true", help="verbose logging (level 7, report log)")
    parser.add_argument("-R", "--regexes", metavar="FILE", help="ua-parser regexes.yaml for device parsing")
    parser.add_argument("--version", action="version", version=f"trackalert {__version__}")
    return parser


def default_config() -> str:
    preferred = os.path.join(SYSCONFDIR, "wforce", "trackalert.conf")
    return preferred if os.path.exists(preferred) else os.path.join(SYSCONFDIR, "trackalert.conf")


def _log_level(args: argparse.Namespace) -> int:
    level = 7 if args.verbose else 6
    if args.loglevel is not None:
        try:
            level = int(args.loglevel)
        except ValueError:
            sys.stderr.write(f"Bad log level ({args.loglevel}) - must be an integer\n")
            raise SystemExit(1) from None
    return level


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] in SUBCOMMANDS:
        return SUBCOMMANDS[arguments[0]](arguments[1:])
    args = build_parser().parse_args(arguments)
    if not log.valid_facility(args.facility):
        sys.stderr.write("Bad log facility\n")
        return 1
    level = _log_level(args)
    log.configure(
        level=level, verbose=args.verbose, console=True, timestamps=args.docker, facility=args.facility,
        # console client: stdout is for replies only (`trackalert -e 'makeKey()' >> config`)
        stream=sys.stderr if args.client is not None or args.execute is not None else None,
    )
    client = args.client is not None or args.execute is not None
    config = args.client if args.client else (args.config or default_config())
    config_dir, config_file = os.path.split(config)
    config_dir = config_dir or "."
    try:
        os.chdir(config_dir)
    except OSError as exc:
        log.logger.warning("Could not change working directory to %s (%s)", config_dir, exc.strerror)
    if args.regexes and not os.access(args.regexes, os.R_OK):
        log.logger.error("Cannot read the ua-parser regexes file %s", args.regexes)
        return 1
    if client:
        from trackalert.console.client import run_client  # no server imports for the client

        return run_client(config_file, args.execute)

    from trackalert.daemon import Options, run_server  # heavy imports only for the server

    mode = "systemd" if args.systemd else "daemon" if args.daemon else "docker" if args.docker else "foreground"
    options = Options(
        config_file=config_file, config_dir=os.getcwd(), mode=mode, regexes=args.regexes or "",
        loglevel=level, facility=args.facility,
    )
    return run_server(options)


# --------------------------------------------------------------------------- export / import

#: Exit statuses of the history subcommands (docs/history.md).
EXIT_OK, EXIT_ERROR, EXIT_REFUSED = 0, 1, 2


def _history_parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=f"trackalert {name}", description=description)
    parser.add_argument("--log", metavar="FILE", help="the SQLite event log file")
    parser.add_argument("-C", "--config", metavar="FILE",
                        help="configuration file: its setEventLog (or the default log next to "
                             "it) when --log is not given" + (
                                 "; its GeoIP databases (setEnrichment) enrich wforce report "
                                 "lines" if name == "import" else ""))
    return parser


def parse_time(text: str) -> float:
    """Epoch seconds, or an ISO 8601 date/time (UTC unless it says otherwise)."""
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a time")
        return value
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither epoch seconds nor an ISO date/time (2026-11-21T10:06:04Z)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


class _Config:
    """The config file run as the daemon runs it, for its log and its enrichment.

    Relative paths in a config are relative to its directory (the daemon works there), so the
    config runs there; the caller's own paths are made absolute first."""

    def __init__(self, path: str) -> None:
        from trackalert.daemon import Daemon, Options, StartupError

        path = os.path.abspath(path)
        previous = os.getcwd()
        os.chdir(os.path.dirname(path))
        try:
            self.daemon = Daemon(Options(config_file=path, config_dir=os.getcwd()))
            self.daemon.load_config()
            settings = self.daemon.host.settings
            url = settings.eventlog_url or settings.default_eventlog_url()
            from trackalert.eventlog import sqlite_path

            if url.lower().startswith("elasticsearch://"):
                self.url = self.log_path = url  # export and `trackalert alerts` read it as it is
            else:
                self.log_path = os.path.abspath(sqlite_path(url))
                self.url = "sqlite:///" + self.log_path
        except (StartupError, ValueError) as exc:
            raise _CliError(str(exc)) from None
        finally:
            os.chdir(previous)

    def enrich(self) -> "Callable[[], Any] | None":
        """What makes the config's enricher in each import process (a picklable factory)."""
        enricher = self.daemon.host.enricher
        if enricher is None:
            return None
        return functools.partial(_enrich_from, enricher.snapshot())


def _enrich_from(snapshot: dict) -> "Callable[[Any], Any]":
    from trackalert.enrich import Enricher

    return Enricher.from_snapshot(snapshot).enrich


class _CliError(Exception):
    pass


def _log_file(args: argparse.Namespace) -> tuple[str, "_Config | None"]:
    """--log, else the log of -C (or of the default config)."""
    config = _Config(args.config or default_config()) if args.config or not args.log else None
    if args.log and "://" in args.log:  # an elasticsearch:// log (export reads it)
        return args.log, config
    path = os.path.abspath(args.log) if args.log else config.log_path  # type: ignore[union-attr]
    if not path:
        raise _CliError(f"the event log of the config is {config.url}: give --log FILE")  # type: ignore[union-attr]
    return path, config


def _progress(what: str) -> Any:
    if not sys.stderr.isatty():
        return None
    from trackalert.eventlog.history import Progress

    return Progress(sys.stderr, what)


def _quiet_logging() -> None:
    """Warnings and errors to stderr only: stdout may be the export itself."""
    log.configure(level=4, console=True, facility=None, stream=sys.stderr)


def export_main(argv: Sequence[str]) -> int:
    parser = _history_parser("export", "Write an event log, or a part of it, as NDJSON: one "
                             "event per line (seq, received, delivery_id, report, enrichment).")
    parser.add_argument("--from", dest="from_", metavar="TIME", type=parse_time,
                        help="only events received at or after TIME (epoch or ISO date/time)")
    parser.add_argument("--to", metavar="TIME", type=parse_time,
                        help="only events received before TIME")
    parser.add_argument("--login", action="append", default=[], metavar="LOGIN",
                        help="only this login's events (repeat for more)")
    parser.add_argument("--out", metavar="FILE", help="write here instead of stdout")
    args = parser.parse_args(argv)
    _quiet_logging()
    from trackalert.eventlog.history import HistoryError, export_events

    try:
        path, _ = _log_file(args)
        out: IO[str] = (open(args.out, "w", encoding="utf-8", newline="\n") if args.out
                        else io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="\n"))
        progress = _progress("export")
        try:
            count = export_events(path, out, args.from_, args.to, args.login, progress)
        finally:
            out.flush()
            if args.out:
                out.close()
            else:
                out.detach()
            if progress is not None:
                progress.close()
    except (_CliError, HistoryError, OSError) as exc:
        sys.stderr.write(f"trackalert export: {exc}\n")
        return EXIT_ERROR
    sys.stderr.write(f"trackalert export: {count} event(s) from {path}\n")
    return EXIT_OK


def import_main(argv: Sequence[str]) -> int:
    parser = _history_parser("import", "Load NDJSON into an event log: exports (trackalert "
                             "export) or wforce report lines, bare or as an Elasticsearch "
                             "hit's _source, whose 't' becomes their received time.")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="NDJSON file, or - for stdin")
    parser.add_argument("--skip-bad", action="store_true",
                        help="go on past bad lines (and count them) instead of refusing the file")
    parser.add_argument("--sort", action="store_true",
                        help="sort each file by received (stable) instead of refusing one "
                             "that is out of order")
    args = parser.parse_args(argv)
    _quiet_logging()
    try:
        path, config = _log_file(args)
        if "://" in path:
            raise _CliError(f"{path}: import writes SQLite log files only")
    except _CliError as exc:
        sys.stderr.write(f"trackalert import: {exc}\n")
        return EXIT_ERROR
    enrich = config.enrich() if config is not None else None
    return _import_all(path, args, enrich)


def _import_all(path: str, args: argparse.Namespace,
                enrich: "Callable[[], Any] | None") -> int:
    import sqlite3

    from trackalert.eventlog.base import EventLogError
    from trackalert.eventlog.history import MAX_LISTED, HistoryError, ImportRefused, import_file

    shown = [0]

    def on_bad(name: str, line: int, why: str) -> None:
        shown[0] += 1
        if shown[0] <= MAX_LISTED:
            sys.stderr.write(f"trackalert import: {name}:{line}: {why}\n")

    try:
        asyncio.run(_prepare_log(path))
    except (EventLogError, OSError) as exc:
        sys.stderr.write(f"trackalert import: cannot open the event log {path}: {exc}\n")
        return EXIT_ERROR
    for name in args.inputs:
        progress = _progress(f"import {name}")
        try:
            with _open_input(name) as source:
                result = import_file(
                    path, source, name, enrich=enrich, skip_bad=args.skip_bad,
                    sort=args.sort, on_bad=on_bad, progress=progress)
        except ImportRefused as exc:
            sys.stderr.write(f"trackalert import: {exc}\ntrackalert import: nothing of "
                             f"{name} was imported\n")
            return EXIT_REFUSED
        except (HistoryError, sqlite3.Error, OSError) as exc:
            sys.stderr.write(f"trackalert import: {name}: {exc}\ntrackalert import: "
                             f"nothing of {name} was imported\n")
            return EXIT_ERROR
        finally:
            if progress is not None:
                progress.close()
        print(result.summary(), flush=True)
    return EXIT_OK


async def _prepare_log(path: str) -> None:
    """Create the log, or check and migrate it, as the daemon does when it opens it."""
    from trackalert.clock import RealClock
    from trackalert.eventlog.sqlite import SQLiteEventLog

    eventlog = SQLiteEventLog(path, RealClock())
    await eventlog.open()
    await eventlog.close()


def _open_input(name: str) -> IO[bytes]:
    if name == "-":
        return open(sys.stdin.fileno(), "rb", closefd=False)
    return open(name, "rb")


def alerts_main(argv: Sequence[str]) -> int:
    parser = _history_parser("alerts", "List the alerts the policies sent (runCustomWebHook "
                             "calls), oldest first: a table, or NDJSON with --json.")
    parser.add_argument("--url", metavar="URL", help="the event log URL (sqlite:///... or "
                        "elasticsearch://...) instead of --log or -C")
    for key in ("policy", "login", "hook", "outcome"):
        parser.add_argument(f"--{key}", metavar=key.upper(), help=f"only alerts of this {key}")
    parser.add_argument("--from", dest="since", metavar="TIME", type=parse_time,
                        help="only alerts at or after TIME (epoch or ISO date/time)")
    parser.add_argument("--to", dest="until", metavar="TIME", type=parse_time,
                        help="only alerts at or before TIME")
    parser.add_argument("-n", "--limit", type=int, default=1000, metavar="N",
                        help="the newest N that match (default 1000)")
    parser.add_argument("--json", action="store_true", help="NDJSON, one alert per line")
    args = parser.parse_args(argv)
    _quiet_logging()
    from trackalert.eventlog import open_alerts
    from trackalert.eventlog.alerts import alert_table, parse_alert_filter
    from trackalert.eventlog.filters import AsOf

    try:
        url = args.url or ("sqlite:///" + os.path.abspath(args.log) if args.log
                           else _Config(args.config or default_config()).url)
        keys = ("policy", "login", "hook", "outcome", "since", "until")
        flt = parse_alert_filter((k, getattr(args, k)) for k in keys if getattr(args, k) is not None)
        store = open_alerts(url)
        try:
            found = store.recent(flt, args.limit, AsOf())[::-1]
        finally:
            store.close()
    except Exception as exc:  # noqa: BLE001 - any store's error, said in one line
        sys.stderr.write(f"trackalert alerts: {exc}\n")
        return EXIT_ERROR
    import json

    lines = (json.dumps(a.to_json_dict(), ensure_ascii=False) for a in found) if args.json \
        else alert_table(found)
    for line in lines:
        sys.stdout.write(line + "\n")
    return EXIT_OK


SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "export": export_main, "import": import_main, "alerts": alerts_main,
}


if __name__ == "__main__":
    raise SystemExit(main())
