"""Every helper shape the starter policies call, timed from Lua on a big log, as of the report.

    .venv/bin/python bench/policy_helpers_bench.py [--events 1000000] [--logins 10000]
                                                   [--samples 2000] [--keep FILE] [--buffer N]

Fills a log as bench/helpers_bench.py does (its `prefill`), opens it with the real backend, then
for `--samples` events near the end of the log calls each helper the way the starter policies do
for that event (its login, address, /24, pwhash, country), inside report(lt) (as of that event),
from a Lua worker state, on both paths:

* SQL: the plain query path (what answers outside the runner, and while a shape builds);
* projection: as the policy runner does it, the window projection (eventlog/windows.py) walks
  the last 10,000 events in order (begin/finish around each), its shapes registered by the
  first event and built from the log (the build time and the memory it took are printed).
  recentReports' rows (eventlog/recent.py) are loaded per login on its first call; at the first
  event every login of the log is asked once, as a daemon running for a while has them: the
  loads are timed, and the memory of the rows held printed (keys x rows).

Prints p50/p99/max per shape and path (on the projection path also the thread's CPU time per
call: a wall-time tail that the CPU time lacks is the machine's other load preempting us), the projection's per-event cost and its sizes; with
`--buffer N`, the RSS that N Events in memory cost (the policy runner's buffer).
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from helpers_bench import percentiles, prefill  # noqa: E402

from trackalert.clock import RealClock  # noqa: E402
from trackalert.durations import parse_span  # noqa: E402
from trackalert.eventlog.filters import AsOf, parse_filter  # noqa: E402
from trackalert.eventlog.sqlite import SQLiteEventLog  # noqa: E402
from trackalert.eventlog.windows import WindowProjection, set_running_projection  # noqa: E402
from trackalert.lua.host import Host  # noqa: E402
from trackalert.lua.state import LuaState, StateKind  # noqa: E402

#: (name, the policies calling it, Lua body of `shape(lt)` as the policy writes it)
SHAPES = [
    ("countReports login+success 180d", "new_country, new_device",
     'return countReports({login=lt.login, success=true, window="180d"})'),
    ("countReports login+success+country 180d", "new_country",
     'return countReports({login=lt.login, success=true, country=lt.country, window="180d"})'),
    ("countReports login+success+device 180d", "new_device",
     'return countReports({login=lt.login, success=true, ["device_attrs.browser.family"]='
     'lt.device_attrs["browser.family"], window="180d"})'),
    ("recentReports login+success 7d, 5", "impossible_travel",
     'return #recentReports({login=lt.login, success=true, window="7d"}, 5, '
     '{"t", "remote", "country", "city", "latitude", "longitude"})'),
    ("countNear login+success 30d, 200", "impossible_travel (habit)",
     'return countNear({login=lt.login, success=true, window="30d"}, 200, lt.latitude, '
     'lt.longitude, 500, 3)'),
    # the attacker's login: a place the account never used, as far east or west as 60 degrees of
    # longitude (past the cheap latitude check, every row measured: the worst case)
    ("countNear login+success 30d, 200, far", "impossible_travel (habit, not found)",
     'return countNear({login=lt.login, success=true, window="30d"}, 200, lt.latitude, '
     'lt.longitude > 0 and lt.longitude - 60 or lt.longitude + 60, 500, 3)'),
    ("countDistinct remote login+fail 1h", "account_attack",
     'return countDistinct("remote", {login=lt.login, success=false, window="1h"})'),
    ("countDistinct login remote+fail 1h", "password_spray",
     'return countDistinct("login", {remote=lt.remote, success=false, window="1h"})'),
    ("countDistinct login netmask+fail 1h", "password_spray",
     'return countDistinct("login", {netmask=lt.netmask, success=false, window="1h"})'),
    ("countDistinct login pwhash+fail 1d", "pwhash_spray",
     'return countDistinct("login", {pwhash=lt.pwhash, success=false, window="1d"})'),
]


#: The events the projection walks (and the samples are drawn from).
WALK = 10_000


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def events_near_end(path: Path, events: int, samples: int) -> list[tuple]:
    """(seq, login, remote, /24, pwhash, country, browser, latitude, longitude) of random
    events in the last 10,000 (a place the log lacks: 0, 0)."""
    rng = random.Random(1)
    conn = sqlite3.connect(path)
    out = []
    for _ in range(samples):
        seq = events - rng.randrange(10_000)
        login, remote, pwhash, country, device, latitude, longitude = conn.execute(
            "SELECT login, remote, pwhash, country, json_extract(device_attrs, "
            "'$.\"browser.family\"'), latitude, longitude FROM events WHERE seq = ?",
            (seq,)).fetchone()
        network = str(ipaddress.ip_network(f"{remote}/24", strict=False))  # newNetmaskFromCA(lt.remote, 24)
        out.append((seq, login, remote, network, pwhash, country or "", device or "",
                    latitude or 0.0, longitude or 0.0))
    conn.close()
    return out


def time_shapes(path: Path, events: int, samples: int, buffer: int) -> None:
    loop = asyncio.new_event_loop()
    log = SQLiteEventLog(path, RealClock())
    started = time.perf_counter()
    loop.run_until_complete(log.open())  # migrates a log kept (--keep) from an older checkout
    print(f"  opened in {time.perf_counter() - started:.1f} s")
    try:
        host = Host()
        host.eventlog = log
        state = LuaState(StateKind.WORKER, host)
        state.execute("shapes = {}\n" + "\n".join(
            f"shapes[{i + 1}] = function(lt) {body} end" for i, (_, _, body) in enumerate(SHAPES)))
        shapes = [state.lua.globals().shapes[i + 1] for i in range(len(SHAPES))]
        make_lt = state.lua.eval(
            "function(login, remote, netmask, pwhash, country, browser, latitude, longitude) "
            "return {login=login, remote=remote, netmask=netmask, pwhash=pwhash, country=country, "
            "device_attrs={['browser.family']=browser}, latitude=latitude, longitude=longitude} end")
        picks = events_near_end(path, events, samples)
        gc.collect()  # the collector tuned as the daemon tunes it (trackalert.gc_tuning)
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        sql = time_sql(state, shapes, make_lt, picks)
        projected, cpu = time_projection(loop, log, state, shapes, make_lt, picks, events, path)
        print(f"\n  inside report(lt), {samples:,} events among the last {WALK:,}, from Lua "
              f"(SQL path / projection path, wall; then the projection path's CPU time of the "
              f"thread, which a machine loaded by others does not stretch):")
        for (name, users, _), on_sql, on_projection, on_cpu in zip(SHAPES, sql, projected, cpu):
            print(f"    {name:42s} SQL        {percentiles(on_sql)}   ({users})")
            print(f"    {'':42s} projection {percentiles(on_projection)}")
            print(f"    {'':42s} proj. CPU  {percentiles(on_cpu)}")
        if buffer:
            measure_buffer(loop, log, buffer)
    finally:
        loop.run_until_complete(log.close())
        loop.close()


def time_sql(state: LuaState, shapes: list, make_lt, picks: list[tuple]) -> list[list[float]]:
    timings: list[list[float]] = [[] for _ in SHAPES]
    for seq, *fields in picks:
        lt = make_lt(*fields)
        state.as_of_seq = seq
        for fn, samples in zip(shapes, timings):
            t0 = time.perf_counter()
            fn(lt)
            samples.append(time.perf_counter() - t0)
    state.as_of_seq = None
    return timings


def load_recent_rows(path: Path, log: SQLiteEventLog, projection: WindowProjection,
                     event) -> None:
    """impossible_travel's recentReports for every login of the log, as of `event`: each a load
    (one query); then the memory those rows take."""
    conn = sqlite3.connect(path)
    logins = [row[0] for row in conn.execute(
        "SELECT DISTINCT login FROM events INDEXED BY ix_events_login")]
    conn.close()
    queries = projection.queries(log.queries())
    as_of = AsOf(before_seq=event.seq, now=event.received)
    for window, n in (("7d", 5),):  # the trip's previous successes
        gc.collect()
        before = rss_mib()
        loads = []
        for login in logins:
            flt = parse_filter({"login": login, "success": True, "window": window}.items())
            t0 = time.perf_counter()
            queries.recent_rows(flt, n, as_of)
            loads.append(time.perf_counter() - t0)
        grown = rss_mib() - before
        seconds = parse_span(window)
        (shape,) = [s for s in projection.describe()["recent"] if s["window"] == seconds]
        print(f"  recent rows {window}: {len(logins):,} logins loaded (each one query) "
              f"{percentiles(loads)}; {shape['key_tuples']:,} keys, {shape['rows']:,} rows held: "
              f"RSS +{grown:.0f} MiB ({grown * 2**20 / max(1, shape['rows']):.0f} bytes per row)")


def one_per_family(picks: list[tuple]) -> list[tuple]:
    """The fields of the first picked event with an IPv4 address and of the first with IPv6."""
    found: dict[bool, tuple] = {}
    for _, *fields in picks:
        found.setdefault(":" in fields[1], tuple(fields))
    return list(found.values())


def time_projection(loop: asyncio.AbstractEventLoop, log: SQLiteEventLog, state: LuaState,
                    shapes: list, make_lt, picks: list[tuple], events: int,
                    path: Path) -> tuple[list[list[float]], list[list[float]]]:
    """The runner's way: walk the last WALK events in order, helpers inside each report."""
    first = events - WALK
    walk = []
    while len(walk) < WALK:
        walk += loop.run_until_complete(log.read(first + len(walk), WALK - len(walk)))
    by_seq: dict[int, list[tuple]] = {}
    for seq, *fields in picks:
        by_seq.setdefault(seq, []).append(tuple(fields))
    projection = WindowProjection(log)
    projection.start_at(first)
    timings: list[list[float]] = [[] for _ in SHAPES]
    cpu_timings: list[list[float]] = [[] for _ in SHAPES]
    steps: list[float] = []
    rss_before = rss_mib()
    set_running_projection(projection)
    try:
        for i, event in enumerate(walk):
            t0 = time.perf_counter()
            projection.begin(event)
            steps.append(time.perf_counter() - t0)
            state.as_of_seq = event.seq
            if i == 0:  # the first report registers every shape; they build in the background
                for fields in one_per_family(picks):  # IPv4 and IPv6 /24s are shapes of their own
                    lt = make_lt(*fields)
                    for fn in shapes:
                        fn(lt)
                built = time.perf_counter()
                projection.wait_built(3600)
                print(f"  projection: shapes built from the log in {time.perf_counter() - built:.1f} s, "
                      f"RSS +{rss_mib() - rss_before:.0f} MiB")
                load_recent_rows(path, log, projection, event)
            for fields in by_seq.get(event.seq, ()):
                lt = make_lt(*fields)
                for fn, samples, cpu in zip(shapes, timings, cpu_timings):
                    c0, t0 = time.thread_time(), time.perf_counter()
                    fn(lt)
                    samples.append(time.perf_counter() - t0)
                    cpu.append(time.thread_time() - c0)
            state.as_of_seq = None
            t0 = time.perf_counter()
            projection.finish(event)
            steps[-1] += time.perf_counter() - t0
    finally:
        set_running_projection(None)
        projection.close()
    described = projection.describe()
    print(f"  projection: per event (begin + finish) {percentiles(steps)}; calls {described['calls']}")
    for shape in described["recent"]:
        print(f"    recent rows {'+'.join(shape['keys'])} success={shape['success']} "
              f"window={shape['window']:g}s: {shape['key_tuples']:,} keys, {shape['rows']:,} rows")
    for shape in described["shapes"]:
        print(f"    shape {'+'.join(shape['keys'])} success={shape['success']} "
              f"window={shape['window']:g}s field={shape['field']}: {shape['key_tuples']:,} keys, "
              f"{shape['distinct_pairs']:,} distinct pairs")
    return timings, cpu_timings


def measure_buffer(loop: asyncio.AbstractEventLoop, log: SQLiteEventLog, n: int) -> None:
    """What the policy runner's in-memory buffer costs per Event."""
    before = rss_mib()
    held = []
    while len(held) < n:
        held += loop.run_until_complete(log.read(len(held), min(10_000, n - len(held))))
    grown = rss_mib() - before
    print(f"\n  runner buffer: {len(held):,} Events in memory: RSS +{grown:.0f} MiB "
          f"({grown * 1024 * 1024 / max(1, len(held)):.0f} bytes per event)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--logins", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--keep", metavar="FILE", help="reuse/keep the filled log at FILE")
    parser.add_argument("--buffer", type=int, default=0, metavar="N",
                        help="also measure the RSS of N Events in memory")
    args = parser.parse_args()
    print(f"== starter-policy helper shapes on a log of {args.events:,} events, "
          f"{args.logins:,} logins")
    with tempfile.TemporaryDirectory(prefix="ta-policy-helpers-") as tmp:
        path = Path(args.keep) if args.keep else Path(tmp) / "events.db"
        if not path.exists():
            seconds = prefill(path, args.events, args.logins)
            print(f"  prefilled in {seconds:.0f} s ({path.stat().st_size / 2**30:.2f} GiB)")
        time_shapes(path, args.events, args.samples, args.buffer)


if __name__ == "__main__":
    main()
