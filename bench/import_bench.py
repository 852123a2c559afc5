"""History benchmark: events/s of `trackalert import` into an empty log, of the raw bulk append
under it, and of `trackalert export`.

    .venv/bin/python bench/import_bench.py [--events 1000000] [--runs 1]

Generates an export of `--events` wforce-shaped events (attrs, multi-valued attrs, device attrs,
IPv4 and IPv6, enrichment, a delivery id on every other one), then, in a fresh temporary log
each time:

* import: the file through `import_file` (parse, validate, encode, append), as the CLI does;
* bulk: the same events pre-encoded, through `SQLiteEventLog.append_history` only;
* export: the imported log back to NDJSON;
* per-event (with `--baseline N`, on the first N events): what writing history took before the
  bulk path, the ordinary append with the clock set to each event's received, so one commit per
  event (the writer stamps `clock.time()` once per batch).

Prints figures; asserts nothing. On the shared 2-core box compare runs side by side (medians,
ratios), and CPU time per event (`cpu µs/event`, all threads) next to the wall-clock rate.
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

from trackalert.clock import RealClock, VirtualClock  # noqa: E402
from trackalert.eventlog.history import CHUNK, export_events, import_file, parse_line  # noqa: E402
from trackalert.eventlog.rows import report_from_row  # noqa: E402
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


class Timer:
    """Wall-clock and CPU time (every thread of the process) of a block."""

    def __enter__(self) -> "Timer":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def figures(self, count: int) -> tuple[float, float]:
        """(events/s, CPU µs per event)."""
        return count / self.wall, self.cpu / count * 1e6


async def run_import(path: Path, data: bytes) -> tuple[float, float]:
    log = SQLiteEventLog(path, RealClock())
    await log.open()
    try:
        with Timer() as timer:
            result = await import_file(log, io.BytesIO(data), "bench")
    finally:
        await log.close()
    assert result.imported > 0
    return timer.figures(result.imported)


async def run_bulk(path: Path, items: list[tuple]) -> tuple[float, float]:
    log = SQLiteEventLog(path, RealClock())
    await log.open()
    try:
        with Timer() as timer:
            pending = []
            for first in range(0, len(items), CHUNK):
                pending.append(log.submit_history(items[first:first + CHUNK]))
                if len(pending) > 1:
                    await pending.pop(0)
            for future in pending:
                await future
    finally:
        await log.close()
    return timer.figures(len(items))


async def run_per_event(path: Path, items: list[tuple]) -> tuple[float, float]:
    clock = VirtualClock(items[0][3])
    log = SQLiteEventLog(path, clock)
    await log.open()
    try:
        with Timer() as timer:
            for row, _, _, received in items:
                await clock.advance(received - clock.time())
                attrs, attrs_mv, device_attrs, extra = (json.loads(text) if text else {}
                                                        for text in row[11:15])
                report = report_from_row(row, attrs, attrs_mv, device_attrs, extra)
                await log.append(report)
    finally:
        await log.close()
    return timer.figures(len(items))


def run_export(path: Path) -> tuple[float, float]:
    with open(os.devnull, "w", encoding="utf-8") as out, Timer() as timer:
        count = export_events(str(path), out)
    return timer.figures(count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--baseline", type=int, default=0, metavar="N",
                        help="also append the first N events one commit each (the old way)")
    args = parser.parse_args()
    print(f"generating {args.events:,} events...", flush=True)
    data = export_lines(args.events).encode()
    items = [(p.row, p.seq, p.key, p.received)
             for p in (parse_line(text, n) for n, text in enumerate(data.splitlines(), 1))]
    kinds = ["import", "bulk"] + (["per-event"] if args.baseline else [])
    figures: dict[str, list[tuple[float, float]]] = {kind: [] for kind in kinds + ["export"]}
    with tempfile.TemporaryDirectory(prefix="ta-import-bench-") as tmp:
        for run in range(args.runs):
            for kind in kinds:  # alternating, in fresh logs
                path = Path(tmp) / f"{kind}-{run}.db"
                if kind == "import":
                    measured = asyncio.run(run_import(path, data))
                elif kind == "bulk":
                    measured = asyncio.run(run_bulk(path, items))
                else:
                    measured = asyncio.run(run_per_event(path, items[:args.baseline]))
                report(f"run {run + 1} {kind}", measured, figures[kind])
                if kind == "import":
                    report(f"run {run + 1} export", run_export(path), figures["export"])
                for suffix in ("", "-wal", "-shm"):
                    Path(str(path) + suffix).unlink(missing_ok=True)
    for kind, measured in figures.items():
        count = args.baseline if kind == "per-event" else args.events
        print(f"{kind}: median {statistics.median(m[0] for m in measured):,.0f} events/s, "
              f"{statistics.median(m[1] for m in measured):.1f} cpu µs/event over "
              f"{len(measured)} run(s) of {count:,} events")
    if args.baseline:
        ratio = (statistics.median(m[0] for m in figures["bulk"])
                 / statistics.median(m[0] for m in figures["per-event"]))
        print(f"bulk / per-event: {ratio:.1f}x")


def report(label: str, measured: tuple[float, float], into: list[tuple[float, float]]) -> None:
    into.append(measured)
    print(f"{label}: {measured[0]:,.0f} events/s, {measured[1]:.1f} cpu µs/event", flush=True)


if __name__ == "__main__":
    main()
