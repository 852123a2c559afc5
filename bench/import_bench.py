"""History benchmark: `trackalert import` end to end into an empty log, its phases, and export.

    .venv/bin/python bench/import_bench.py [--file export.ndjson | --events 1000000]
        [--rounds 3] [--against /tmp/base-tree] [--phases] [--export]

* end to end: `python -m trackalert import --log NEW FILE` as a subprocess, from reading the
  file to the durable commit (and the log closed): wall-clock events/s, and CPU µs per event of
  the command and every process it started (parse workers included). With `--against TREE`
  the same command runs from that checkout too (e.g. `git worktree add /tmp/base 13bad50`),
  alternating with this one, round after round, in fresh logs; medians at the end.
* `--phases` (this tree): the import's parts one after the other in this process, CPU µs per
  event each: parse (every block, here, no workers), append (the parsed items into an empty log,
  one transaction, helper indexes dropped), index build, commit.
* `--export`: `trackalert export` of the imported log, events/s.

`--file` takes an export (e.g. `trackalert export` of /work/wlcache/prefill-1000000.db, copied
to /tmp first) or wforce report lines; without it `--events` export lines are generated (attrs,
multi-valued attrs, device attrs, IPv4 and IPv6, enrichment, a delivery id on every other one).

Prints figures; asserts nothing. On the shared 2-core box wall-clock rates follow the load:
compare the CPU figures, side by side, and name the load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

T0 = 1_790_000_000.0


def export_lines(count: int) -> str:
    """`count` export lines, seqs 1..count, received 1 ms apart."""
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


def run_cli(tree: Path, args: list[str]) -> tuple[float, float, str]:
    """(wall s, CPU s of the command and its children, stdout) of `python -m trackalert ARGS`
    run from `tree` (its package first on the path)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "trackalert", *args], cwd=tree,
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: trackalert {' '.join(args)} failed:\n{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def remove_log(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(str(path) + suffix).unlink(missing_ok=True)


def end_to_end(trees: dict[str, Path], source: Path, count: int, rounds: int,
               tmp: Path, export: bool) -> None:
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
    for round_no in range(1, rounds + 1):
        for name, tree in trees.items():  # alternating, in fresh logs
            log = tmp / f"{name}.db"
            remove_log(log)
            wall, cpu, out = run_cli(tree, ["import", "--log", str(log), str(source)])
            figures[name].append((count / wall, cpu / count * 1e6))
            print(f"round {round_no} {name}: {count / wall:,.0f} events/s, "
                  f"{cpu / count * 1e6:.1f} cpu µs/event ({wall:.1f} s, load "
                  f"{os.getloadavg()[0]:.1f}); {out.strip()}", flush=True)
            if export and round_no == 1:
                wall, _, _ = run_cli(tree, ["export", "--log", str(log), "--out", os.devnull])
                print(f"  export {name}: {count / wall:,.0f} events/s", flush=True)
            remove_log(log)
    for name, measured in figures.items():
        print(f"{name}: median {statistics.median(m[0] for m in measured):,.0f} events/s, "
              f"{statistics.median(m[1] for m in measured):.1f} cpu µs/event over "
              f"{len(measured)} round(s) of {count:,} events")


def phases(source: Path, tmp: Path) -> None:
    """The import's parts one after the other, in this process, CPU µs per event each."""
    import asyncio
    import sqlite3

    from trackalert.clock import RealClock
    from trackalert.eventlog.history import _blocks, _drop_indexes, _parse_block
    from trackalert.eventlog.sqlite import SQLiteEventLog, log_end, store_history

    figures: dict[str, float] = {}

    def timed(name: str, fn):  # noqa: ANN001, ANN202 - a bench helper
        cpu = time.process_time()
        value = fn()
        figures[name] = time.process_time() - cpu
        return value

    with open(source, "rb") as data:
        parsed = timed("parse", lambda: [_parse_block(first, block, None)
                                         for first, block in _blocks(data)])
    items = [item for block_items, _, _ in parsed for item in block_items]
    log = tmp / "phases.db"
    remove_log(log)

    async def create() -> None:
        eventlog = SQLiteEventLog(log, RealClock())
        await eventlog.open()
        await eventlog.close()

    asyncio.run(create())
    conn = sqlite3.connect(log, isolation_level=None)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("PRAGMA cache_size=-262144")
    conn.execute("BEGIN IMMEDIATE")
    indexes = _drop_indexes(conn)
    seq, floor, _ = log_end(conn)

    def append() -> None:
        at, last = seq, floor
        for start in range(0, len(items), 10_000):
            done, last = store_history(conn, items[start:start + 10_000], at, last)
            at = done.last_seq

    timed("append", append)
    timed("index build", lambda: [conn.execute(sql) for sql in indexes])
    timed("commit", lambda: conn.execute("COMMIT"))
    conn.close()
    remove_log(log)
    count = len(items)
    print("phases (cpu µs/event, this process, no workers): " + ", ".join(
        f"{name} {seconds / count * 1e6:.1f}" for name, seconds in figures.items())
        + f"; total {sum(figures.values()) / count * 1e6:.1f} over {count:,} events")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", type=Path, help="an export or wforce report lines")
    parser.add_argument("--events", type=int, default=1_000_000,
                        help="without --file: how many export lines to generate")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--against", type=Path, metavar="TREE",
                        help="also time the import of this checkout (alternating)")
    parser.add_argument("--phases", action="store_true")
    parser.add_argument("--export", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ta-import-bench-") as tmp_name:
        tmp = Path(tmp_name)
        source = args.file
        if source is None:
            print(f"generating {args.events:,} events...", flush=True)
            source = tmp / "history.ndjson"
            source.write_text(export_lines(args.events), encoding="utf-8")
        with open(source, "rb") as counting:
            count = sum(1 for line in counting if line.strip())
        trees = {"this": HERE}
        if args.against is not None:
            trees["against"] = args.against.resolve()
        end_to_end(trees, source, count, args.rounds, tmp, args.export)
        if args.phases:
            phases(source, tmp)


if __name__ == "__main__":
    main()
