"""What the Elasticsearch log's spool costs, in one run, on osmem-server.

    .venv/bin/python bench/es_spool_bench.py [--events 5000] [--rounds 3] [--concurrency 64]

Each round, on a fresh index prefix, alternating: appends straight to the cluster without a
spool ("live"), the same with a spool configured ("live+spool": the live path should cost the
same), then with the server stopped (SIGSTOP: "spooled", every append answered from the spool
file, measured after the first append that waited for the client's timeouts) and, once it
is resumed, the forward of what was spooled ("forward"). Prints appends (or
forwards) per second and CPU seconds per event of this process (appenders, event loop, client,
the spool's SQLite thread) and of the server (its /proc stat); medians at the end. Prints
figures; asserts nothing. The server is a test server: its figures are not a cluster's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from append_bench import sample_reports  # noqa: E402
from es_append_bench import own_cpu, process_cpu  # noqa: E402
from trackalert.clock import RealClock  # noqa: E402
from trackalert.eventlog.elasticsearch import ElasticEventLog  # noqa: E402
from trackalert.eventlog.es_client import parse_elastic_url  # noqa: E402

KINDS = ("live", "live+spool", "spooled", "forward")


async def load(log: ElasticEventLog, events: int, concurrency: int, ids: str) -> tuple[float, float]:
    """(appends/s, this process's CPU seconds per event); delivery ids `ids`-0, `ids`-1, ..."""
    reports = sample_reports()
    numbers = iter(range(events))

    async def appender() -> None:
        for i in numbers:
            await log.append(reports[i % len(reports)], f"{ids}-{i}")

    start, cpu = time.perf_counter(), own_cpu()
    await asyncio.gather(*(appender() for _ in range(concurrency)))
    return events / (time.perf_counter() - start), (own_cpu() - cpu) / events


async def forward(log: ElasticEventLog, events: int) -> tuple[float, float]:
    """(forwards/s, this process's CPU seconds per event) until the spool is empty."""
    start, cpu = time.perf_counter(), own_cpu()
    while log.spooling:
        await asyncio.sleep(0.005)
    return events / (time.perf_counter() - start), (own_cpu() - cpu) / events


async def one_round(args: argparse.Namespace, base: str, pid: int) -> dict[str, tuple[float, ...]]:
    figures: dict[str, tuple[float, ...]] = {}
    spool = Path(tempfile.mkdtemp()) / "spool.db"
    for kind, options in (("live", "?timeout=1"), ("live+spool", f"?timeout=1&spool={spool}")):
        log = ElasticEventLog(parse_elastic_url(f"{base}/bench-{uuid.uuid4().hex[:8]}{options}"),
                              RealClock())
        await log.open()
        server = process_cpu(pid)
        rate, cpu = await load(log, args.events, args.concurrency, "live")
        figures[kind] = (rate, cpu, (process_cpu(pid) - server) / args.events)
        if kind == "live":
            await log.close()
    os.kill(pid, signal.SIGSTOP)
    try:
        await load(log, 1, 1, "first")  # waits for the client's timeouts, then spools
        rate, cpu = await load(log, args.events, args.concurrency, "spooled")
        figures["spooled"] = (rate, cpu, 0.0)
        assert log.stats.spool_depth >= args.events  # type: ignore[attr-defined]
    finally:
        os.kill(pid, signal.SIGCONT)
    server = process_cpu(pid)
    rate, cpu = await forward(log, args.events)
    figures["forward"] = (rate, cpu, (process_cpu(pid) - server) / args.events)
    await log.close()
    return figures


async def run(args: argparse.Namespace, base: str, pid: int) -> None:
    rows: dict[str, list[tuple[float, ...]]] = {kind: [] for kind in KINDS}
    for round_ in range(args.rounds):
        figures = await one_round(args, base, pid)
        for kind in KINDS:
            rows[kind].append(figures[kind])
            print(f"round {round_ + 1} {kind:10}: {figures[kind][0]:8,.0f}/s, this process "
                  f"{figures[kind][1] * 1e6:4.0f} µs CPU/event, server "
                  f"{figures[kind][2] * 1e6:5.0f} µs CPU/event", flush=True)
    for kind in KINDS:
        rate, cpu, server = (statistics.median(row[i] for row in rows[kind]) for i in range(3))
        print(f"median {kind:10}: {rate:8,.0f}/s, this process {cpu * 1e6:4.0f} µs CPU/event, "
              f"server {server * 1e6:5.0f} µs CPU/event")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    from osmem_server import OsmemServer

    with OsmemServer.start(addr="127.0.0.1:0", japanese=False) as server:
        asyncio.run(run(args, "elasticsearch://" + server.url.split("://", 1)[1], server.pid))


if __name__ == "__main__":
    main()
