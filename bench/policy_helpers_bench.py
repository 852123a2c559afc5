"""Every helper shape the starter policies call, timed from Lua on a big log, as of the report.

    .venv/bin/python bench/policy_helpers_bench.py [--events 1000000] [--logins 10000]
                                                   [--samples 2000] [--keep FILE]

Fills a log as bench/helpers_bench.py does (its `prefill`), opens it with the real backend, then
for `--samples` events near the end of the log calls each helper the way the starter policies do
for that event (its login, address, /24, pwhash, country), inside report(lt) (as of that event),
from a Lua worker state. Prints p50/p99/max per shape.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
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
from trackalert.eventlog.sqlite import SQLiteEventLog  # noqa: E402
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
     'return #recentReports({login=lt.login, success=true, window="7d"}, 5)'),
    ("countDistinct remote login+fail 1h", "account_attack",
     'return countDistinct("remote", {login=lt.login, success=false, window="1h"})'),
    ("countDistinct login remote+fail 1h", "password_spray",
     'return countDistinct("login", {remote=lt.remote, success=false, window="1h"})'),
    ("countDistinct login netmask+fail 1h", "password_spray",
     'return countDistinct("login", {netmask=lt.netmask, success=false, window="1h"})'),
    ("countDistinct login pwhash+fail 1d", "pwhash_spray",
     'return countDistinct("login", {pwhash=lt.pwhash, success=false, window="1d"})'),
]


def events_near_end(path: Path, events: int, samples: int) -> list[tuple]:
    """(seq, login, remote, /24, pwhash, country, browser) of random events in the last 10,000."""
    rng = random.Random(1)
    conn = sqlite3.connect(path)
    out = []
    for _ in range(samples):
        seq = events - rng.randrange(10_000)
        login, remote, pwhash, country, device = conn.execute(
            "SELECT login, remote, pwhash, country, json_extract(device_attrs, "
            "'$.\"browser.family\"') FROM events WHERE seq = ?", (seq,)).fetchone()
        network = remote.rsplit(".", 1)[0] + ".0/24"
        out.append((seq, login, remote, network, pwhash, country or "", device or ""))
    conn.close()
    return out


def time_shapes(path: Path, events: int, samples: int) -> None:
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
        shapes = state.lua.globals().shapes
        make_lt = state.lua.eval(
            "function(login, remote, netmask, pwhash, country, browser) return {login=login, "
            "remote=remote, netmask=netmask, pwhash=pwhash, country=country, "
            "device_attrs={['browser.family']=browser}} end")
        picks = events_near_end(path, events, samples)
        timings: list[list[float]] = [[] for _ in SHAPES]
        for seq, *fields in picks:
            lt = make_lt(*fields)
            state.as_of_seq = seq
            for i in range(len(SHAPES)):
                fn = shapes[i + 1]
                t0 = time.perf_counter()
                fn(lt)
                timings[i].append(time.perf_counter() - t0)
        state.as_of_seq = None
        print(f"\n  inside report(lt), {samples:,} events among the last 10,000, from Lua:")
        for (name, users, _), samples_ in zip(SHAPES, timings):
            print(f"    {name:42s} {percentiles(samples_)}   ({users})")
    finally:
        loop.run_until_complete(log.close())
        loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--logins", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--keep", metavar="FILE", help="reuse/keep the filled log at FILE")
    args = parser.parse_args()
    print(f"== starter-policy helper shapes on a log of {args.events:,} events, "
          f"{args.logins:,} logins")
    with tempfile.TemporaryDirectory(prefix="ta-policy-helpers-") as tmp:
        path = Path(args.keep) if args.keep else Path(tmp) / "events.db"
        if not path.exists():
            seconds = prefill(path, args.events, args.logins)
            print(f"  prefilled in {seconds:.0f} s ({path.stat().st_size / 2**30:.2f} GiB)")
        time_shapes(path, args.events, args.samples)


if __name__ == "__main__":
    main()
