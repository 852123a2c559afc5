"""Durable appends into the Elasticsearch event log, beside the SQLite log, in one run.

    .venv/bin/python bench/es_append_bench.py [--events 20000] [--rounds 3] [--url elasticsearch://host:9200]

Without --url it starts osmem-server (the in-memory OpenSearch-compatible test server) on a
loopback port: a test server, so its figures say what trackalert costs, not what a cluster
takes. Each round appends --events reports (each with its own delivery id, as wforce sends them,
unless --no-delivery-ids) from --concurrency appenders into a fresh SQLite file and a fresh index
prefix, alternating, and prints appends/s, the CPU seconds per event of this process (appenders,
event loop, client; SQLite's writer thread too) and of the server process (osmem-server only:
its /proc stat), and the bulk sizes. Medians at the end. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from append_bench import sample_reports  # noqa: E402
from trackalert.clock import RealClock  # noqa: E402
from trackalert.eventlog.base import EventLog  # noqa: E402
from trackalert.eventlog.elasticsearch import ElasticEventLog  # noqa: E402
from trackalert.eventlog.es_client import parse_elastic_url  # noqa: E402
from trackalert.eventlog.sqlite import SQLiteEventLog  # noqa: E402


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(log: EventLog, events: int, concurrency: int, keyed: bool) -> tuple[float, float]:
    """(appends/s, this process's CPU seconds per event)."""
    reports = sample_reports()
    numbers = iter(range(events))

    async def appender() -> None:
        for i in numbers:
            await log.append(reports[i % len(reports)], f"bench-{i}" if keyed else None)

    start, cpu = time.perf_counter(), own_cpu()
    await asyncio.gather(*(appender() for _ in range(concurrency)))
    return events / (time.perf_counter() - start), (own_cpu() - cpu) / events


async def run(args: argparse.Namespace, base: str, server_pid: int | None) -> None:
    figures: dict[str, list[tuple[float, float, float]]] = {"sqlite": [], "elasticsearch": []}
    for round_ in range(args.rounds):
        for kind in figures:
            if kind == "sqlite":
                log: EventLog = SQLiteEventLog(Path(tempfile.mkdtemp()) / "events.db", RealClock())
            else:
                prefix = f"bench-{uuid.uuid4().hex[:8]}"
                log = ElasticEventLog(parse_elastic_url(f"{base}/{prefix}"), RealClock())
            await log.open()
            server = process_cpu(server_pid)
            rate, cpu = await load(log, args.events, args.concurrency, not args.no_delivery_ids)
            server = (process_cpu(server_pid) - server) / args.events
            await log.close()
            figures[kind].append((rate, cpu, server))
            print(f"round {round_ + 1} {kind:13}: {rate:8,.0f} appends/s, this process "
                  f"{cpu * 1e6:4.0f} µs CPU/event, server {server * 1e6:4.0f} µs CPU/event, "
                  f"{log.stats.commits_total} commits, largest {log.stats.max_batch_size}", flush=True)
    for kind, rows in figures.items():
        rate, cpu, server = (statistics.median(row[i] for row in rows) for i in range(3))
        print(f"median {kind:13}: {rate:8,.0f} appends/s, this process {cpu * 1e6:4.0f} µs CPU/event"
              + (f", server {server * 1e6:4.0f} µs CPU/event" if server_pid else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--no-delivery-ids", action="store_true")
    parser.add_argument("--url", help="an elasticsearch:// URL without prefix (default: osmem-server)")
    args = parser.parse_args()
    if args.url:
        asyncio.run(run(args, args.url.rstrip("/"), None))
        return
    from osmem_server import OsmemServer

    with OsmemServer.start(addr="127.0.0.1:0", japanese=False) as server:
        asyncio.run(run(args, "elasticsearch://" + server.url.split("://", 1)[1], server.pid))


if __name__ == "__main__":
    main()
