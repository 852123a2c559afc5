"""What a long-term helper costs from Lua besides its SQL: reading the filter, the as-of point,
building the answer. Issue 9 wants every helper the starter policies use under 0.1 ms at p99.

    .venv/bin/python bench/helper_calls_bench.py [--calls 20000] [--rounds 5] [--against DIR]

Times, from a Lua loop inside report(lt) (run as the policy runner runs it, as of lt), each
helper call shape of the starter policies on a log of one event (the cheapest SQL there is, with
its windows computed as on any log), once with the same filter on every call and once with
another login on each call (nothing remembered); then recentReports returning 5 and 200 reports
of one login from a small log. Prints the median µs per call over `--rounds` rounds,
each in a fresh process. With `--against DIR` (another checkout, e.g. `git archive` of an older
commit) the rounds alternate between that code and this one. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOGINS = 5000  # more than the helpers remember: the "new login" shapes never hit a cache

#: (name, Lua statement run for call number `i`; `lt` is the report being judged)
SHAPES = [
    ("countReports login+success 180d", 'countReports({login=lt.login, success=true, window="180d"})'),
    ("  new login each call", 'countReports({login=logins[i % L + 1], success=true, window="180d"})'),
    ("countDistinct login remote+fail 1h",
     'countDistinct("login", {remote=lt.remote, success=false, window="1h"})'),
    ("  new address each call",
     'countDistinct("login", {remote=remotes[i % L + 1], success=false, window="1h"})'),
    ("countDistinct login netmask+fail 1h",
     'countDistinct("login", {netmask="192.0.2.0/24", success=false, window="1h"})'),
    ("topValues country login 180d, 5", 'topValues("country", {login=lt.login, window="180d"}, 5)'),
    ("firstSeen login+country+success",
     'firstSeen({login=lt.login, country=lt.country, success=true})'),
    ("recentReports login+success 7d, 5 (none)",
     'recentReports({login=lt.login, success=true, window="7d"}, 5)'),
]
ROWS_SHAPES = [
    ("recentReports 5 of 300", 'recentReports({login="frequent", success=true}, 5)'),
    ("recentReports 200 of 300", 'recentReports({login="frequent", success=true}, 200)'),
]

_LOOP = """
local L, N = %d, %d
logins, remotes = {}, {}
for k = 1, L do logins[k] = "user" .. k; remotes[k] = "10." .. (k %% 250) .. "." .. (k %% 7) .. ".1" end
return function(lt)
  local clock = os.clock
  local started = clock()
  for i = 1, N do %s end
  return (clock() - started) / N * 1e6
end
"""


async def _log(path: Path, reports: int) -> object:
    from trackalert.clock import VirtualClock
    from trackalert.eventlog.sqlite import SQLiteEventLog
    from trackalert.report import Enrichment, Report

    clock = VirtualClock(start=1_760_000_000.0)
    log = SQLiteEventLog(path, clock)
    await log.open()
    for i in range(reports):
        await log.append(Report(
            t=clock.time(), login="frequent", remote=f"192.0.2.{i % 200}", success=True,
            protocol="http", device_id="Mozilla/5.0", attrs={"site": "a"},
            device_attrs={"browser.family": "Firefox", "os.family": "Linux"},
            geo=Enrichment("DE", "Berlin", 52.5, 13.4, 3320, "DTAG"),
        ))
        await clock.advance(60.0)
    return log


def _time(log: object, shapes: list[tuple[str, str]], calls: int) -> dict[str, float]:
    """µs per call of each shape, run as the policy runner runs report(lt), as of lt."""
    from trackalert.eventlog.base import Event
    from trackalert.lua.convert import call_with_tuple, tuple_runner
    from trackalert.lua.host import Host
    from trackalert.lua.state import LuaState, StateKind
    from trackalert.report import Enrichment, Report

    state = LuaState(StateKind.WORKER, Host(eventlog=log))
    lt = Event(10**9, 1_760_000_000.0 + 400 * 60.0, Report(  # after every stored event
        t=1_760_000_000.0, login="user1", remote="192.0.2.1", success=True,
        geo=Enrichment("DE", "Berlin", 52.5, 13.4, 3320, "DTAG")))
    runner = tuple_runner(state)
    out = {}
    for name, call in shapes:
        for n in (min(calls, 1000), calls):  # warm up first: compile, caches, pages
            (loop,) = state.execute(_LOOP % (LOGINS, n, call))
            state.as_of_seq = lt.seq
            ok, out[name] = call_with_tuple(state, runner, loop, lt)
            state.as_of_seq = None
            if not ok:
                raise SystemExit(f"{name}: {out[name]}")
    return out


def one_round(calls: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        async def run() -> dict[str, float]:
            # one event, so that windows are computed as on any real log
            empty = await _log(Path(tmp) / "empty.db", 1)
            rows = await _log(Path(tmp) / "rows.db", 300)
            try:
                return {**_time(empty, SHAPES, calls), **_time(rows, ROWS_SHAPES, calls // 20)}
            finally:
                await empty.close()
                await rows.close()

        return asyncio.run(run())


def run_with(code_dir: Path, calls: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(code_dir)}
    out = subprocess.run([sys.executable, __file__, "--one-round", "--calls", str(calls)], env=env,
                         check=True, capture_output=True, text=True, cwd=code_dir).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--against", type=Path, help="another checkout to compare with")
    parser.add_argument("--one-round", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_round:
        sys.path.insert(0, os.environ.get("PYTHONPATH", str(ROOT)))
        print(json.dumps(one_round(args.calls)))
        return
    codes = {"this": ROOT} if args.against is None else {"against": args.against, "this": ROOT}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in codes}
    started = time.perf_counter()
    for _ in range(args.rounds):
        for name, code in codes.items():  # alternating, so drift hits both alike
            results[name].append(run_with(code, args.calls))
    print(f"{args.rounds} rounds in {time.perf_counter() - started:.0f} s, median µs per call "
          f"from Lua: " + ", ".join(f"{name} = {code}" for name, code in codes.items()))
    names = [name for name, _ in SHAPES + ROWS_SHAPES]
    print(f"  {'':42s}" + "".join(f"{name:>10s}" for name in codes) +
          ("     ratio" if len(codes) == 2 else ""))
    for name in names:
        medians = [statistics.median(r[name] for r in rounds) for rounds in results.values()]
        ratio = f"{medians[1] / medians[0]:10.2f}" if len(medians) == 2 else ""
        print(f"  {name:42s}" + "".join(f"{m:10.1f}" for m in medians) + ratio)


if __name__ == "__main__":
    main()
