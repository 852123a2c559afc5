"""How long the starter policies' window shapes take to be ready on a big log: built, restored.

    .venv/bin/python bench/projection_build_bench.py --log FILE [--restart]
    .venv/bin/python bench/projection_build_bench.py --events 10000000 --prefill-cache DIR [--restart]

Opens a log (a copy of bench.reports' prefilled history with `--events`, kept in
`--prefill-cache`), puts a window projection (eventlog/windows.py) at its end as a restarted
policy runner has it, registers the seven counting shapes of the starter policies (three of
180 days, three of an hour, one of a day) and waits until all are built: prints the wall and
CPU time, when each window was handed over, and the process's peak RSS. Runs on whichever
checkout's `trackalert` is first on the path (PYTHONPATH=<checkout> to compare two).

With `--restart`: then judges the log's last event, saves the windows at a graceful stop
(eventlog/snapshot.py), and times a second projection's start until the same shapes are ready
from the snapshot. The snapshot is left beside the log (`<log>-windows`).
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from pathlib import Path

import trackalert
from trackalert.clock import RealClock
from trackalert.eventlog.filters import parse_field, parse_filter
from trackalert.eventlog.sqlite import SQLiteEventLog
from trackalert.eventlog.windows import WindowProjection

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reports  # noqa: E402

#: (counted field or None, filter) of every counting shape the starter policies call.
CALLS = [(None, {"login": "x", "success": True, "window": "180d"}),
         (None, {"login": "x", "success": True, "country": "GB", "window": "180d"}),
         (None, {"login": "x", "success": True, "device_attrs.browser.family": "Chrome",
                 "window": "180d"}),
         ("remote", {"login": "x", "success": False, "window": "1h"}),
         ("login", {"remote": "192.0.2.7", "success": False, "window": "1h"}),
         ("login", {"netmask": "192.0.2.0/24", "success": False, "window": "1h"}),
         ("login", {"pwhash": "0a1b2c", "success": False, "window": "1d"})]


def register(projection: WindowProjection) -> None:
    for name, flt in CALLS:
        projection.register(parse_filter(flt.items()), parse_field(name) if name else None)


def ready(projection: WindowProjection, started: float) -> list[str]:
    """Wait until every registered shape is built; when each window was handed over."""
    seen, marks = 0, []
    near = getattr(projection, "_near", [])
    while not projection.wait_built(0.2):
        if len(near) > seen:
            seen = len(near)
            marks.append(f"{near[-1].seconds:g}s at {time.monotonic() - started:.1f} s")
    return marks


async def run(path: Path, restart: bool) -> None:
    log = SQLiteEventLog(path, RealClock())
    await log.open()
    last = await log.last_seq()
    checkout = Path(trackalert.__file__).resolve().parent.parent.name
    projection = WindowProjection(log)
    projection.start_at(last - 1 if restart else last)
    started, cpu = time.monotonic(), time.process_time()
    register(projection)
    marks = ready(projection, started)
    print(f"{checkout}: {last:,} events: all starter shapes built in "
          f"{time.monotonic() - started:.1f} s wall, {time.process_time() - cpu:.1f} s CPU; "
          f"windows handed over: {', '.join(marks) or '-'}; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB", flush=True)
    if restart:
        (event,) = await log.read(last - 1, 1)
        projection.begin(event)
        projection.finish(event)
        saving = time.monotonic()
        projection.close(save=True)
        print(f"  saved at a stop in {time.monotonic() - saving:.2f} s", flush=True)
        projection = WindowProjection(log)
        started, cpu = time.monotonic(), time.process_time()
        projection.start_at(last)
        register(projection)
        ready(projection, started)
        print(f"  restart: all starter shapes ready in {time.monotonic() - started:.2f} s wall, "
              f"{time.process_time() - cpu:.2f} s CPU", flush=True)
    projection.close()
    await log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", type=Path, help="a prefilled log to open (left as it is)")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--prefill-cache", type=Path, metavar="DIR")
    parser.add_argument("--restart", action="store_true", help="also save and time a restart")
    args = parser.parse_args()
    path = args.log
    if path is None:
        path = Path(f"/tmp/projection-build-{args.events}.db")
        reports.prepare_log(path, args.events, args.prefill_cache)
    asyncio.run(run(path, args.restart))


if __name__ == "__main__":
    main()
