"""Policy cost per report: the starter policies and the sample config's policy, in-process.

    .venv/bin/python bench/lua_values_bench.py [--events 6000] [--rounds 5] [--against DIR]

Fills a SQLite log with `--events` enriched reports (GeoIP test City DB, User-Agent device ids,
sprays among benign logins), then runs, `--rounds` times in a fresh worker state each, (1) the
sample config's `report` (conf/trackalert.conf: `lt.remote:tostring()`, infoLog) and (2) all six
starter policies (conf/policies) over every event, as the policy runner calls them, and prints the
median microseconds per report. With `--against DIR` (another checkout, e.g. `git archive` of an
older commit) each round runs once with that code and once with this one, alternating, in
subprocesses, and both medians are printed. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITY = ROOT / "tests" / "data" / "geoip" / "GeoIP2-City-Test.mmdb"
POLICIES = ROOT / "conf" / "policies"
REMOTES = ["81.2.69.142", "81.2.69.160", "89.160.20.112", "2.125.160.216", "175.16.199.5",
           "67.43.156.10", "216.160.83.56", "214.0.1.5", "2001:218::1"]
UA = "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0"
SAMPLE_POLICY = """
function report(lt)
  infoLog("Received report", {login=lt.login, remote=lt.remote:tostring(),
                              success=tostring(lt.success), protocol=lt.protocol})
  if not lt.success then incCustomStat("failed_logins") end
end
"""
STARTER_POLICIES = f"""
dofile("{POLICIES}/alert.lua")
StarterAlert.webhook = ""
local list = {{}}
for _, name in ipairs({{"new_country", "new_device", "impossible_travel", "password_spray",
                       "account_attack", "pwhash_spray"}}) do
  list[#list + 1] = dofile("{POLICIES}/" .. name .. ".lua")
end
function report(lt) for _, p in ipairs(list) do p.report(lt) end end
"""


def bodies(count: int) -> list[dict]:
    rng = random.Random(1)
    out = []
    for i in range(count):
        spray = i % 10 == 0
        out.append({
            "login": f"spray{i}" if spray else f"user{rng.randrange(300)}",
            "remote": "67.43.156.10" if spray else rng.choice(REMOTES),
            "t": 1_760_000_000.0 + i * 5, "success": not spray and rng.random() < 0.9,
            "pwhash": f"{rng.randrange(50):04x}", "protocol": "http", "device_id": UA,
        })
    return out


async def fill(path: Path, count: int) -> None:
    from trackalert.clock import VirtualClock
    from trackalert.devices import DeviceParser
    from trackalert.enrich import Enricher
    from trackalert.eventlog.sqlite import SQLiteEventLog
    from trackalert.geoip import GeoIPRegistry
    from trackalert.report import report_from_dict

    geoip = GeoIPRegistry()
    geoip.open("City", str(CITY))
    enricher = Enricher(geoip, {"city": "City"}, DeviceParser())
    clock = VirtualClock(start=1_760_000_000.0)
    log = SQLiteEventLog(path, clock)
    await log.open()
    for body in bodies(count):
        await log.append(enricher.enrich(report_from_dict(body, clock.time())))
        await clock.advance(5.0)
    await log.close()


async def measure(path: Path, policy: str) -> float:
    """Microseconds per report of `policy` over every event of the log, in a fresh state."""
    from trackalert.clock import VirtualClock
    from trackalert.eventlog.sqlite import SQLiteEventLog
    from trackalert.lua.convert import call_with_tuple, tuple_runner
    from trackalert.lua.host import Host
    from trackalert.lua.state import LuaState, StateKind

    clock = VirtualClock(start=1_800_000_000.0)
    log = SQLiteEventLog(path, clock)
    await log.open()
    events = await log.read(0, 10_000_000)
    host = Host(clock=clock, eventlog=log)
    host.geoip.open("City", str(CITY))
    state = LuaState(StateKind.WORKER, host)
    state.execute(policy)
    (fn,) = state.execute("return report")
    runner = tuple_runner(state)
    errors = 0
    started = time.perf_counter()
    for event in events:
        state.as_of_seq = event.seq
        ok, _ = call_with_tuple(state, runner, fn, event)
        errors += not ok
    elapsed = time.perf_counter() - started
    await log.close()
    if errors:
        print(f"  ({errors} Lua errors)", file=sys.stderr)
    return elapsed / len(events) * 1e6


def one_round(path: Path) -> dict[str, float]:
    return {
        "sample": asyncio.run(measure(path, SAMPLE_POLICY)),
        "starter": asyncio.run(measure(path, STARTER_POLICIES)),
    }


def run_with(code_dir: Path, path: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(code_dir)}
    out = subprocess.run([sys.executable, __file__, "--one-round", str(path)], env=env,
                         check=True, capture_output=True, text=True, cwd=code_dir).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--against", type=Path, help="another checkout to compare with")
    parser.add_argument("--one-round", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger("trackalert").setLevel(logging.CRITICAL)  # time Lua, not log output
    if args.one_round:
        sys.path.insert(0, os.environ.get("PYTHONPATH", str(ROOT)))
        print(json.dumps(one_round(args.one_round)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.db"
        sys.path.insert(0, str(ROOT))
        asyncio.run(fill(path, args.events))
        codes = {"this": ROOT} if args.against is None else {"against": args.against, "this": ROOT}
        results: dict[str, list[dict[str, float]]] = {name: [] for name in codes}
        for _ in range(args.rounds):
            for name, code in codes.items():  # alternating, so drift hits both alike
                results[name].append(run_with(code, path))
        print(f"{args.events} events, {args.rounds} rounds, median us per report:")
        for name, rounds in results.items():
            figures = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
            print(f"  {name:8} ({codes[name]}): sample config {figures['sample']:.1f}, "
                  f"starter policies {figures['starter']:.1f}")


if __name__ == "__main__":
    main()
