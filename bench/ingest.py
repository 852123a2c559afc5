"""Ingest benchmark: durable reports/s and latency over real HTTP, with a trivial policy.

    .venv/bin/python bench/ingest.py [--prefill 5000000] [--duration 15] [--connections 32 128]

Starts the real daemon (SQLite log, loopback listener) and drives it with `wrk` (Debian package
`wrk`; one wrk thread, so the daemon keeps most of the two cores), each request a wforce-shaped
report with a unique X-Wforce-Delivery. Runs against an empty log and, with --prefill, against a
log that already holds that many events. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

# Import trackalert as the daemon's `python -m trackalert` will (see workload.py).
sys.path.insert(1, os.getcwd())
sys.path.append(str(Path(__file__).resolve().parent.parent))

import harness  # noqa: E402
import reports  # noqa: E402
from trackalert.testing import DaemonProcess, listener_config  # noqa: E402

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


def scenario(name: str, prefill_count: int, args: argparse.Namespace, script: Path,
             rows: dict[str, Any]) -> str:
    """One log (empty or prefilled), measured with each number of web processes; the origin."""
    origin = ""
    with tempfile.TemporaryDirectory(prefix="ta-bench-") as tmp:
        directory = Path(tmp)
        db_path = directory / "trackalert-events.db"
        reports.prepare_log(db_path, prefill_count, args.prefill_cache)
        for web_processes in args.web_processes:
            print(f"\n== {name}, setNumWebProcesses({web_processes})", flush=True)
            origin = run_daemon(directory, db_path, web_processes, args, script,
                                rows, f"log={prefill_count} web={web_processes}")
    return origin


def run_daemon(directory: Path, db_path: Path, web_processes: int, args: argparse.Namespace,
               script: Path, rows: dict[str, Any], key: str) -> str:
    config = POLICY.replace("{web_processes}", str(web_processes))
    with DaemonProcess(directory, config, args=("-s",)) as process:
        origin = harness.trackalert_origin(process.process.pid)
        print(f"  daemon runs trackalert from {origin}")
        before = harness.stored(db_path)
        harness.run_wrk(process.url("/command/report"), 32, 3, script)  # warm-up
        for connections in args.connections:
            start_count = harness.stored(db_path)
            wrk = harness.run_wrk(process.url("/command/report"), connections, args.duration, script)
            added = harness.stored(db_path) - start_count
            print(
                f"  {connections:4d} connections: {wrk.ok_per_second:9,.0f} reports/s  "
                f"p50 {wrk.p50_ms:6.2f} ms  p99 {wrk.p99_ms:6.2f} ms  "
                f"non-2xx {wrk.non2xx}  stored {added:,}", flush=True
            )
            rows[f"{key} c={connections}"] = {
                "reports_per_s": wrk.ok_per_second, "p50_ms": wrk.p50_ms, "p99_ms": wrk.p99_ms,
                "non2xx": wrk.non2xx, "stored": added,
            }
        print(f"  log holds {harness.stored(db_path):,} events (started with {before:,})")
    return origin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill", type=int, default=5_000_000, help="events in the pre-filled log (0: skip)")
    parser.add_argument("--prefill-cache", type=Path, help="keep prefilled logs here and copy them")
    parser.add_argument("--duration", type=int, default=15, help="seconds per measurement")
    parser.add_argument("--connections", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--skip-empty", action="store_true", help="only the pre-filled scenario")
    parser.add_argument("--web-processes", type=int, nargs="+", default=[0, 2],
                        help="setNumWebProcesses values to measure")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON (compare.py)")
    args = parser.parse_args()
    harness.require_wrk()
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(WRK_SCRIPT)
        script = Path(handle.name)
    rows: dict[str, Any] = {}
    origin = ""
    try:
        if not args.skip_empty:
            origin = scenario("empty log", 0, args, script, rows)
        if args.prefill:
            origin = scenario(f"log with {args.prefill:,} events", args.prefill, args, script, rows)
    finally:
        script.unlink(missing_ok=True)
    harness.write_json(args.json, {"bench": "ingest", "origin": origin, "rows": rows})


if __name__ == "__main__":
    main()
