"""What every benchmark needs around a real daemon: wrk, /metrics, memory, and which code ran.

Kept apart from the benchmarks themselves so that `ingest.py`, `workload.py` and `compare.py` measure
the same way: one wrk invocation and parser, one definition of "the daemon's memory" (every
process of its tree, the web workers included), one way to prove which `trackalert` a daemon
subprocess imported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trackalert.testing import basic_auth

INSTALL_WRK = ("wrk is not installed. It is the Debian package `wrk`: "
               "apt-get install wrk (as root), then run this again.")


def require_wrk() -> None:
    """Stop with the install instruction, not a traceback, when wrk is missing."""
    if not shutil.which("wrk"):
        sys.exit(INSTALL_WRK)


@dataclass
class WrkResult:
    requests: int
    seconds: float
    non2xx: int
    errors: int
    p50_ms: float
    p99_ms: float

    @property
    def ok_per_second(self) -> float:
        """2xx answers per second: each one is a durable append."""
        return (self.requests - self.non2xx) / self.seconds if self.seconds else 0.0


def _milliseconds(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def parse_wrk(out: str) -> WrkResult:
    """wrk's `--latency` text output (wrk 4.x)."""
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if total is None:
        raise RuntimeError(f"wrk gave no summary:\n{out}")
    seconds = float(total.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[total.group(3)]
    pct = {p: re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out) for p in ("50", "99")}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return WrkResult(
        requests=int(total.group(1)), seconds=seconds,
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        errors=sum(int(g) for g in errors.groups()) if errors else 0,
        p50_ms=_milliseconds(*pct["50"].groups()) if pct["50"] else float("nan"),
        p99_ms=_milliseconds(*pct["99"].groups()) if pct["99"] else float("nan"),
    )


def run_wrk(url: str, connections: int, duration: float, script: Path, *script_args: str) -> WrkResult:
    """One wrk thread, so the daemon keeps most of the cores; bounded by wrk's own -d."""
    auth = basic_auth()["Authorization"]
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
               "-s", str(script), "-H", f"Authorization: {auth}",
               "-H", "Content-Type: application/json", url]
    if script_args:
        command += ["--", *script_args]
    out = subprocess.run(command, capture_output=True, text=True, check=True,
                         timeout=duration + 60).stdout
    return parse_wrk(out)


def stored(db_path: Path) -> int:
    """The last seq in the log: what has been made durable (the seq never goes back)."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10) as db:
        return db.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]


# --------------------------------------------------------------------------------------- metrics

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def scrape(url: str, timeout: float = 10.0) -> dict[str, float]:
    """The daemon's /metrics as {"name{labels}": value}."""
    request = urllib.request.Request(url, headers=basic_auth())
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        text = answer.read().decode()
    samples = {}
    for line in text.splitlines():
        if m := _SAMPLE.match(line):
            samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples


def policy_lag(url: str) -> float:
    return scrape(url)["trackalert_policy_lag_events"]


def wait_for_drain(url: str, timeout: float, step: float = 0.1) -> float | None:
    """Seconds until the policy lag is 0 (0 if it already is), or None if not within `timeout`."""
    started = time.monotonic()
    for attempt in range(max(1, int(timeout / step))):
        if policy_lag(url) == 0:
            return time.monotonic() - started if attempt else 0.0
        time.sleep(step)
    return None


# ---------------------------------------------------------------------------------------- memory

def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # exited meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (the core process, its web workers and helpers)."""
    tree, found, todo = _children(), [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(tree.get(current, ()))
    return found


def process_rss_mib(pid: int) -> float:
    """One process's resident memory (0 once it has exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(m.group(1)) / 1024 if m else 0.0


def tree_rss_mib(pid: int) -> tuple[float, int]:
    """(RSS summed over the process tree in MiB, number of processes). Pages shared between the
    processes count once per process, as `ps` would show them: an upper bound."""
    pids = process_tree(pid)
    return sum(process_rss_mib(p) for p in pids), len(pids)


@dataclass
class MemorySampler:
    """Samples the tree's RSS in a thread every `interval` s until stopped: peak and last."""

    pid: int
    interval: float = 0.5
    peak_mib: float = 0.0
    last_mib: float = 0.0
    processes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        self.last_mib, self.processes = tree_rss_mib(self.pid)
        self.peak_mib = max(self.peak_mib, self.last_mib)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "MemorySampler":
        self.sample()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.sample()


@dataclass
class LagSampler:
    """The policy lag every `interval` s of a load, in a thread: whether the runner keeps pace
    (the lag bounded, not growing) shows in the series, not in its last value."""

    url: str
    interval: float = 10.0
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds in, events)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                self.samples.append((time.monotonic() - started, policy_lag(self.url)))
            except OSError:  # the daemon is busy past the scrape's timeout: no sample this time
                continue

    def __enter__(self) -> "LagSampler":
        self._thread = threading.Thread(target=self._run, name="lag-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)


# ------------------------------------------------------------------------------------------- CPU

def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time one process has used so far (0 once it has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds used so far by every process of the tree, by pid."""
    return {p: process_cpu_seconds(p) for p in process_tree(pid)}


@dataclass
class CpuMeter:
    """CPU time of the core process and of the rest of its tree over a stretch of load.

    CPU per durable report is a figure that survives a busy machine better than reports/s: it is
    what the load costs, whoever else is running, and it says which process a change helped.
    """

    pid: int
    core_s: float = 0.0
    others_s: float = 0.0
    #: the policy process (setPolicyProcess), counted apart from the web workers
    policy_s: float = 0.0
    wall_s: float = 0.0
    _start: dict[int, float] = field(default_factory=dict)
    _started: float = 0.0

    def __enter__(self) -> "CpuMeter":
        self._start, self._started = tree_cpu_seconds(self.pid), time.monotonic()
        return self

    def __exit__(self, *_exc: object) -> None:
        end = tree_cpu_seconds(self.pid)
        self.wall_s = time.monotonic() - self._started
        used = {p: s - self._start.get(p, 0.0) for p, s in end.items()}
        self.core_s = used.pop(self.pid, 0.0)
        policy = [p for p in used if _is_policy_process(p)]
        self.policy_s = sum(used.pop(p) for p in policy)
        self.others_s = sum(used.values())


def _is_policy_process(pid: int) -> bool:
    try:
        return b"trackalert.policyproc" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


# ------------------------------------------------------------------------------- which code ran

def trackalert_origin(pid: int, launched_from: str | None = None) -> str:
    """The `trackalert` package a running daemon imported.

    Python resolves `-m trackalert` from the working directory it was started in first, then
    PYTHONPATH, then the venv (whose editable install points at one fixed checkout), so a daemon
    started from the wrong directory silently runs other code. This asks the same interpreter,
    in the daemon's start directory and its environment, where `import trackalert` goes. The start
    directory is this process's (DaemonProcess starts the daemon in it) unless told otherwise:
    the daemon's own working directory is no witness, it moves to its config's directory.
    """
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    env = dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)
    executable = os.readlink(f"/proc/{pid}/exe")
    # /proc/pid/exe is the resolved binary, which would lose the venv: use sys.executable, the
    # interpreter DaemonProcess starts, when it is that binary.
    python = sys.executable if os.path.realpath(sys.executable) == executable else executable
    out = subprocess.run(
        [python, "-c", "import trackalert; print(trackalert.__file__)"],
        cwd=launched_from or os.getcwd(), env=env, capture_output=True, text=True, check=True,
        timeout=60,
    ).stdout.strip()
    return str(Path(out).resolve().parent)


def write_json(path: str | None, figures: Any) -> None:
    """The figures for compare.py (one JSON document), when asked for."""
    if path:
        Path(path).write_text(json.dumps(figures, indent=1), encoding="utf-8")
