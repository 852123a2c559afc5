"""Ingest benchmark: durable reports/s and latency over real HTTP, with a trivial policy.

    .venv/bin/python bench/ingest.py [--prefill 5000000] [--duration 15] [--connections 32 128]

Starts the real daemon (SQLite log, loopback listener) and drives it with `wrk` (Debian package
`wrk`; one wrk thread, so the daemon keeps most of the two cores), each request a wforce-shaped
report with a unique X-Wforce-Delivery. Runs against an empty log and, with --prefill, against a
log that already holds that many events. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trackalert.testing import DaemonProcess, basic_auth, listener_config  # noqa: E402

POLICY = listener_config() + """
setNumLuaStates(2)
setNumWebProcesses({web_processes})
setReport(function(lt) local l = lt.login end)
"""

WRK_SCRIPT = """
local counter = 0
local id = 0
function setup(thread) id = id + 1; thread:set("id", id) end
function init(args) counter = 0 end
request = function()
  counter = counter + 1
  local body = '{"login": "user' .. (counter % 100000) .. '@example.com", "remote": "192.0.2.'
    .. (counter % 250) .. '", "success": ' .. ((counter % 3 == 0) and 'false' or 'true')
    .. ', "pwhash": "0a1b2c", "protocol": "imap", "t": 1795255564.061337, "tls": true, '
    .. '"attrs": {"cos": "basic"}, "device_id": "", "type": "wforce_report"}'
  wrk.headers["X-Wforce-Delivery"] = "bench-" .. tostring(id) .. "-" .. tostring(counter) .. "-" .. tostring(os.time())
  return wrk.format("POST", "/command/report", nil, body)
end
"""


def prefill(db_path: Path, count: int) -> None:
    """Fill the log directly (not over HTTP): migrate with the real schema, then bulk insert."""
    import asyncio

    from trackalert.clock import RealClock
    from trackalert.eventlog import open_event_log
    from trackalert.eventlog.schema import EVENT_COLUMNS

    async def migrate() -> None:
        log = open_event_log(f"sqlite:///{db_path}", RealClock())
        await log.open()
        await log.close()

    asyncio.run(migrate())
    started = time.monotonic()
    db = sqlite3.connect(db_path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    now = time.time()
    placeholders = ", ".join("?" for _ in EVENT_COLUMNS)
    insert = f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) VALUES ({placeholders})"
    batch = 100_000
    for start in range(1, count + 1, batch):
        rows = []
        for seq in range(start, min(start + batch, count + 1)):
            values = {
                "seq": seq, "received": now - (count - seq) * 0.5, "t": now - (count - seq) * 0.5,
                "login": f"old{seq % 100_000}@example.com", "remote": f"198.51.100.{seq % 250}",
                "pwhash": "ffee", "success": seq % 3 != 0, "policy_reject": False, "protocol": "imap",
                "tls": True, "device_id": "", "session_id": "", "fail_type": "", "attrs": '{"cos":"basic"}',
                "attrs_mv": None, "device_attrs": None, "extra": '{"type":"wforce_report"}',
                "delivery_id": f"old-{seq}",
            }
            rows.append(tuple(values.get(c) for c in EVENT_COLUMNS))  # later columns: NULL
        db.executemany(insert, rows)
        db.commit()
    # As a long-running daemon would have it: the policy has run over everything, and the
    # dedupe table holds the delivery ids of the last day (the retention window).
    db.execute("INSERT INTO cursors (name, seq) VALUES ('report', ?)", (count,))
    day = range(max(1, count - 172_800 + 1), count + 1)
    db.executemany(
        "INSERT INTO deliveries (delivery_id, fingerprint, seq, received) VALUES (?, X'', ?, ?)",
        ((f"old-{seq}", seq, now - (count - seq) * 0.5) for seq in day),
    )
    db.commit()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    print(f"  prefilled {count:,} events in {time.monotonic() - started:.0f} s "
          f"({db_path.stat().st_size / 2**20:.0f} MiB)")


def run_wrk(url: str, connections: int, duration: int, script: Path) -> dict[str, float]:
    auth = basic_auth()["Authorization"]
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script),
         "-H", f"Authorization: {auth}", "-H", "Content-Type: application/json", url],
        capture_output=True, text=True, check=True,
    ).stdout
    figures = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    for pct in ("50", "99"):
        value, unit = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out).groups()
        figures[f"p{pct}"] = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    figures["non2xx"] = float(errors.group(1)) if errors else 0.0
    return figures


def stored(db_path: Path) -> int:
    with sqlite3.connect(db_path) as db:
        return db.execute("SELECT count(*) FROM events").fetchone()[0]


def scenario(name: str, prefill_count: int, args: argparse.Namespace, script: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="ta-bench-") as tmp:
        directory = Path(tmp)
        db_path = directory / "trackalert-events.db"
        if prefill_count:
            prefill(db_path, prefill_count)
        for web_processes in args.web_processes:
            print(f"\n== {name}, setNumWebProcesses({web_processes})")
            run_daemon(directory, db_path, web_processes, args, script)


def run_daemon(directory: Path, db_path: Path, web_processes: int, args: argparse.Namespace,
               script: Path) -> None:
    config = POLICY.replace("{web_processes}", str(web_processes))
    with DaemonProcess(directory, config, args=("-s",)) as process:
        before = stored(db_path)
        run_wrk(process.url("/command/report"), 32, 3, script)  # warm-up
        for connections in args.connections:
            start_count = stored(db_path)
            figures = run_wrk(process.url("/command/report"), connections, args.duration, script)
            added = stored(db_path) - start_count
            print(
                f"  {connections:4d} connections: {figures['rps']:9,.0f} reports/s  "
                f"p50 {figures['p50']:6.2f} ms  p99 {figures['p99']:6.2f} ms  "
                f"non-2xx {figures['non2xx']:.0f}  stored {added:,}"
            )
        print(f"  log holds {stored(db_path):,} events (started with {before:,})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill", type=int, default=5_000_000, help="events in the pre-filled log (0: skip)")
    parser.add_argument("--duration", type=int, default=15, help="seconds per measurement")
    parser.add_argument("--connections", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--skip-empty", action="store_true", help="only the pre-filled scenario")
    parser.add_argument("--web-processes", type=int, nargs="+", default=[0, 2],
                        help="setNumWebProcesses values to measure")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("bench/ingest.py needs wrk (apt-get install wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(WRK_SCRIPT)
        script = Path(handle.name)
    if not args.skip_empty:
        scenario("empty log", 0, args, script)
    if args.prefill:
        scenario(f"log with {args.prefill:,} events", args.prefill, args, script)


if __name__ == "__main__":
    main()
