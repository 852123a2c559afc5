"""The working tree against another commit, side by side, alternating: the house way to quote figures.

    .venv/bin/python bench/compare.py [--against REV] [--rounds 3] [--bench workload|ingest] \\
        [--prefill-cache /work/wlcache] [-- ARGS FOR THE BENCH, e.g. --policy starter --prefill 5000000]

A machine shared with others, or simply warming up, drifts more than most changes move the
figures, so one run of each says little. This exports REV (default HEAD~1) into a temporary
directory with `git archive`, then runs the same benchmark script (this tree's bench/<name>.py)
for the working tree and for REV in turn, ALTERNATING the order every round, each with its own
checkout as working directory and PYTHONPATH (the daemon's `python -m trackalert` resolves from
there) and the same venv. Every run reports which `trackalert` its daemon really imported; a run
that imported the wrong checkout stops the comparison. It prints per-round figures, the medians
and the ratio tree / REV.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent

#: Figures worth a ratio, in print order (the others are shown per round only).
SHOWN = ("reports_per_s", "p50_ms", "p99_ms", "policy_events_per_s", "lag_events", "lag_max_events",
         "drain_s",
         "rss_peak_mib", "rss_end_mib", "cpu_core_us_per_report", "cpu_web_us_per_report",
         "cpu_policy_us_per_event", "cpu_policy_us_per_report")


@dataclass
class Side:
    """One of the two compared codes: where it is and what its rounds measured."""

    name: str
    root: Path
    rounds: list[dict[str, dict[str, float]]] = field(default_factory=list)


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def export(root: Path, rev: str, into: Path) -> str:
    """`rev` as plain files under `into` (no worktree registered in the repository); its sha."""
    sha = git(root, "rev-parse", "--verify", f"{rev}^{{commit}}")
    into.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(root), "archive", sha], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(into)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"git archive {sha} failed")
    return sha


def run_round(side: Side, bench: str, bench_args: list[str], scratch: Path, number: int,
              prefill_cache: Path | None = None) -> None:
    """One run of the benchmark on `side`'s code; its figures are appended to side.rounds."""
    figures = scratch / f"{side.name}-{number}.json"
    env = {**os.environ, "PYTHONPATH": str(side.root), "PYTHONUNBUFFERED": "1"}
    command = bench_command(side, bench, bench_args, scratch, figures, prefill_cache)
    print(f"\n--- round {number}: {side.name}  (cwd and PYTHONPATH {side.root})", flush=True)
    subprocess.run(command, cwd=side.root, env=env, check=True)
    result = json.loads(figures.read_text())
    expected = side.root.resolve() / "trackalert"
    if Path(result["origin"]) != expected:
        raise SystemExit(f"{side.name}: the daemon imported {result['origin']}, not {expected}")
    side.rounds.append(result["rows"])


def bench_command(side: Side, bench: str, bench_args: list[str], scratch: Path, figures: Path,
                  prefill_cache: Path | None) -> list[str]:
    """The benchmark's command line for one round of `side`. Each side prefills with its own
    code (its schema) once, then copies that log every round; or, with `prefill_cache`, both
    copy the logs found there (each daemon migrates its copy on open): a 5M-event log takes
    minutes to build, and both sides then start from the very same events."""
    cache = prefill_cache if prefill_cache is not None else scratch / f"prefill-{side.name}"
    return [sys.executable, str(BENCH / f"{bench}.py"), *bench_args, "--json", str(figures),
            "--prefill-cache", str(cache)]


def median(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else float("nan")


def ratio(tree: float, other: float) -> str:
    if math.isnan(tree) or math.isnan(other):
        return "n/a"
    if other == 0:
        return "=" if tree == 0 else "inf"
    return f"{tree / other:.2f}"


def cell(value: float) -> str:
    if math.isnan(value):
        return "—"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}"


def print_table(tree: Side, other: Side) -> None:
    """Per key (scenario) and figure: each round of both sides, their medians, tree / other."""
    for key in tree.rounds[0]:
        print(f"\n== {key}   (ratio = {tree.name} / {other.name})")
        print(f"  {'figure':22} {'rounds ' + tree.name:>28} {'rounds ' + other.name:>28}"
              f" {'median':>9} {'median':>9} {'ratio':>6}")
        for name in SHOWN:
            if name not in tree.rounds[0][key]:
                continue
            mine = [r[key][name] for r in tree.rounds]
            theirs = [r[key][name] for r in other.rounds]
            print(f"  {name:22} {' '.join(map(cell, mine)):>28} {' '.join(map(cell, theirs)):>28}"
                  f" {cell(median(mine)):>9} {cell(median(theirs)):>9}"
                  f" {ratio(median(mine), median(theirs)):>6}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default="HEAD~1", help="commit to compare with (default HEAD~1)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side (>= 1)")
    parser.add_argument("--bench", choices=("workload", "ingest"), default="workload")
    parser.add_argument("--prefill-cache", type=Path, metavar="DIR",
                        help="both sides copy their prefilled logs from DIR (e.g. /work/wlcache; "
                             "its files are only read) instead of each prefilling its own once")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: the bench's own options")
    args = parser.parse_args(argv)
    if args.bench_args[:1] == ["--"]:
        args.bench_args = args.bench_args[1:]
    args.rounds = max(1, args.rounds)
    return args


def main() -> None:
    args = parse_args()
    root = Path(git(BENCH, "rev-parse", "--show-toplevel"))
    with tempfile.TemporaryDirectory(prefix="ta-compare-") as tmp:
        scratch = Path(tmp)
        sha = export(root, args.against, scratch / "other")
        tree = Side("tree", root)
        other = Side(sha[:7], scratch / "other")
        print(f"tree:  {root} (working tree, HEAD {git(root, 'rev-parse', '--short', 'HEAD')}"
              f"{', with uncommitted changes' if git(root, 'status', '--porcelain') else ''})")
        print(f"other: {args.against} = {sha}, exported to {other.root}")
        print(f"bench: {BENCH / (args.bench + '.py')} {' '.join(args.bench_args)}; python {sys.executable}")
        for number in range(1, args.rounds + 1):
            order = (tree, other) if number % 2 else (other, tree)
            for side in order:
                run_round(side, args.bench, args.bench_args, scratch, number, args.prefill_cache)
        print_table(tree, other)


if __name__ == "__main__":
    main()
