"""The production workload of issue 9: enrichment on, the starter policies (or an empty one), wrk.

    .venv/bin/python bench/workload.py [--policy empty|starter] [--duration 20] [--prefill N]
                                       [--connections 128] [--profile FILE] [--json FILE]

Starts the real daemon (trackalert.testing.DaemonProcess, SQLite log, loopback listener) with
GeoIP City + ASN enrichment from tests/data/geoip, `setNumLuaStates(4)`, `setNumWebProcesses(2)`
and either the six starter policies loaded as docs/policies.md shows (alerts are logged; no
webhook) or an empty `report`. wrk (Debian package `wrk`) posts varied wforce-shaped reports
(20,000 logins, a handful of IPv4/IPv6 addresses most of which GeoIP knows, three browsers and an
IMAP client, 70 % successes, a unique X-Wforce-Delivery each; see bench/reports.py) at 128
connections for a fixed duration, after a short warm-up and once the warm-up has drained.

Prints durable reports/s, p50/p99 latency (wrk), policy events/s during the load, the policy lag
(`trackalert_policy_lag_events`) every --lag-every seconds of the load and at its end (whether
the runner keeps pace shows in that series: bounded, or growing), the time until it drains to 0
(bounded by --drain-timeout), and the resident memory of the whole daemon (core + web workers), sampled
during the run (peak and end), and the CPU time the core process and the web workers spent per
durable report during the load. It asserts nothing. With --prefill N the log first holds N events
of the same vocabulary (written directly, as the daemon would store them).

--elasticsearch runs the daemon on an Elasticsearch event log instead: a local osmem-server (the
in-memory OpenSearch-compatible server of the tests, PyPI `osmem-server`) started for the run,
`setEventLog("elasticsearch://127.0.0.1:PORT/bench")`; the figures then add the server's CPU per
durable report (durable: counted by `_count` after a refresh; --prefill does not apply).

--nodes N (with --elasticsearch) starts N daemons on the one osmem-server (`?node=nodeK`), as
nodes behind a load balancer share a cluster: wrk posts to each with connections/N connections
at once, and the figures are the cluster's: durable reports/s over all nodes, policy events/s
as the reports all nodes' runners judged (`trackalert_lua_calls_total{kind="report"}`), the lag
summed, the worst node's p50/p99, CPU per report summed over the daemons (memory: node 1's).

--profile FILE records the core process with py-spy (`pip install py-spy` in the venv; not a
dependency of trackalert) during the load and prints where the time goes; --profile-process
policy|web records the policy process or the first web worker instead.

The daemon runs the `trackalert` this interpreter imports (run from a checkout's directory, or
with PYTHONPATH pointing at it: bench/compare.py does that), and the script prints which one.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

# Import trackalert as the daemon's `python -m trackalert` will (working directory, PYTHONPATH, the
# venv), so that the policies and test data used are that checkout's; this repository last.
sys.path.insert(1, os.getcwd())
sys.path.append(str(Path(__file__).resolve().parent.parent))

import harness  # noqa: E402
import reports  # noqa: E402
from trackalert.testing import DaemonProcess, listener_config  # noqa: E402

STARTER = ("new_country", "new_device", "impossible_travel", "password_spray", "account_attack",
           "pwhash_spray")


def daemon_config(policy: str, lua_states: int, web_processes: int, log_url: str | None = None,
                  policy_process: bool | None = None) -> str:
    """The operator's config: enrichment as docs/lua-api.md shows, policies as docs/policies.md."""
    config = listener_config() + (f'setEventLog("{log_url}")\n' if log_url else "")
    if policy_process is not None:  # None: the daemon's default (its own process on SQLite)
        config += f"setPolicyProcess({str(policy_process).lower()})\n"
    config += f"""
setNumLuaStates({lua_states})
setNumWebProcesses({web_processes})
newGeoIP2DB("City", "{reports.CITY_DB}")
newGeoIP2DB("ASN", "{reports.ASN_DB}")
setEnrichment({{city="City", asn="ASN"}})
"""
    if policy == "empty":
        return config + "setReport(function(lt) end)\n"
    names = ", ".join(f'"{name}"' for name in STARTER)
    return config + f"""
local dir = "{reports.POLICIES}/"
dofile(dir .. "alert.lua")
StarterAlert.webhook = ""
local policies = {{}}
for _, name in ipairs({{{names}}}) do policies[#policies + 1] = dofile(dir .. name .. ".lua") end
setReport(function(lt)
  for _, p in ipairs(policies) do p.report(lt) end
end)
"""


class Profiler:
    """py-spy on the core process for the first `seconds` of the load (raw collapsed stacks)."""

    def __init__(self, output: str | None, pid: int, seconds: float, gil: bool) -> None:
        self.output, self.process = output, None
        if output is None:
            return
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(py_spy).exists():
            sys.exit("--profile needs py-spy: .venv/bin/pip install py-spy")
        command = [py_spy, "record", "-p", str(pid), "-d", str(max(1, int(seconds))), "-r", "100",
                   "-f", "raw", "-o", output, "--nonblocking"] + (["--gil"] if gil else [])
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def finish(self) -> None:
        if self.process is None:
            return
        try:
            _, err = self.process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        if self.process.returncode:
            print(f"  py-spy failed: {err.decode(errors='replace').strip()}")
            return
        print_profile(Path(self.output))


def _without_line(frame: str) -> str:
    """"f (file.py:12)" -> "f (file.py)": inclusive time is per function, not per line."""
    head, _, line = frame.rpartition(":")
    return head + ")" if head and line.rstrip(")").isdigit() else frame


def print_profile(path: Path, top: int = 15) -> None:
    """Self time per line and inclusive time per function, as shares of py-spy's raw samples."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in {_without_line(f) for f in frames}:
            inclusive[frame] += int(count)
    print(f"  profile: {total} samples in {path}")
    for title, counter in (("self time (line)", own), ("inclusive time (function)", inclusive)):
        print(f"  top {top} by {title}:")
        for frame, count in counter.most_common(top):
            print(f"    {100 * count / max(1, total):5.1f}%  {frame}")


def profiled_pid(core: int, which: str) -> int:
    """The pid --profile-process names: the core, the policy process or the first web worker
    (imported here: an older checkout compared with bench/compare.py may lack them)."""
    from trackalert.testing import policy_process_pid, web_worker_pids

    if which == "policy":
        pid = policy_process_pid(core)
        if pid is None:
            sys.exit("--profile-process policy: the daemon runs its policy in the core")
        return pid
    if which == "web":
        return web_worker_pids(core)[0]
    return core


def measure(process: DaemonProcess, stored: Callable[[], int], script: Path, args: argparse.Namespace,
            server_pid: int | None = None) -> dict[str, Any]:
    metrics = process.url("/metrics")
    harness.run_wrk(process.url("/command/report"), 32, args.warmup, script, "warmup")
    if harness.wait_for_drain(metrics, args.drain_timeout) is None:
        print(f"  the warm-up's policy lag did not drain within {args.drain_timeout:.0f} s: "
              "the load starts behind", flush=True)
    with harness.MemorySampler(process.process.pid) as memory:
        before_stored = stored()
        lag_at_start = harness.policy_lag(metrics)
        before_done = before_stored - lag_at_start
        profiled = profiled_pid(process.process.pid, args.profile_process) if args.profile else 0
        profiler = Profiler(args.profile, profiled, min(args.profile_seconds, args.duration),
                            args.profile_gil)
        started = time.monotonic()
        server_before = harness.process_cpu_seconds(server_pid) if server_pid else 0.0
        with harness.CpuMeter(process.process.pid) as cpu, \
                harness.LagSampler(metrics, args.lag_every) as lags:
            wrk = harness.run_wrk(process.url("/command/report"), args.connections, args.duration,
                                  script, "load")
        server_s = harness.process_cpu_seconds(server_pid) - server_before if server_pid else 0.0
        elapsed = time.monotonic() - started
        after_stored = stored()
        lag = harness.policy_lag(metrics)
        rss_load_end = memory.last_mib
        drain = harness.wait_for_drain(metrics, args.drain_timeout)
    profiler.finish()
    return {
        "reports_per_s": (after_stored - before_stored) / elapsed,
        "wrk_2xx_per_s": wrk.ok_per_second,
        "p50_ms": wrk.p50_ms, "p99_ms": wrk.p99_ms,
        "non2xx": wrk.non2xx, "socket_errors": wrk.errors,
        "policy_events_per_s": (after_stored - lag - before_done) / elapsed,
        "lag_at_start_events": lag_at_start, "lag_events": lag,
        "lag_samples": lags.samples,
        "lag_max_events": max([lag] + [events for _, events in lags.samples]),
        "drain_s": drain if drain is not None else float("nan"),
        "rss_peak_mib": memory.peak_mib, "rss_load_end_mib": rss_load_end,
        "rss_end_mib": memory.last_mib, "processes": memory.processes,
        "log_events": after_stored,
        "cpu_core_us_per_report": 1e6 * cpu.core_s / max(1, after_stored - before_stored),
        "cpu_web_us_per_report": 1e6 * cpu.others_s / max(1, after_stored - before_stored),
        "cpu_core_share": cpu.core_s / cpu.wall_s if cpu.wall_s else 0.0,
        "cpu_server_us_per_report": 1e6 * server_s / max(1, after_stored - before_stored),
        "cpu_server_share": server_s / cpu.wall_s if cpu.wall_s else 0.0,
        "cpu_web_share": cpu.others_s / cpu.wall_s if cpu.wall_s else 0.0,
        "cpu_policy_us_per_report": 1e6 * cpu.policy_s / max(1, after_stored - before_stored),
        "cpu_policy_share": cpu.policy_s / cpu.wall_s if cpu.wall_s else 0.0,
        # per event the policy process judged during the load (its CPU then, over those events)
        "cpu_policy_us_per_event": 1e6 * cpu.policy_s / max(1, after_stored - lag - before_done),
    }


def _judged(url: str) -> float:
    return harness.scrape(url).get('trackalert_lua_calls_total{kind="report"}', 0.0)


def _on_each(processes: list[DaemonProcess], connections: int, seconds: float, script: Path,
             label: str) -> list[Any]:
    """wrk against every node at once (one wrk each), their results in node order."""
    with concurrent.futures.ThreadPoolExecutor(len(processes)) as pool:
        return list(pool.map(lambda p: harness.run_wrk(p.url("/command/report"), connections,
                                                       seconds, script, label), processes))


def measure_nodes(processes: list[DaemonProcess], stored: Callable[[], int], script: Path,
                  args: argparse.Namespace, server_pid: int) -> dict[str, Any]:
    """`measure` for several daemons on one cluster: the figures of the whole cluster."""
    metrics = [process.url("/metrics") for process in processes]
    share = max(1, args.connections // len(processes))
    _on_each(processes, max(1, 32 // len(processes)), args.warmup, script, "warmup")
    for url in metrics:
        if harness.wait_for_drain(url, args.drain_timeout) is None:
            print(f"  the warm-up's policy lag of {url} did not drain within "
                  f"{args.drain_timeout:.0f} s: the load starts behind", flush=True)
    with harness.MemorySampler(processes[0].process.pid) as memory, \
            contextlib.ExitStack() as meters:
        before_stored = stored()
        judged_before = sum(_judged(url) for url in metrics)
        lag_at_start = sum(harness.policy_lag(url) for url in metrics)
        started = time.monotonic()
        server_before = harness.process_cpu_seconds(server_pid)
        cpus = [meters.enter_context(harness.CpuMeter(p.process.pid)) for p in processes]
        wrks = _on_each(processes, share, args.duration, script, "load")
        meters.close()
        server_s = harness.process_cpu_seconds(server_pid) - server_before
        elapsed = time.monotonic() - started
        after_stored = stored()
        judged = sum(_judged(url) for url in metrics) - judged_before
        lag = sum(harness.policy_lag(url) for url in metrics)
        rss_load_end = memory.last_mib
        drained = time.monotonic()
        drains = [harness.wait_for_drain(url, args.drain_timeout) for url in metrics]
        drain = (time.monotonic() - drained) if all(d is not None for d in drains) else float("nan")
    new = max(1, after_stored - before_stored)
    core_s, others_s = sum(c.core_s for c in cpus), sum(c.others_s for c in cpus)
    wall = cpus[0].wall_s
    return {
        "reports_per_s": (after_stored - before_stored) / elapsed,
        "wrk_2xx_per_s": sum(w.ok_per_second for w in wrks),
        "p50_ms": max(w.p50_ms for w in wrks), "p99_ms": max(w.p99_ms for w in wrks),
        "non2xx": sum(w.non2xx for w in wrks), "socket_errors": sum(w.errors for w in wrks),
        "policy_events_per_s": judged / elapsed,
        "lag_at_start_events": lag_at_start, "lag_events": lag, "drain_s": drain,
        "rss_peak_mib": memory.peak_mib, "rss_load_end_mib": rss_load_end,
        "rss_end_mib": memory.last_mib, "processes": memory.processes,
        "log_events": after_stored,
        "cpu_core_us_per_report": 1e6 * core_s / new, "cpu_web_us_per_report": 1e6 * others_s / new,
        "cpu_core_share": core_s / wall if wall else 0.0,
        "cpu_server_us_per_report": 1e6 * server_s / new,
        "cpu_server_share": server_s / wall if wall else 0.0,
        "cpu_web_share": others_s / wall if wall else 0.0,
        "cpu_policy_us_per_report": 0.0, "cpu_policy_share": 0.0,
    }


def report_figures(f: dict[str, Any], drain_timeout: float) -> None:
    drain = (f"{f['drain_s']:.1f} s" if f["drain_s"] == f["drain_s"]
             else f"not within {drain_timeout:.0f} s")
    print(f"  durable reports/s   {f['reports_per_s']:9,.0f}   (wrk 2xx/s {f['wrk_2xx_per_s']:,.0f}, "
          f"non-2xx {f['non2xx']}, socket errors {f['socket_errors']})")
    print(f"  latency             p50 {f['p50_ms']:.1f} ms   p99 {f['p99_ms']:.1f} ms")
    print(f"  policy events/s     {f['policy_events_per_s']:9,.0f}")
    print(f"  policy lag at end   {f['lag_events']:9,.0f} events (at start {f['lag_at_start_events']:,.0f});"
          f"  drained in {drain}")
    if f.get("lag_samples"):
        print("  policy lag sampled  " + ", ".join(f"{t:.0f} s {events:,.0f}"
                                                   for t, events in f["lag_samples"]))
    print(f"  daemon RSS          peak {f['rss_peak_mib']:.0f} MiB, end of load "
          f"{f['rss_load_end_mib']:.0f} MiB, end {f['rss_end_mib']:.0f} MiB "
          f"({f['processes']} processes)")
    print(f"  daemon CPU          core {f['cpu_core_us_per_report']:.0f} µs/report "
          f"({100 * f['cpu_core_share']:.0f} % of a core), web workers "
          f"{f['cpu_web_us_per_report']:.0f} µs/report ({100 * f['cpu_web_share']:.0f} % of a core)")
    if f["cpu_policy_share"]:
        print(f"  policy process CPU  {f['cpu_policy_us_per_report']:.0f} µs/report, "
              f"{f.get('cpu_policy_us_per_event', 0.0):.0f} µs per event judged "
              f"({100 * f['cpu_policy_share']:.0f} % of a core)")
    if f["cpu_server_us_per_report"]:
        print(f"  osmem-server CPU    {f['cpu_server_us_per_report']:.0f} µs/report "
              f"({100 * f['cpu_server_share']:.0f} % of a core)")
    print(f"  log holds {f['log_events']:,} events")


@contextlib.contextmanager
def osmem_log() -> Iterator[tuple[str, Callable[[], int], int]]:
    """A started osmem-server: the log URL, how many events it holds durably, its pid."""
    from osmem_server import OsmemServer

    server = OsmemServer.start(addr="127.0.0.1:0", japanese=False)
    base = server.url.rstrip("/")

    def stored() -> int:
        for method, path in (("POST", "/bench-events/_refresh"), ("GET", "/bench-events/_count")):
            try:
                with urllib.request.urlopen(urllib.request.Request(base + path, method=method),
                                            timeout=30) as response:
                    body = json.load(response)
            except urllib.error.HTTPError as exc:
                if exc.code == 404:  # no events index yet
                    return 0
                raise
        return int(body["count"])

    try:
        yield f"elasticsearch://{base.split('://', 1)[1]}/bench", stored, server.pid
    finally:
        server.close()


def run(args: argparse.Namespace, script: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ta-workload-") as tmp, contextlib.ExitStack() as stack:
        directory = Path(tmp)
        if args.elasticsearch:
            if args.prefill:
                sys.exit("--prefill writes a SQLite log; it does not apply with --elasticsearch")
            log_url, stored, server_pid = stack.enter_context(osmem_log())
            print(f"  osmem-server pid {server_pid}, log {log_url}", flush=True)
        else:
            db_path = directory / "trackalert-events.db"
            reports.prepare_log(db_path, args.prefill, args.prefill_cache)
            log_url, server_pid = None, None
            stored = lambda: harness.stored(db_path)  # noqa: E731
        if args.nodes > 1:
            if not args.elasticsearch:
                sys.exit("--nodes needs --elasticsearch: the nodes share a cluster")
            return run_nodes(args, script, directory, log_url, stored, server_pid)
        config = daemon_config(args.policy, args.lua_states, args.web_processes, log_url,
                               args.policy_process)
        process = DaemonProcess(directory, config, args=("-s",))
        try:
            process.start(timeout=args.start_timeout)
            origin = harness.trackalert_origin(process.process.pid)
            if Path(origin) != reports.CODE_ROOT / "trackalert":
                sys.exit(f"the daemon runs {origin}, but this script loaded the policies and data "
                         f"of {reports.CODE_ROOT}: run it from that checkout's directory")
            print(f"  daemon pid {process.process.pid} runs trackalert from {origin}", flush=True)
            figures = measure(process, stored, script, args, server_pid)
        finally:
            try:
                process.stop()
            except subprocess.TimeoutExpired:
                process.kill()
    return {"origin": origin, "figures": figures}


def run_nodes(args: argparse.Namespace, script: Path, directory: Path, log_url: str,
              stored: Callable[[], int], server_pid: int) -> dict[str, Any]:
    """`run` with `args.nodes` daemons on the one cluster."""
    processes: list[DaemonProcess] = []
    try:
        for k in range(1, args.nodes + 1):
            (directory / f"node{k}").mkdir()
            config = daemon_config(args.policy, args.lua_states, args.web_processes,
                                   f"{log_url}?node=node{k}", args.policy_process)
            process = DaemonProcess(directory / f"node{k}", config, args=("-s",))
            processes.append(process)
            process.start(timeout=args.start_timeout)
            origin = harness.trackalert_origin(process.process.pid)
            if Path(origin) != reports.CODE_ROOT / "trackalert":
                sys.exit(f"the daemon runs {origin}, but this script loaded the policies and data "
                         f"of {reports.CODE_ROOT}: run it from that checkout's directory")
            print(f"  node{k}: daemon pid {process.process.pid} runs trackalert from {origin}",
                  flush=True)
        figures = measure_nodes(processes, stored, script, args, server_pid)
    finally:
        for process in processes:
            try:
                process.stop()
            except subprocess.TimeoutExpired:
                process.kill()
    return {"origin": origin, "figures": figures}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", choices=("empty", "starter"), default="starter")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    parser.add_argument("--connections", type=int, default=128)
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up load (32 connections)")
    parser.add_argument("--prefill", type=int, default=0, help="events already in the log")
    parser.add_argument("--prefill-cache", type=Path, help="keep prefilled logs here and copy them")
    parser.add_argument("--elasticsearch", action="store_true",
                        help="log into a local osmem-server started for the run")
    parser.add_argument("--nodes", type=int, default=1,
                        help="daemons sharing the osmem-server (with --elasticsearch)")
    parser.add_argument("--lua-states", type=int, default=4)
    parser.add_argument("--web-processes", type=int, default=2)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--policy-process", dest="policy_process", action="store_const", const=True,
                       help="setPolicyProcess(true): report(lt) in a process of its own (the "
                            "default on SQLite since 50a2723; say it to compare with older code)")
    where.add_argument("--policy-in-core", dest="policy_process", action="store_const", const=False,
                       help="setPolicyProcess(false): report(lt) in the core process")
    parser.add_argument("--drain-timeout", type=float, default=180.0, help="longest wait for lag 0")
    parser.add_argument("--lag-every", type=float, default=10.0,
                        help="seconds between samples of the policy lag during the load")
    parser.add_argument("--start-timeout", type=float, default=600.0, help="longest wait for READY")
    parser.add_argument("--profile", metavar="FILE", help="py-spy raw profile of the core process")
    parser.add_argument("--profile-process", choices=("core", "policy", "web"), default="core",
                        help="which process --profile records (web: the first web worker)")
    parser.add_argument("--profile-seconds", type=float, default=10.0)
    parser.add_argument("--profile-gil", action="store_true", help="sample only the GIL holder")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON (compare.py)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    harness.require_wrk()
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(reports.wrk_script())
        script = Path(handle.name)
    try:
        key = f"policy={args.policy} prefill={args.prefill}" + (" log=es" if args.elasticsearch else "")
        key += f" nodes={args.nodes}" * (args.nodes > 1)
        key += {None: "", True: " policy-process", False: " policy-in-core"}[args.policy_process]
        print(f"== workload: {key}, {args.connections} connections, {args.duration:.0f} s, "
              f"setNumLuaStates({args.lua_states}), setNumWebProcesses({args.web_processes})", flush=True)
        result = run(args, script)
        report_figures(result["figures"], args.drain_timeout)
        harness.write_json(args.json, {"bench": "workload", "origin": result["origin"],
                                       "rows": {key: result["figures"]}})
    finally:
        script.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
