"""The core process's CPU per report with web workers, without HTTP, wrk or Lua in the way.

    .venv/bin/python bench/core_bench.py [--duration 8] [--inflight 128] [--runner] [--rounds 3]

The core side is the real one (trackalert.frontend.supervisor's handling of its workers' channels,
trackalert.ingest, the SQLite event log with GeoIP City + ASN enrichment configured); two feeder
processes play the web workers: each parses varied wforce-shaped reports (bench/reports.py) and
hands them over as a worker does (trackalert.ingest.Handover, the real channel), keeping
`inflight / 2` reports waiting for their acknowledgement. With --runner, the policy runner runs an
empty `report` in 4 Lua states, as the daemon does. Prints durable reports/s and the CPU time the
core process spent per report (user and system), measured after a 2 s warm-up; with several
rounds, their medians. On a machine shared with others the CPU per report moves far less than the
rate. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import reports  # noqa: E402
from trackalert.clock import RealClock  # noqa: E402
from trackalert.devices import DeviceParser  # noqa: E402
from trackalert.enrich import Enricher  # noqa: E402
from trackalert.eventlog.sqlite import SQLiteEventLog  # noqa: E402
from trackalert.frontend import ipc  # noqa: E402
from trackalert.frontend.supervisor import LogOptions, WebWorkers, _Worker  # noqa: E402
from trackalert.ingest import Handover, Ingest  # noqa: E402
from trackalert.lua.host import Host  # noqa: E402
from trackalert.report import fingerprint, parse_report  # noqa: E402

WARMUP = 2.0


# ------------------------------------------------------------------------------ the feeder


async def feed(fd: int, inflight: int, seconds: float, settings: dict[str, Any]) -> None:
    """One pretend web worker: parse, hand over, and send the next report on each answer."""
    loop = asyncio.get_running_loop()
    handover = Handover()
    bodies = [reports.report_body(*draw, 1.7e9 + n).encode()
              for n, draw in enumerate(reports.draws(2000, seed=os.getpid()))]
    numbers = itertools.count()
    stop_at = loop.time() + seconds
    finished = asyncio.Event()
    outstanding = 0

    def send() -> None:
        nonlocal outstanding
        number = next(numbers)
        body = bodies[number % len(bodies)]
        handed = handover(parse_report(body, 0.0), f"bench-{os.getpid()}-{number}",
                          fingerprint(body), settings)
        channel.send((ipc.APPEND, number, *handed))
        outstanding += 1

    def answered(message: tuple) -> None:
        nonlocal outstanding
        if message[0] == ipc.APPENDED:
            count = 1
        elif message[0] == getattr(ipc, "STORED", None):  # a group's answers in one message
            count = len(message[1])
        else:
            return
        for _ in range(count):
            outstanding -= 1
            if loop.time() < stop_at:
                send()
            elif not outstanding:
                finished.set()

    channel = await ipc.open_channel(socket.socket(fileno=fd), answered)
    for _ in range(inflight):
        send()
    await finished.wait()
    channel.close()


# -------------------------------------------------------------------------------- the core


async def start_runner(host: Host, log: SQLiteEventLog) -> Any:
    from trackalert.lua.pool import LuaPool
    from trackalert.lua.runner import PolicyRunner
    from trackalert.lua.state import LuaState, StateKind

    states = []
    for index in range(4):
        state = LuaState(StateKind.WORKER, host, index)
        state.execute("setReport(function(lt) end)")
        states.append(state)
    pool = LuaPool(states, host.clock)
    runner = PolicyRunner(log, pool, host)
    await runner.start()
    return runner, pool


def cpu_now() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


async def one_round(args: argparse.Namespace) -> dict[str, float]:
    import gc

    host = Host()
    host.geoip.open("City", str(reports.CITY_DB))
    host.geoip.open("ASN", str(reports.ASN_DB))
    host.enricher = Enricher(host.geoip, {"city": "City", "asn": "ASN"}, DeviceParser())
    with tempfile.TemporaryDirectory(prefix="core-bench-") as tmp:
        log = SQLiteEventLog(Path(tmp) / "events.db", RealClock())
        await log.open()
        host.eventlog = log
        runner = await start_runner(host, log) if args.runner else None
        front = WebWorkers(host, Ingest(host, log), None, 2, [], [], LogOptions())  # type: ignore[arg-type]
        settings = {"enrichment": host.enricher.snapshot()}
        gc.collect()
        gc.freeze()  # as the daemon does after start-up
        workers = []
        for index in range(2):
            parent, child = socket.socketpair()
            process = subprocess.Popen(
                [sys.executable, __file__, "--feed", str(child.fileno()),
                 "--inflight", str(args.inflight // 2), "--duration", str(args.duration + WARMUP + 1),
                 "--settings", json.dumps(settings)],
                pass_fds=[child.fileno()],
            )
            child.close()
            worker = _Worker(index, process)
            worker.task = asyncio.create_task(front._connect(worker, parent))
            workers.append(worker)
        await asyncio.sleep(WARMUP)
        stored, (user, system) = log.stats.appended_total, cpu_now()
        started = asyncio.get_running_loop().time()
        await asyncio.sleep(args.duration)
        count = log.stats.appended_total - stored
        elapsed = asyncio.get_running_loop().time() - started
        user_end, system_end = cpu_now()
        await asyncio.gather(*(asyncio.to_thread(w.process.wait) for w in workers))
        await asyncio.gather(*(w.task for w in workers if w.task), return_exceptions=True)
        if runner is not None:
            await runner[0].stop()
            runner[1].close()
        await log.close()
    return {
        "reports_per_s": count / elapsed,
        "cpu_us": 1e6 * (user_end - user + system_end - system) / max(count, 1),
        "user_us": 1e6 * (user_end - user) / max(count, 1),
        "sys_us": 1e6 * (system_end - system) / max(count, 1),
    }


async def main(args: argparse.Namespace) -> None:
    rounds = []
    for number in range(1, args.rounds + 1):
        figures = await one_round(args)
        rounds.append(figures)
        print(f"round {number}: {figures['reports_per_s']:8,.0f} reports/s   core CPU "
              f"{figures['cpu_us']:5.1f} µs/report (user {figures['user_us']:.1f}, "
              f"system {figures['sys_us']:.1f})", flush=True)
    if len(rounds) > 1:
        median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        print(f"median:  {median['reports_per_s']:8,.0f} reports/s   core CPU "
              f"{median['cpu_us']:5.1f} µs/report (user {median['user_us']:.1f}, "
              f"system {median['sys_us']:.1f})")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per round")
    parser.add_argument("--inflight", type=int, default=128, help="reports waiting, both feeders")
    parser.add_argument("--runner", action="store_true", help="run an empty policy in 4 Lua states")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--feed", type=int, help=argparse.SUPPRESS)  # a feeder's channel fd
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    try:
        import uvloop
        run = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run
    if arguments.feed is not None:
        run(feed(arguments.feed, arguments.inflight, arguments.duration, json.loads(arguments.settings)))
    else:
        run(main(arguments))
