"""History benchmark: events/s of `trackalert import` into an empty log, of the raw bulk append
under it, and of `trackalert export`.

    .venv/bin/python bench/import_bench.py [--events 1000000] [--runs 1]

Generates an export of `--events` wforce-shaped events (attrs, multi-valued attrs, device attrs,
IPv4 and IPv6, enrichment, a delivery id on every other one), then, in a fresh temporary log
each time:

* import: the file through `import_file` (parse, validate, encode, append), as the CLI does;
* bulk: the same events pre-encoded, through `SQLiteEventLog.append_history` only;
* export: the imported log back to NDJSON.

Prints figures; asserts nothing. On the shared 2-core box compare runs side by side (medians).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trackalert.clock import RealClock  # noqa: E402
from trackalert.eventlog.history import CHUNK, export_events, import_file, parse_line  # noqa: E402
from trackalert.eventlog.sqlite import SQLiteEventLog  # noqa: E402

T0 = 1_790_000_000.0


def export_lines(count: int) -> str:
    """`count` export lines, seqs 1..count, received one second apart in steps of 1 ms."""
    parts = []
    for i in range(count):
        remote = f"2001:db8::{i % 5000:x}" if i % 7 == 0 else f"192.0.{(i // 250) % 250}.{i % 250}"
        report = {
            "type": "wforce_report", "t": T0 + i / 1000, "remote": remote,
            "login": f"user{i % 20000}@example.com", "pwhash": f"{i % 4096:03x}",
            "success": i % 3 != 0, "policy_reject": False, "protocol": "imap", "tls": True,
            "device_id": "IMAP client", "session_id": "", "fail_type": "",
            "attrs": {"cos": "basic", "groups": ["g1", "g2"]},
            "device_attrs": {"imapc.family": "Thunderbird", "os.family": "Linux"},
        }
        enrichment = ({"country": "SE", "city": "Malmo", "latitude": 55.6, "longitude": 13.0,
                       "asn": 64500 + i % 10, "isp": "Example ISP"} if i % 5 else
                      {"country": None, "city": None, "latitude": None, "longitude": None,
                       "asn": None, "isp": None})
        parts.append(json.dumps({
            "seq": i + 1, "received": T0 + i / 1000 + 0.001,
            "delivery_id": f"d{i}" if i % 2 else None, "report": report,
            "enrichment": enrichment,
        }, separators=(",", ":")))
    return "\n".join(parts) + "\n"


async def run_import(path: Path, data: bytes) -> float:
    log = SQLiteEventLog(path, RealClock())
    await log.open()
    try:
        start = time.perf_counter()
        result = await import_file(log, io.BytesIO(data), "bench")
        elapsed = time.perf_counter() - start
    finally:
        await log.close()
    assert result.imported > 0
    return result.imported / elapsed


async def run_bulk(path: Path, items: list[tuple]) -> float:
    log = SQLiteEventLog(path, RealClock())
    await log.open()
    try:
        start = time.perf_counter()
        pending = []
        for first in range(0, len(items), CHUNK):
            pending.append(log.submit_history(items[first:first + CHUNK]))
            if len(pending) > 1:
                await pending.pop(0)
        for future in pending:
            await future
        elapsed = time.perf_counter() - start
    finally:
        await log.close()
    return len(items) / elapsed


def run_export(path: Path) -> float:
    with open(os.devnull, "w", encoding="utf-8") as out:
        start = time.perf_counter()
        count = export_events(str(path), out)
        return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    print(f"generating {args.events:,} events...", flush=True)
    data = export_lines(args.events).encode()
    items = [(p.row, p.seq, p.key, p.received)
             for p in (parse_line(text, n) for n, text in enumerate(data.splitlines(), 1))]
    figures: dict[str, list[float]] = {"import": [], "bulk": [], "export": []}
    with tempfile.TemporaryDirectory(prefix="ta-import-bench-") as tmp:
        for run in range(args.runs):
            for kind in ("import", "bulk"):
                path = Path(tmp) / f"{kind}-{run}.db"
                rate = asyncio.run(run_import(path, data) if kind == "import"
                                   else run_bulk(path, items))
                figures[kind].append(rate)
                print(f"run {run + 1} {kind}: {rate:,.0f} events/s", flush=True)
                if kind == "import":
                    figures["export"].append(run_export(path))
                    print(f"run {run + 1} export: {figures['export'][-1]:,.0f} events/s",
                          flush=True)
                for suffix in ("", "-wal", "-shm"):
                    Path(str(path) + suffix).unlink(missing_ok=True)
    for kind, rates in figures.items():
        print(f"{kind}: median {statistics.median(rates):,.0f} events/s over {len(rates)} run(s) "
              f"of {args.events:,} events")


if __name__ == "__main__":
    main()
