"""trackalert-replay's throughput: events/s for a trivial policy and for the six starter policies.

    .venv/bin/python bench/replay_bench.py [--events 1000000] [--log FILE] [--rounds 1]
                                           [--cache DIR] [--policy trivial|starter|both]

Builds a log of --events events with bench/reports.py's prefill (the vocabulary of issue 9's
workload: 20,000 logins, GeoIP-known addresses, four devices, 70 % successes; one event every
0.5 s up to now), or copies --log FILE (e.g. /work/bench10m.db) into a temporary directory first
(the original is never opened), then runs the `trackalert-replay` command on it with

* trivial: `setReport(function(lt) end)`;
* starter: the operator's config of bench/workload.py (listener, 4 Lua states, 2 web processes,
  GeoIP City + ASN enrichment, the six starter policies as docs/policies.md loads them): the
  replay ignores what it cannot honour and runs the rest unchanged.

Prints, per policy and round, the events, run seconds and events/s of the replay's own summary
(the configs' load and the source's opening excluded), the process's wall and CPU time, and the
median over rounds. With --rounds > 1 the policies alternate (trivial, starter, trivial, ...), so
that other load on the machine falls on both alike. It asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(1, os.getcwd())
sys.path.append(str(Path(__file__).resolve().parent))

import reports  # noqa: E402
import workload  # noqa: E402

TRIVIAL = "setReport(function(lt) end)\n"


def prepare(directory: Path, args: argparse.Namespace) -> Path:
    log = directory / "replay.db"
    if args.log:
        started = time.monotonic()
        for suffix in ("", "-wal"):
            if os.path.exists(args.log + suffix):
                shutil.copyfile(args.log + suffix, str(log) + suffix)
        print(f"  copied {args.log} in {time.monotonic() - started:.0f} s", flush=True)
    else:
        reports.prepare_log(log, args.events, Path(args.cache) if args.cache else None)
    return log


def run_one(log: Path, config: Path, directory: Path) -> dict[str, float]:
    summary = directory / "summary.json"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "trackalert.replay.cli", "--config", str(config), "--log",
                    str(log), "-q", "--keep-going", "--summary-json", str(summary)], check=True)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    figures = json.loads(summary.read_text())
    return {"events": figures["events"], "alerts": figures["alerts"], "run_seconds": figures["run_seconds"],
            "events_per_second": figures["events_per_second"], "wall_seconds": wall,
            "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--log", help="copy this log instead of building one (never modified)")
    parser.add_argument("--cache", help="keep built logs here and copy them (bench/reports.py)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--policy", choices=("trivial", "starter", "both"), default="both")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="replay-bench-") as scratch:
        directory = Path(scratch)
        log = prepare(directory, args)
        configs = {"trivial": directory / "trivial.conf", "starter": directory / "starter.conf"}
        configs["trivial"].write_text(TRIVIAL)
        configs["starter"].write_text(workload.daemon_config("starter", 4, 2))
        names = ["trivial", "starter"] if args.policy == "both" else [args.policy]
        results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        for number in range(args.rounds):
            for name in names:
                figures = run_one(log, configs[name], directory)
                results[name].append(figures)
                print(f"  round {number + 1} {name:8} {figures['events']:>10,.0f} events "
                      f"{figures['run_seconds']:7.1f} s {figures['events_per_second']:>9,.0f} events/s "
                      f"(process: {figures['wall_seconds']:.1f} s wall, {figures['cpu_seconds']:.1f} s CPU; "
                      f"{figures['alerts']:,.0f} alerts)", flush=True)
        for name, rounds in results.items():
            rate = statistics.median(r["events_per_second"] for r in rounds)
            print(f"{name}: median {rate:,.0f} events/s over {len(rounds)} round(s)")


if __name__ == "__main__":
    main()
