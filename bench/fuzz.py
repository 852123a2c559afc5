"""Long fuzz run of the report endpoint: the suite's generator (trackalert.fuzz), more cases.

    .venv/bin/python bench/fuzz.py [--cases 50000] [--seed 1] [--web-processes 0 2] [--concurrency 32]
                                   [--connections close keep-alive]

Starts a real daemon per mode on loopback, sends the seeded hostile requests, stops it, and holds
the answers against the SQLite log: no 5xx, JSON error bodies, nothing stored for a 4xx, every 200
stored exactly once. Prints the counts and the first problems; exits 1 if there were any.
With `--connections keep-alive` each client sends its cases one after another on one connection
(trackalert.fuzz.run's keep_alive), so every request also follows others on its connection.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trackalert import fuzz  # noqa: E402
from trackalert.testing import DEFAULT_PASSWORD, DaemonProcess, listener_config  # noqa: E402

CONFIG = listener_config() + """
setNumLuaStates(2)
setNumWebProcesses({web_processes})
setReport(function(lt) local r = lt.remote:tostring() end)
"""


async def one_mode(web_processes: int, keep_alive: bool, args: argparse.Namespace) -> int:
    cases = fuzz.generate(args.seed, args.cases, DEFAULT_PASSWORD)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory)
        daemon = DaemonProcess(path, CONFIG.replace("{web_processes}", str(web_processes)))
        started = time.monotonic()
        last = [started]

        def progress(index: int) -> None:
            if time.monotonic() - last[0] > 5:
                last[0] = time.monotonic()
                print(f"  ... {index + 1}/{len(cases)}", flush=True)

        with daemon:
            outcomes = await fuzz.run("127.0.0.1", daemon.port, cases, args.concurrency, progress, keep_alive)
            daemon.stop()
        elapsed = time.monotonic() - started
        verdict = fuzz.check(outcomes, await fuzz.markers_in_sqlite(path / "trackalert-events.db"))
        tracebacks = daemon.output().count("Traceback")
    kinds = Counter((o.case.kind.split("/")[0], o.status) for o in outcomes)
    print(f"web processes {web_processes}, {'keep-alive' if keep_alive else 'close'}: "
          f"{verdict.summary()} in {elapsed:.1f} s; "
          f"{tracebacks} tracebacks in the daemon's log")
    print("  " + ", ".join(f"{kind} {status}: {n}" for (kind, status), n in sorted(kinds.items())))
    for problem in verdict.problems[:20]:
        print("  PROBLEM", problem[:300])
    return len(verdict.problems) + tracebacks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=50000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--web-processes", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--connections", nargs="+", choices=("close", "keep-alive"),
                        default=["close", "keep-alive"])
    args = parser.parse_args()
    problems = sum(asyncio.run(one_mode(n, kind == "keep-alive", args))
                   for n in args.web_processes for kind in args.connections)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
