"""The projection's feed of the other nodes' events on a two-node Elasticsearch log: its cost
to the cluster (refreshes and searches per second), to the runner's thread, and how soon it
sees the other node's reports.

    .venv/bin/python bench/es_feed_bench.py [--duration 20] [--rate 200] [--url-options '&feed_interval=0.1']
    .venv/bin/python bench/es_feed_bench.py --against /tmp/other-tree --rounds 3

Starts osmem-server (the in-memory test server) on a loopback port and two logs on it in this
process, nodes a and b; for --duration seconds both append --rate reports/s each, in batches
every 10 ms. Node b's runner is a thread taking b's events as b acknowledges them and, as the
policy runner does before each report, asking the feed (eventlog/foreign.py) for a's events
below it. Counted: the requests b's blocking clients send, by endpoint (the transport node's
perform_request, wrapped; the same class in older trees), the runner thread's CPU, and for each
of a's events the time from a's acknowledgment to b's feed handing it out. osmem-server makes a
document searchable at once, so the last figure is the poll interval's share alone: on a real
cluster without a refresh per poll add up to the index's refresh_interval. With --against, runs
this script on the tree there and on this one, alternating, --rounds each, and prints medians
side by side. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import queue
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
SHOWN = ("refresh_per_s", "search_per_s", "requests_per_judged", "runner_cpu_us_per_judged",
         "seen_p50_ms", "seen_p99_ms", "judged", "absorbed")


def counting_requests() -> collections.Counter:
    """Count every request of the blocking clients by (method, endpoint)."""
    from trackalert.eventlog import es_client

    counts: collections.Counter = collections.Counter()
    lock = threading.Lock()
    original = es_client.PlainJsonSyncNode.perform_request

    def perform_request(self, method, target, *args, **kwargs):  # type: ignore[no-untyped-def]
        path = target.split("?", 1)[0]
        endpoint = next((p for p in reversed(path.split("/")) if p.startswith("_")), "doc")
        with lock:
            counts[f"{method} {endpoint}"] += 1
        return original(self, method, target, *args, **kwargs)

    es_client.PlainJsonSyncNode.perform_request = perform_request  # type: ignore[method-assign]
    return counts


async def one_run(args: argparse.Namespace) -> dict[str, Any]:
    from osmem_server import OsmemServer
    from trackalert.clock import RealClock
    from trackalert.eventlog.elasticsearch import ElasticEventLog
    from trackalert.eventlog.es_client import parse_elastic_url
    from trackalert.eventlog.foreign import ForeignFeed
    from trackalert.report import Report

    counts = counting_requests()
    server = OsmemServer.start(addr="127.0.0.1:0", japanese=False)
    base = server.url.replace("http://", "elasticsearch://") + f"/feed-{uuid.uuid4().hex[:8]}"
    a = ElasticEventLog(parse_elastic_url(base + "?node=a"), RealClock())
    b = ElasticEventLog(parse_elastic_url(base + "?node=b" + args.url_options), RealClock())
    await a.open()
    await b.open()
    theirs: dict[int, float] = {}  # a's seq -> when a acknowledged it (monotonic)
    mine: queue.Queue = queue.Queue()
    b.add_listener(lambda events: [mine.put(e) for e in events])
    await b.append(Report(t=time.time(), login="warm", remote="192.0.2.1", pwhash="ab", success=True))
    await a.append(Report(t=time.time(), login="warm", remote="192.0.2.1", pwhash="ab", success=True))
    first = mine.get()
    seen: list[float] = []
    figures: dict[str, Any] = {}
    done = threading.Event()

    def runner() -> None:
        feed = ForeignFeed(b.foreign_source())
        feed.start(first.seq, first.received)
        cpu0, judged, absorbed = time.thread_time(), 0, 0
        while not (done.is_set() and mine.empty()):
            try:
                event = mine.get(timeout=0.05)
            except queue.Empty:
                continue
            for other in feed.absorb(event.seq):
                acked = theirs.get(other.seq)
                if acked is not None:
                    seen.append(time.monotonic() - acked)
                absorbed += 1
            feed.note_own(event.seq, event.received)
            judged += 1
        figures.update(judged=judged, absorbed=absorbed, runner_cpu=time.thread_time() - cpu0,
                       interval=feed.interval)

    counts.clear()
    thread = threading.Thread(target=runner)
    wall0 = time.monotonic()
    thread.start()
    per_batch = max(1, round(args.rate / 100))
    n = 0
    while time.monotonic() - wall0 < args.duration:
        batch = [Report(t=time.time(), login=f"user{(n + i) % 500}", remote=f"192.0.2.{(n + i) % 200 + 1}",
                        pwhash="ab", success=(n + i) % 3 == 0) for i in range(2 * per_batch)]
        n += len(batch)
        tick = time.monotonic()

        async def to_a(report: Report) -> None:
            appended = await a.append(report)
            theirs[appended.seq] = time.monotonic()

        await asyncio.gather(*(to_a(r) for r in batch[:per_batch]),
                             *(b.append(r) for r in batch[per_batch:]))
        await asyncio.sleep(max(0.0, 0.01 - (time.monotonic() - tick)))
    done.set()
    await asyncio.to_thread(thread.join)
    wall = time.monotonic() - wall0
    requests = dict(counts)
    await b.close()
    await a.close()
    server.close()
    seen.sort()
    judged = max(1, figures["judged"])
    import trackalert

    return {
        "tree": str(Path(trackalert.__file__).resolve().parent.parent),
        "interval_s": figures["interval"],
        "judged": figures["judged"], "absorbed": figures["absorbed"],
        "refresh_per_s": sum(v for k, v in requests.items() if k.endswith("_refresh")) / wall,
        "search_per_s": sum(v for k, v in requests.items() if k.endswith("_search")) / wall,
        "requests_per_judged": sum(requests.values()) / judged,
        "runner_cpu_us_per_judged": figures["runner_cpu"] / judged * 1e6,
        "seen_p50_ms": seen[len(seen) // 2] * 1e3 if seen else float("nan"),
        "seen_p99_ms": seen[int(len(seen) * 0.99)] * 1e3 if seen else float("nan"),
        "requests": requests,
    }


def compare(args: argparse.Namespace) -> None:
    trees = {"this": HERE.parent.parent, "other": Path(args.against).resolve()}
    rounds: dict[str, list[dict]] = {"this": [], "other": []}
    for number in range(args.rounds):
        order = ["this", "other"] if number % 2 == 0 else ["other", "this"]
        for name in order:
            command = [sys.executable, str(HERE), "--tree", str(trees[name]), "--duration",
                       str(args.duration), "--rate", str(args.rate), "--json"]
            if name == "this" and args.url_options:
                command += ["--url-options", args.url_options]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            figures = json.loads(out.strip().splitlines()[-1])
            rounds[name].append(figures)
            print(f"round {number + 1} {name}: " + ", ".join(
                f"{k}={figures[k]:.4g}" for k in SHOWN), flush=True)
    print(f"\nmedians of {args.rounds} rounds (this = {trees['this']}, other = {trees['other']}):")
    for key in SHOWN:
        this = statistics.median(r[key] for r in rounds["this"])
        other = statistics.median(r[key] for r in rounds["other"])
        ratio = this / other if other else float("nan")
        print(f"  {key:26s} this {this:10.4g}   other {other:10.4g}   ratio {ratio:.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=200.0, help="reports/s per node")
    parser.add_argument("--url-options", default="", help="appended to node b's URL, e.g. &feed_interval=0.1")
    parser.add_argument("--tree", type=Path, default=HERE.parent.parent)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    parser.add_argument("--against", help="another tree: run both, alternating")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.against:
        compare(args)
        return
    sys.path.insert(0, str(args.tree.resolve()))
    figures = asyncio.run(one_run(args))
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
