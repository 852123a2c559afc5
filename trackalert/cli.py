"""The `trackalert` command line, option for option compatible with the C++ daemon (reference §2).

Differences on purpose: `-f` selects the syslog facility for real, `-R` is honoured (device
parsing), `-d` is a real daemon whose parent waits for readiness, and every start-up failure exits
non-zero with a message that says what to fix.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn, Sequence

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
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
