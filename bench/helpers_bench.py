"""Long-term helper benchmark: per-login helper latency on a big log, and the cost of enrichment.

    .venv/bin/python bench/helpers_bench.py [--events 10000000] [--logins 100000] [--samples 2000]
                                            [--ingest-duration 10] [--skip-ingest]

1. Fills a SQLite event log with `--events` events across `--logins` logins over 200 days (bulk
   insert, then the real indexes of migration 0004 built once), opens it with the real backend and
   times `countReports`, `countDistinct("country", ...)` and `firstSeen` for one login over 180
   days — through the query engine and through Lua, as a policy calls them — both as a
   background function (as of now) and inside report(lt) (as of a recent event). Prints
   p50/p99/max per helper.
2. Starts the real daemon twice and drives it with `wrk` (bench/ingest.py's runner): once with
   reports that carry device_attrs and no GeoIP (nothing to enrich), once with GeoIP City + ASN
   enrichment and device attributes derived from the User-Agent in device_id. Prints reports/s
   of each and the ratio.
3. With --index-cost: durable appends/s into the big log with the helper indexes and without.

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from trackalert.clock import RealClock  # noqa: E402
from trackalert.eventlog.filters import AsOf, parse_field, parse_filter  # noqa: E402
from trackalert.eventlog.schema import EVENT_COLUMNS  # noqa: E402
from trackalert.eventlog.sqlite import SQLiteEventLog  # noqa: E402
from trackalert.lua.host import Host  # noqa: E402
from trackalert.lua.state import LuaState, StateKind  # noqa: E402

DAY = 86400.0
SPAN_DAYS = 200
COUNTRIES = ["DE", "FR", "GB", "US", "NL", "SE", "ES", "IT", "PL", "RU"]
#: A place in each of COUNTRIES (a capital's latitude and longitude): the prefill locates each
#: report there, so that the place helpers (impossible_travel's) read real values.
PLACES = [(52.5, 13.4), (48.9, 2.35), (51.5, -0.13), (38.9, -77.0), (52.4, 4.9), (59.3, 18.1),
          (40.4, -3.7), (41.9, 12.5), (52.2, 21.0), (55.8, 37.6)]
#: The helper indexes the prefill drops and builds again afterwards (their CREATE statements
#: are read from the migrated file: the migrations are the one definition).
INDEXES = ("ix_events_login", "ix_events_ip", "ix_events_pwhash_failed")
GEOIP = ROOT / "tests" / "data" / "geoip"


# ----------------------------------------------------------------------------- part 1


def login_name(i: int) -> str:
    return f"user{i}@example.com"


def created_indexes(conn: sqlite3.Connection) -> dict[str, str]:
    """The CREATE statement of each of INDEXES, as the migrations made it."""
    found = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'"))
    return {name: found[name] for name in INDEXES}


def prefill(path: Path, events: int, logins: int) -> float:
    """Migrate with the real schema, then bulk-load with the helper indexes built afterwards
    (sorting once is far faster than 10M random index inserts; the end state is identical)."""
    async def migrate() -> None:
        log = SQLiteEventLog(path, RealClock())
        await log.open()
        await log.close()

    asyncio.run(migrate())
    started = time.perf_counter()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-1048576")
    index_sql = created_indexes(conn)
    for name in INDEXES:
        conn.execute(f"DROP INDEX {name}")
    end = time.time()
    base = end - SPAN_DAYS * DAY
    step = SPAN_DAYS * DAY / events
    device = '{"browser.family":"Firefox","os.family":"Linux"}'
    extra = '{"type":"wforce_report"}'
    columns = ", ".join(EVENT_COLUMNS)
    insert = f"INSERT INTO events ({columns}) VALUES ({', '.join('?' * len(EVENT_COLUMNS))})"

    def rows(first: int, last: int):
        for seq in range(first, last):
            who = (seq * 2654435761) % logins  # spread each login over the whole span
            home = seq % 10 != 0
            a, b = (who >> 8) & 255, who & 255
            c = (seq & 3) + 1 if home else (seq * 7919) % 250 + 1
            remote = f"10.{a}.{b}.{c}" if home else f"172.{(seq >> 8) & 15 | 16}.{seq & 255}.{c}"
            ip = b"\x04" + (bytes((10, a, b, c)) if home else bytes((172, (seq >> 8) & 15 | 16, seq & 255, c)))
            success = seq % 5 != 0
            place = who % 10 if home else seq % 10
            latitude, longitude = PLACES[place]
            received = base + seq * step
            yield (seq, received, received, login_name(who), remote, f"{seq % 4093:04x}", success,
                   False, "imap", True, "", "", "" if success else "credentials", None, None,
                   device, extra, None, COUNTRIES[place], "", latitude, longitude,
                   64500 + who % 50, "", ip)

    chunk = 500_000
    for first in range(1, events + 1, chunk):
        conn.execute("BEGIN")
        conn.executemany(insert, rows(first, min(first + chunk, events + 1)))
        conn.execute("COMMIT")
        done = min(first + chunk, events + 1) - 1
        print(f"\r  inserted {done:,} events ({time.perf_counter() - started:.0f} s)", end="", flush=True)
    print()
    for name, sql in index_sql.items():
        t0 = time.perf_counter()
        conn.execute(sql)
        print(f"  built {name} in {time.perf_counter() - t0:.0f} s")
    conn.execute("INSERT OR REPLACE INTO cursors (name, seq) VALUES ('report', ?)", (events,))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - started


def percentiles(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"p50 {statistics.median(ms):6.3f} ms  p99 {p99:6.3f} ms  max {ms[-1]:6.3f} ms"


def time_helpers(path: Path, events: int, logins: int, samples: int) -> None:
    rng = random.Random(1)

    async def opened() -> SQLiteEventLog:
        log = SQLiteEventLog(path, RealClock())
        await log.open()
        return log

    loop = asyncio.new_event_loop()
    log = loop.run_until_complete(opened())
    try:
        queries = log.queries()
        host = Host()
        host.eventlog = log
        state = LuaState(StateKind.WORKER, host)
        state.execute("""
            function bench_count(login) return countReports({login=login, window="180d"}) end
            function bench_distinct(login)
              return countDistinct("country", {login=login, success=true, window="180d"})
            end
            function bench_first(login) return firstSeen({login=login, window="180d"}) end
        """)
        g = state.lua.globals()
        country = parse_field("country")
        for mode in ("background (as of now)", "report(lt) (as of a recent event)"):
            print(f"\n  {mode}, {samples:,} random logins, 180-day window:")
            engine: dict[str, list[float]] = {"countReports": [], "countDistinct": [], "firstSeen": []}
            lua: dict[str, list[float]] = {"countReports": [], "countDistinct": [], "firstSeen": []}
            for _ in range(samples):
                login = login_name(rng.randrange(logins))
                before = events - rng.randrange(1000) if mode.startswith("report") else None
                as_of = AsOf(before_seq=before) if before else AsOf(now=time.time())
                base = parse_filter([("login", login), ("window", "180d")])
                succ = parse_filter([("login", login), ("success", True), ("window", "180d")])
                for name, call in (
                    ("countReports", lambda: queries.count_reports(base, as_of)),
                    ("countDistinct", lambda: queries.count_distinct(country, succ, as_of)),
                    ("firstSeen", lambda: queries.first_seen(base, as_of)),
                ):
                    t0 = time.perf_counter()
                    call()
                    engine[name].append(time.perf_counter() - t0)
                state.as_of_seq = before
                for name, fn in (("countReports", g.bench_count), ("countDistinct", g.bench_distinct),
                                 ("firstSeen", g.bench_first)):
                    t0 = time.perf_counter()
                    fn(login)
                    lua[name].append(time.perf_counter() - t0)
                state.as_of_seq = None
            for name in engine:
                print(f"    {name:14s} engine: {percentiles(engine[name])}   "
                      f"from Lua: {percentiles(lua[name])}")
        # one whole-system question, for reference: top failing remotes of the last hour
        t0 = time.perf_counter()
        top = queries.top_values(parse_field("remote"), parse_filter([("success", False), ("window", "1h")]),
                                 10, AsOf(now=time.time()))
        print(f"\n  topValues(remote, failures in the last hour): {len(top)} values in "
              f"{(time.perf_counter() - t0) * 1000:.1f} ms")
    finally:
        loop.run_until_complete(log.close())
        loop.close()


def append_rate(path: Path, seconds: float, concurrency: int, logins: int) -> float:
    """Durable appends/s into the log at `path` (real backend, group commit), random logins and
    addresses as in production: every index insert lands on a random page."""
    from trackalert.report import Report

    rng = random.Random(3)
    reports = [Report(t=time.time(), login=login_name(rng.randrange(logins)),
                      remote=f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
                      pwhash=f"{rng.randrange(65536):04x}", success=rng.random() < 0.8,
                      protocol="imap") for _ in range(50_000)]

    async def run() -> float:
        log = SQLiteEventLog(path, RealClock())
        await log.open()
        count = 0
        deadline = time.perf_counter() + seconds

        async def appender(offset: int) -> None:
            nonlocal count
            i = offset
            while time.perf_counter() < deadline:
                await log.append(reports[i % len(reports)])
                count += 1
                i += concurrency

        started = time.perf_counter()
        await asyncio.gather(*(appender(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - started
        await log.close()
        return count / elapsed

    return asyncio.run(run())


def index_cost(path: Path, logins: int, seconds: float) -> None:
    """Append rate into the big log with the helper indexes, and with them dropped."""
    with_indexes = append_rate(path, seconds, 128, logins)
    conn = sqlite3.connect(path, isolation_level=None)
    index_sql = created_indexes(conn)
    for name in INDEXES:
        conn.execute(f"DROP INDEX {name}")
    conn.close()
    try:
        without = append_rate(path, seconds, 128, logins)
    finally:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA cache_size=-1048576")
        for sql in index_sql.values():
            conn.execute(sql)
        conn.close()
    print(f"  128 appenders, {seconds:.0f} s each: with the 3 helper indexes {with_indexes:,.0f} "
          f"appends/s, without {without:,.0f} appends/s ({with_indexes / without:.0%})")


# ----------------------------------------------------------------------------- part 2

CONFIG = """
addListener("127.0.0.1:0", false, "", "", {{}})
setWebserverPassword("{password}")
setNumLuaStates(2)
{enrichment}
setReport(function(lt) local l = lt.login end)
"""

ENRICHMENT = f"""
newGeoIP2DB("City", "{GEOIP / 'GeoIP2-City-Test.mmdb'}")
newGeoIP2DB("ASN", "{GEOIP / 'GeoLite2-ASN-Test.mmdb'}")
setEnrichment({{city="City", asn="ASN"}})
"""

# Addresses spread over the test DBs' networks (and outside them); 1,000 distinct.
WRK_SCRIPT = """
local counter = 0
local id = 0
local nets = {"81.2.69.", "89.160.20.", "175.16.199.", "2.2.3.", "1.128.0.", "67.43.156.", "216.160.83.", "198.51.100."}
local uas = {
  "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
  "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:121.0) Gecko/20100101 Firefox/121.0",
  "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
  "Mozilla/5.0 (Linux; Android 13; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/119.0.6045.163 Mobile Safari/537.36"}
function setup(thread) id = id + 1; thread:set("id", id) end
function init(args) counter = 0 end
request = function()
  counter = counter + 1
  local ua = uas[(counter % #uas) + 1]
  local device = DEVICE_ATTRS
    and ', "device_attrs": {"browser.family": "Chrome", "os.family": "Mac OS X", "device.family": "Mac"}'
    or ''
  local body = '{"login": "user' .. (counter % 100000) .. '@example.com", "remote": "'
    .. nets[(counter % #nets) + 1] .. (counter % 125) .. '", "success": '
    .. ((counter % 3 == 0) and 'false' or 'true')
    .. ', "pwhash": "0a1b2c", "protocol": "https", "t": 1795255564.061337, "tls": true, '
    .. '"attrs": {"cos": "basic"}, "device_id": "' .. ua .. '"' .. device .. ', "type": "wforce_report"}'
  wrk.headers["X-Wforce-Delivery"] = "bench-" .. tostring(id) .. "-" .. tostring(counter) .. "-" .. tostring(os.time())
  return wrk.format("POST", "/command/report", nil, body)
end
"""


def measure_ingest(duration: int, connections: int, rounds: int) -> None:
    from ingest import run_wrk  # bench/ingest.py

    from trackalert.testing import DEFAULT_PASSWORD, DaemonProcess

    results: dict[str, list[float]] = {"off": [], "on": []}
    for round_ in range(rounds):
        for mode in ("off", "on"):
            with tempfile.TemporaryDirectory(prefix="ta-helpers-bench-") as tmp:
                script = Path(tmp) / "wrk.lua"
                script.write_text(WRK_SCRIPT.replace(
                    "DEVICE_ATTRS", "true" if mode == "off" else "false"))
                config = CONFIG.format(password=DEFAULT_PASSWORD,
                                       enrichment=ENRICHMENT if mode == "on" else "")
                with DaemonProcess(Path(tmp), config, args=("-s",)) as process:
                    url = process.url("/command/report")
                    run_wrk(url, 32, 2, script)  # warm-up (and fills the caches)
                    figures = run_wrk(url, connections, duration, script)
                    with sqlite3.connect(Path(tmp) / "trackalert-events.db") as db:
                        enriched = db.execute(
                            "SELECT count(*) FROM events WHERE country IS NOT NULL").fetchone()[0]
                results[mode].append(figures["rps"])
                print(f"  round {round_ + 1}, enrichment {mode:3s}: {figures['rps']:8,.0f} reports/s  "
                      f"p99 {figures['p99']:6.2f} ms  non-2xx {figures['non2xx']:.0f}  "
                      f"events with a country: {enriched:,}")
    off, on = statistics.median(results["off"]), statistics.median(results["on"])
    print(f"\n  median: without enrichment {off:,.0f} reports/s, with {on:,.0f} reports/s "
          f"-> {on / off:.0%} of the rate without")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--logins", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--keep", metavar="FILE", help="reuse/keep the filled log at FILE")
    parser.add_argument("--skip-helpers", action="store_true")
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument("--index-cost", action="store_true",
                        help="also measure appends into the big log with and without the indexes")
    parser.add_argument("--ingest-duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not args.skip_helpers:
        print(f"== helpers on a log of {args.events:,} events, {args.logins:,} logins")
        tmp = None
        if args.keep:
            path = Path(args.keep)
        else:
            tmp = tempfile.mkdtemp(prefix="ta-helpers-bench-")
            path = Path(tmp) / "events.db"
        try:
            if not path.exists():
                seconds = prefill(path, args.events, args.logins)
                print(f"  prefilled in {seconds:.0f} s ({path.stat().st_size / 2**30:.2f} GiB)")
            time_helpers(path, args.events, args.logins, args.samples)
            if args.index_cost:
                print("\n== cost of the helper indexes on appends (log of "
                      f"{args.events:,} events)")
                index_cost(path, args.logins, 10.0)
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
    if not args.skip_ingest:
        if not shutil.which("wrk"):
            sys.exit("the ingest part needs wrk (apt-get install wrk)")
        print("\n== ingestion over HTTP with and without enrichment")
        measure_ingest(args.ingest_duration, args.connections, args.rounds)


if __name__ == "__main__":
    main()
