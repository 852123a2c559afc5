"""`trackalert-replay`: the command line of the replay (docs/replay.md).

Exit statuses: 0 the replay ran (with --keep-going, even if policies erred; with --expect, the
alerts were the expected ones); 1 a policy error (the config does not load, a Lua error in
report or a background function, a webhook name no addCustomWebHook registered), named
file:line; 2 bad usage or input (arguments, a source that is not a log, an unreadable file or
expected file); 3 with --expect, the alerts were not the expected ones (the diff on stderr);
130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import sys
from contextlib import ExitStack
from typing import IO, Any, Callable, NoReturn, Sequence

from trackalert import log
from trackalert.replay import compare as comparing
from trackalert.replay import expect as expecting
from trackalert.replay import html_report
from trackalert.replay import summary as summaries
from trackalert.replay.engine import ConfigError, Outcome, Replay
from trackalert.replay.source import Selection, SourceError, open_source

OK, POLICY_ERROR, BAD_INPUT, UNEXPECTED, INTERRUPTED = 0, 1, 2, 3, 130


class UsageError(Exception):
    """Bad arguments; exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        sys.stderr.write(f"trackalert-replay: {message}\n")
        raise SystemExit(BAD_INPUT)


def parse_time(text: str) -> float:
    """Epoch seconds, or an ISO date/time (UTC unless it says otherwise)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither epoch seconds nor an ISO date (2026-01-31 or 2026-01-31T12:00)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="trackalert-replay",
        description="Run a trackalert config's policies over a recorded event log, on a virtual "
                    "clock, and show the alerts they would have sent. Nothing leaves the machine.",
        epilog="Exit status: 0 done, 1 policy error (file:line named; not with --keep-going "
               "unless the config does not load), 2 bad usage or input, 3 alerts other than "
               "--expect's, 130 interrupted.",
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="the trackalert.conf to replay")
    parser.add_argument("--log", required=True, metavar="SOURCE",
                        help="an SQLite event log file (opened read-only), an NDJSON export or an "
                             "Elasticsearch log (elasticsearch://host:9200/prefix, read-only)")
    parser.add_argument("--from", dest="start", type=parse_time, metavar="T",
                        help="replay events received from T on (epoch or ISO date, UTC)")
    parser.add_argument("--to", dest="end", type=parse_time, metavar="T",
                        help="replay events received before T; background functions run up to T")
    parser.add_argument("--login", action="append", default=[], metavar="L",
                        help="replay only this login's reports (repeatable); helpers still see all")
    parser.add_argument("--out", metavar="FILE", help="write the alerts as NDJSON, in event order")
    parser.add_argument("--summary-json", metavar="FILE", help="write the summary as JSON")
    parser.add_argument("--compare", metavar="BASELINE", help="replay this config too, in the same pass, "
                        "and show the alerts added, removed and unchanged")
    parser.add_argument("--compare-json", metavar="FILE", help="with --compare: write the comparison as JSON")
    parser.add_argument("--baseline-out", metavar="FILE", help="with --compare: the baseline's alerts as NDJSON")
    parser.add_argument("--report", metavar="FILE", help="write a self-contained HTML report "
                        "(alerts per day and policy, the summary tables, the first examples)")
    parser.add_argument("--lua-log", metavar="FILE",
                        help="write every log line of the policies (infoLog & co.) as NDJSON")
    parser.add_argument("--expect", metavar="FILE",
                        help="NDJSON of the alerts the config must give (fields left out are not "
                             "compared): exit status 3 and a diff when they differ")
    parser.add_argument("--keep-going", action="store_true",
                        help="go on past policy errors (counted in the summary; exit status 0)")
    parser.add_argument("--quiet", "-q", action="store_true", help="print no summary and no progress bar")
    return parser


def _progress(total: int | None, quiet: bool, stream: IO[str]) -> Any:
    """A tqdm bar on a terminal only (events done, rate, ETA); nothing otherwise."""
    if quiet or not stream.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=" events", unit_scale=True, file=stream, dynamic_ncols=True,
                smoothing=0.1, mininterval=0.25)


def _writer(stack: ExitStack, path: str | None) -> Callable[[dict[str, Any]], None] | None:
    if path is None:
        return None
    handle = stack.enter_context(open(path, "w", encoding="utf-8"))
    return lambda record: handle.write(summaries.dumps(record) + "\n")


def _write_alerts(path: str | None, alerts: list[dict[str, Any]]) -> None:
    if path is None:
        return
    with open(path, "w", encoding="utf-8") as handle:
        for alert in alerts:
            handle.write(summaries.dumps(alert) + "\n")


def _write_json(path: str | None, value: Any) -> None:
    if path is None:
        return
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(summaries.dumps(value) + "\n")


def _check_args(args: argparse.Namespace) -> None:
    for name in ("compare_json", "baseline_out"):
        if getattr(args, name) and not args.compare:
            raise UsageError(f"--{name.replace('_', '-')} needs --compare")
    for path in (args.config, args.compare):
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{path}: no such config file")
    if args.start is not None and args.end is not None and args.end <= args.start:
        raise UsageError("--to must be later than --from")


def _absolute(args: argparse.Namespace) -> None:
    """Paths as given, before the configs load in their own directories."""
    for name in ("config", "log", "out", "summary_json", "compare", "compare_json", "baseline_out",
                 "lua_log", "report"):
        value = getattr(args, name, None)
        if value is not None and "://" not in value:  # an elasticsearch:// log is a URL
            setattr(args, name, os.path.abspath(value))


def _setup_logging(stream: IO[str]) -> logging.Handler:
    """While configs load: their warnings on stderr (no syslog: nothing leaves the machine)."""
    log.reset()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("trackalert-replay: %(message)s"))
    log.logger.addHandler(handler)
    log.logger.setLevel(logging.INFO)
    log.logger.propagate = False
    return handler


def run(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    _check_args(args)
    # a bad expected file is known before a long replay, not after it; the diff names it as given
    expected = expecting.load_expected(args.expect) if args.expect else None
    _absolute(args)
    handler = _setup_logging(err)
    try:
        return _replay(args, out, err, expected)
    finally:
        log.logger.removeHandler(handler)


def _expect(actual: list[dict[str, Any]], expected: list[dict[str, Any]], quiet: bool, out: IO[str],
            err: IO[str]) -> int:
    """--expect's verdict: the diff on stderr when it fails, so a CI log shows what changed."""
    ok, diff = expecting.check(actual, expected)
    if not ok:
        err.write(f"trackalert-replay: the alerts are not the expected ones\n{diff}\n")
        return UNEXPECTED
    if not quiet:
        out.write(f"expect: {diff}\n")
    return OK


def execute(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    """`run` with every failure turned into its message and exit status, as the command gives
    them (trackalert.testing runs replays through here too)."""
    try:
        return run(args, out, err)
    except (UsageError, SourceError, ConfigError, expecting.ExpectationError, OSError) as exc:
        err.write(f"trackalert-replay: {exc}\n")
        return POLICY_ERROR if isinstance(exc, ConfigError) else BAD_INPUT


def _replay(args: argparse.Namespace, out: IO[str], err: IO[str],
            expected: list[dict[str, Any]] | None = None) -> int:
    source = open_source(args.log)
    try:
        selection = Selection(args.start, args.end, tuple(dict.fromkeys(args.login)))
        configs = [args.config] + ([args.compare] if args.compare else [])
        bar = _progress(source.count(selection), args.quiet, err)
        with ExitStack() as stack:
            sinks = [_writer(stack, args.lua_log)] + [None] * (len(configs) - 1)
            replay = Replay(source, selection, configs, keep_going=args.keep_going,
                            progress=bar.update if bar is not None else (lambda n: None),
                            log_sinks=sinks)
            try:
                outcomes = asyncio.run(replay.run())
            finally:
                if bar is not None:
                    bar.close()
        for name, why in replay.notes.items():
            err.write(f"trackalert-replay: note: {name.split(':')[0]}() is ignored: {why}\n")
        status = _report(args, replay, outcomes, out, err)
        if expected is None or status != OK:
            return status
        return _expect(outcomes[0].findings.alerts, expected, args.quiet, out, err)
    finally:
        source.close()


def _summary(replay: Replay, outcome: Outcome) -> dict[str, Any]:
    findings = outcome.findings
    return summaries.build(outcome.events, replay.span, findings.alerts, findings.error_count,
                           findings.errors, replay.seconds)


def _report(args: argparse.Namespace, replay: Replay, outcomes: list[Outcome], out: IO[str],
            err: IO[str]) -> int:
    main = outcomes[0]
    summary = _summary(replay, main)
    _write_alerts(args.out, main.findings.alerts)
    _write_json(args.summary_json, summary)
    baseline = baseline_summary = result = None
    if len(outcomes) > 1:
        baseline = outcomes[1]
        baseline_summary = _summary(replay, baseline)
        result = comparing.compare(main.findings.alerts, baseline.findings.alerts)
        _write_alerts(args.baseline_out, baseline.findings.alerts)
        _write_json(args.compare_json, result)
    if args.report:
        _write_report(args, summary, main.findings.alerts, baseline_summary,
                      baseline.findings.alerts if baseline else None, result)
    if not args.quiet:
        out.write(summaries.render(summary, os.path.basename(args.config)) + "\n")
        _extras(main, out)
        if baseline_summary is not None and result is not None:
            out.write(summaries.render(baseline_summary, os.path.basename(args.compare)) + "\n")
            out.write(comparing.render(result) + "\n")
    return _status(outcomes, args.keep_going, err)


def _write_report(args: argparse.Namespace, summary: dict[str, Any], alerts: list[dict[str, Any]],
                  baseline_summary: dict[str, Any] | None, baseline_alerts: list[dict[str, Any]] | None,
                  result: dict[str, Any] | None) -> None:
    """The HTML page of exactly what --summary-json, --out, --baseline-out and --compare-json
    hold; its title names both configs when there are two."""
    title = os.path.basename(args.config)
    if args.compare:
        title += f" compared with {os.path.basename(args.compare)}"
    page = html_report.render(title, summary, alerts, baseline_summary, baseline_alerts, result)
    with open(args.report, "w", encoding="utf-8") as handle:
        handle.write(page)


def _extras(outcome: Outcome, out: IO[str]) -> None:
    """Custom stats, background runs and log lines: in the text only (the summary dict is a
    shared interface)."""
    stats = {k: v for k, v in outcome.custom_stats.items() if v}
    if stats:
        out.write("  custom stats: " + ", ".join(f"{k} {v:,}" for k, v in stats.items()) + "\n")
    if outcome.background_runs:
        out.write("  background runs: " + ", ".join(
            f"{k} {v:,}" for k, v in sorted(outcome.background_runs.items())) + "\n")
    if outcome.findings.log_counts:
        out.write("  log lines: " + ", ".join(
            f"{k} {v:,}" for k, v in sorted(outcome.findings.log_counts.items())) + "\n")


def _status(outcomes: list[Outcome], keep_going: bool, err: IO[str]) -> int:
    errors = [(outcome, error) for outcome in outcomes for error in outcome.findings.errors]
    if not errors:
        return OK
    outcome, first = min(errors, key=lambda pair: pair[1]["seq"])
    if keep_going:
        return OK
    message = first["message"].splitlines()[0] if first["message"] else "(no message)"
    err.write(f"trackalert-replay: policy error at event {first['seq']}: {message}\n")
    err.write("trackalert-replay: stopped (--keep-going goes on past policy errors)\n")
    return POLICY_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return execute(args, sys.stdout, sys.stderr)
    except KeyboardInterrupt:
        sys.stderr.write("trackalert-replay: interrupted\n")
        return INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
