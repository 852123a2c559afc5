"""The policy process's CPU per event, without a daemon: the starter policies over a stored log.

    .venv/bin/python bench/policy_process_bench.py [--events 250000] [--warm 150000]
                                                   [--spacing 0.001] [--profile FILE] [--json FILE]

Why: the policy process (trackalert/policyproc/child.py) reads every event back from the log by
its cursor and runs report(lt) on it; under wrk its CPU share moves with everything else on the
machine. This runs the child's own pieces in this process, on a log prefilled by
bench/reports.py (the vocabulary of bench/workload.py; one event every --spacing seconds, so a
1 h window holds 3,600 / spacing events) with the cursor at 0: the config of bench/workload.py
(GeoIP City + ASN enrichment, the six starter policies) run in the child's states
(policyproc.child.load_states), the same PolicyRunner on the child's log, woken by notify_head
as the core's HEAD messages wake it. The first --warm events register and build the shapes
(waited for); then the runner judges the rest and the process's CPU time per event is printed
(with the wall time, and the time the garbage collector took). The warm-up is long because
some shapes register late: new_country and new_device ask their 180-day shapes only once an
account has 10 successes, 60,000-100,000 events into this vocabulary, and each such build reads
the whole log; a shape registered during the measured part is printed (its build, a one-off at
start-up, is then in the figures: raise --warm). --profile FILE records that part with py-spy (raw, --gil). It asserts
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(1, os.getcwd())
sys.path.append(str(Path(__file__).resolve().parent.parent))

import reports  # noqa: E402
import workload  # noqa: E402
from trackalert.clock import RealClock  # noqa: E402
from trackalert.eventlog import open_event_log  # noqa: E402
from trackalert.lua.host import Host  # noqa: E402
from trackalert.lua.pool import LuaPool  # noqa: E402
from trackalert.lua.runner import PolicyRunner  # noqa: E402
from trackalert.policyproc.child import Counters, _NoSchedules, load_states  # noqa: E402

try:  # the policy process tunes its collector (older checkouts: not)
    from trackalert.gc_tuning import tune_gc  # noqa: E402
except ImportError:
    tune_gc = None
from trackalert.settings import Settings  # noqa: E402
from trackalert.webhooks import WebHooks  # noqa: E402


async def _until(runner: PolicyRunner, seq: int, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while runner.done < seq and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


async def run(args: argparse.Namespace, directory: Path) -> dict[str, float]:
    db = directory / "events.db"
    config = directory / "trackalert.conf"
    config.write_text(workload.daemon_config("starter", 4, 2, policy_process=True))
    clock = RealClock()
    settings = Settings(config_file=str(config), config_dir=str(directory))
    host = Host(settings=settings, clock=clock, metrics=Counters())
    host.scheduler = _NoSchedules()
    host.webhooks = WebHooks(settings, host.metrics, clock)
    workers = load_states(host, str(config))
    eventlog = open_event_log(f"sqlite:///{db}", clock)
    await eventlog.open()
    host.eventlog = eventlog
    host.webhooks.alerts = eventlog.alerts()
    if tune_gc is not None:
        tune_gc()  # as the child does once its states and log are ready
    pool = LuaPool(workers, clock)
    runner = PolicyRunner(eventlog, pool, host, save_cursor=lambda seq: None)
    await runner.start()
    runner.notify_head(args.warm)
    await _until(runner, args.warm)
    if runner.projection is not None:
        await asyncio.to_thread(runner.projection.wait_built, 600.0)
    runner.notify_head(args.warm + 256)  # the built shapes switch on
    await _until(runner, args.warm + 256)
    start = args.warm + 256
    shapes_before = runner.projection.shape_counts()[0] if runner.projection is not None else 0
    profiler = None
    if args.profile:
        py_spy = str(Path(sys.executable).with_name("py-spy"))
        profiler = subprocess.Popen([py_spy, "record", "-p", str(os.getpid()), "-r", "200", "-f", "raw",
                                     "--gil", "-o", args.profile, "--nonblocking"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await asyncio.sleep(1.0)
    gc_time = [0.0, 0.0, 0]  # seconds collecting, when this one started, collections

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_time[1] = time.perf_counter()
        else:
            gc_time[0] += time.perf_counter() - gc_time[1]
            gc_time[2] += 1

    gc.callbacks.append(on_gc)
    cpu, wall = time.process_time(), time.monotonic()
    runner.notify_head(args.events)
    await _until(runner, args.events)
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    gc.callbacks.remove(on_gc)
    if profiler is not None:
        profiler.send_signal(2)
        profiler.wait(60)
    judged = args.events - start
    await runner.stop()
    host.webhooks.alerts = None
    await eventlog.close()
    pool.close()
    shapes_after = runner.projection.shape_counts() if runner.projection is not None else (0, 0)
    calls = dict(runner.projection.calls) if runner.projection is not None else {}
    sql = sum(n for (_, path), n in calls.items() if path == "sql")
    return {"events": judged, "cpu_us_per_event": 1e6 * cpu / judged,
            "events_per_s": judged / wall, "wall_s": wall, "sql_calls": sql,
            "gc_us_per_event": 1e6 * gc_time[0] / judged, "gc_collections": gc_time[2],
            "shapes": shapes_after[0], "shapes_late": sum(shapes_after) - shapes_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=250_000)
    parser.add_argument("--warm", type=int, default=150_000)
    parser.add_argument("--spacing", type=float, default=0.001, help="seconds between events")
    parser.add_argument("--profile", metavar="FILE")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    import trackalert

    print(f"== policy process bench: {args.events:,} events ({args.warm:,} warm-up), "
          f"trackalert from {Path(trackalert.__file__).parent}", flush=True)
    with tempfile.TemporaryDirectory(prefix="ta-ppbench-") as tmp:
        db = Path(tmp) / "events.db"
        reports.prefill(db, args.events, spacing=args.spacing)
        with sqlite3.connect(db) as conn:  # nothing judged yet: the runner starts at the start
            conn.execute("UPDATE cursors SET seq = 0 WHERE name = 'report'")
        conn.close()
        figures = asyncio.run(run(args, Path(tmp)))
    print(f"  judged {figures['events']:,} events in {figures['wall_s']:.1f} s: "
          f"{figures['events_per_s']:,.0f} events/s, {figures['cpu_us_per_event']:.1f} µs CPU/event "
          f"(SQL answered {figures['sql_calls']:,} helper calls); garbage collection "
          f"{figures['gc_us_per_event']:.1f} µs/event ({figures['gc_collections']:,} collections); "
          f"{figures['shapes']} shapes on")
    if figures["shapes_late"]:
        print(f"  {figures['shapes_late']} shape(s) registered during the measured part: their "
              f"builds are in the figures (raise --warm)")
    if args.json:
        Path(args.json).write_text(json.dumps({"bench": "policy_process", "rows": {"starter": figures}}))


if __name__ == "__main__":
    main()
