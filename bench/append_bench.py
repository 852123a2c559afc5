"""Durable append throughput and latency of the SQLite event log.

    .venv/bin/python bench/append_bench.py [--prefill 5000000] [--duration 10]

For an empty log and (with --prefill N) a log already holding N events, runs 32 and 128
concurrent appenders, each appending in a loop (every append with its own delivery id, as wforce
sends one per webhook delivery), and prints rows/s, p50/p99/max append latency, the group
commit batch sizes and the CPU time the whole process (appenders, event loop, writer thread,
SQLite) spent per stored row: on a shared machine, the figure that moves least with the load. The prefill goes straight to SQLite with executemany in big transactions (it
is set-up, not what is measured). For the prefilled log it also times the start-up integrity
check (`PRAGMA quick_check`, run by every open) cold and warm. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trackalert.clock import RealClock  # noqa: E402
from trackalert.eventlog.sqlite import SQLiteEventLog, encode_row  # noqa: E402
from trackalert.eventlog.schema import EVENT_COLUMNS  # noqa: E402
from trackalert.report import Report, fingerprint  # noqa: E402

PREFILL_TRANSACTION = 200_000


def sample_reports(n: int = 1024) -> list[Report]:
    """Realistic-sized reports: a few attrs, device attributes, the wforce type marker."""
    return [
        Report(
            t=1_700_000_000.0 + i,
            remote=f"198.51.{i % 256}.{(i * 7) % 256}",
            login=f"user{i}@example.org",
            pwhash=f"{i * 2654435761 % 2**32:08x}",
            success=i % 3 != 0,
            protocol="imaps",
            tls=True,
            device_id="Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
            session_id=uuid.UUID(int=i).hex,
            attrs={"client": "webmail", "site": f"s{i % 5}"},
            device_attrs={"os.family": "Linux", "browser.family": "Firefox"},
            extra={"type": "wforce_report"},
        )
        for i in range(n)
    ]


async def create_schema(path: Path) -> None:
    log = SQLiteEventLog(path, RealClock())
    await log.open()
    await log.close()


def prefill(path: Path, events: int, deliveries: int) -> float:
    """Bulk-load `events` events (the newest `deliveries` of them with delivery ids)."""
    started = time.perf_counter()
    reports = sample_reports()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-262144")
    insert_event = f"INSERT INTO events VALUES ({','.join('?' * len(EVENT_COLUMNS))})"
    base = time.time() - 86_400.0
    step = 86_400.0 / max(events, 1)
    first_with_id = events - deliveries
    ids: list[tuple[str, bytes, int, float]] = []
    seq = 0
    while seq < events:
        rows = []
        for seq in range(seq + 1, min(events, seq + PREFILL_TRANSACTION) + 1):
            received = base + seq * step
            delivery_id = uuid.uuid4().hex if seq > first_with_id else None
            if delivery_id:
                ids.append((delivery_id, fingerprint(delivery_id.encode()), seq, received))
            rows.append((seq, received) + encode_row(reports[seq % len(reports)], delivery_id))
        conn.execute("BEGIN")
        conn.executemany(insert_event, rows)
        conn.execute("COMMIT")
    ids.sort()  # key order: builds the WITHOUT ROWID b-tree sequentially
    for start in range(0, len(ids), PREFILL_TRANSACTION):
        conn.execute("BEGIN")
        chunk = ids[start:start + PREFILL_TRANSACTION]
        conn.executemany("INSERT INTO deliveries VALUES (?,?,?,?)", chunk)
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - started


async def run_appenders(path: Path, concurrency: int, duration: float, warmup: float) -> dict:
    """`concurrency` tasks appending back-to-back; latencies after the warm-up are recorded."""
    log = SQLiteEventLog(path, RealClock())
    await log.open()
    reports = sample_reports()
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    begin = loop.time()
    measure_from = begin + warmup
    stop_at = measure_from + duration
    counted = {"rows": 0, "commits": 0}

    async def appender(k: int) -> None:
        i = k
        now = loop.time()
        while now < stop_at:
            sent = time.perf_counter()
            delivery = uuid.uuid4().hex
            await log.append(reports[i % len(reports)], delivery, fingerprint(delivery.encode()))
            elapsed = time.perf_counter() - sent
            now = loop.time()
            if now >= measure_from:
                latencies.append(elapsed)
            i += concurrency

    async def mark() -> None:
        await asyncio.sleep(warmup)
        counted["rows"] = log.stats.appended_total
        counted["commits"] = log.stats.commits_total

    async def mark_cpu() -> None:
        await asyncio.sleep(warmup)
        counted["cpu"] = time.process_time()

    marker = asyncio.create_task(mark())
    cpu_marker = asyncio.create_task(mark_cpu())
    await asyncio.gather(*(appender(k) for k in range(concurrency)))
    await marker
    await cpu_marker
    cpu = time.process_time() - counted["cpu"]
    rows = log.stats.appended_total - counted["rows"]
    commits = log.stats.commits_total - counted["commits"]
    elapsed = loop.time() - measure_from
    max_batch = log.stats.max_batch_size
    checkpoints = getattr(log, "_checkpointer", None)  # older commits checkpoint in COMMIT
    wal_bytes = os.path.getsize(f"{path}-wal")  # its high-water mark: it never shrinks until close
    await log.close()
    latencies.sort()
    return {
        "rows_per_s": rows / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
        "max_ms": 1000 * latencies[-1],
        "mean_batch": rows / max(commits, 1),
        "max_batch": max_batch,
        "cpu_us_per_row": 1e6 * cpu / max(rows, 1),
        "checkpoints": checkpoints.stats if checkpoints is not None else None,
        "wal_mb": wal_bytes / 1e6,
    }


async def scenario(name: str, template: Path, workdir: Path, args: argparse.Namespace) -> None:
    for concurrency in args.concurrency:
        # each run starts from a copy of the same file, so runs do not feed each other's size
        path = workdir / f"run-{name}-{concurrency}.db"
        shutil.copyfile(template, path)
        result = await run_appenders(path, concurrency, args.duration, args.warmup)
        size = os.path.getsize(path)
        print(
            f"{name:>14}  conc={concurrency:<4} {result['rows_per_s']:>9,.0f} rows/s  "
            f"p50={result['p50_ms']:6.2f} ms  p99={result['p99_ms']:6.2f} ms  "
            f"max={result['max_ms']:7.2f} ms  batch mean={result['mean_batch']:6.1f} "
            f"max={result['max_batch']:<5} cpu={result['cpu_us_per_row']:5.1f} µs/row "
            f"file={size / 1e6:,.0f} MB WAL at most {result['wal_mb']:,.0f} MB",
            flush=True,
        )
        if result["checkpoints"] is not None:
            stats = result["checkpoints"]
            print(f"{'':>14}  checkpointer: {stats.checkpoints} passes (longest "
                  f"{1000 * stats.longest_s:.0f} ms), {stats.finished} finished by the writer "
                  f"(longest {1000 * stats.longest_finish_s:.0f} ms)", flush=True)
        path.unlink()
        for suffix in ("-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


async def time_open(path: Path) -> None:
    """What the start-up integrity check costs: quick_check alone, then a whole open."""
    for attempt in ("first", "second"):
        started = time.perf_counter()
        with sqlite3.connect(path) as conn:
            result = conn.execute("PRAGMA quick_check(5)").fetchall()
        check = time.perf_counter() - started
        started = time.perf_counter()
        log = SQLiteEventLog(path, RealClock())
        await log.open()
        opened = time.perf_counter() - started
        await log.close()
        print(f"quick_check ({attempt} run): {check:.2f} s -> {result[0][0]}; "
              f"open() with the check: {opened:.2f} s", flush=True)


async def main(args: argparse.Namespace) -> None:
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="append-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        empty = workdir / "empty.db"
        await create_schema(empty)
        print(f"event loop: {type(asyncio.get_running_loop()).__module__}; "
              f"sqlite {sqlite3.sqlite_version}; {args.duration:g} s per run after "
              f"{args.warmup:g} s warm-up; files in {workdir}", flush=True)
        await scenario("empty", empty, workdir, args)
        if args.prefill:
            full = workdir / "prefilled.db"
            await create_schema(full)
            deliveries = args.prefill_deliveries
            if deliveries is None:
                deliveries = args.prefill
            took = prefill(full, args.prefill, deliveries)
            print(f"prefilled {args.prefill:,} events ({deliveries:,} delivery ids) in "
                  f"{took:.0f} s, {os.path.getsize(full) / 1e6:,.0f} MB", flush=True)
            await time_open(full)
            await scenario(f"{args.prefill / 1e6:g}M events", full, workdir, args)
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", type=int, default=0,
                        help="also run against a log with N events")
    parser.add_argument("--prefill-deliveries", type=int, default=None,
                        help="how many prefilled events carry a delivery id still in the window "
                             "(default: all of them, the worst case)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                        default=[32, 128], help="comma-separated appender counts")
    parser.add_argument("--dir", help="work directory (default: a temporary one, removed after)")
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.no_uvloop:
        asyncio.run(main(arguments))
    else:
        try:
            import uvloop
        except ImportError:
            asyncio.run(main(arguments))
        else:
            uvloop.run(main(arguments))
