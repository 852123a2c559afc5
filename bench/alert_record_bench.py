"""What recording alerts costs a `runCustomWebHook` call, in the Lua worker thread that waits for it.

    .venv/bin/python bench/alert_record_bench.py [--calls 2000] [--tree DIR]

One worker Lua state calls runCustomWebHook --calls times (distinct JSON bodies, as the starter
policies send) into a fresh outbox; when the tree has alert records (WebHooks.alerts) they go
to a fresh SQLite event log's alerts table. `--tree` runs another checkout's code (e.g. the base
commit in a `git worktree`) with this script, for a side-by-side comparison. Prints the wall and
CPU microseconds per call of this process; asserts nothing. The sender is not started: only the
call's own cost is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from pathlib import Path


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(calls: int) -> tuple[float, float, bool]:
    from trackalert.clock import VirtualClock
    from trackalert.eventlog.sqlite import SQLiteEventLog
    from trackalert.lua.host import Host
    from trackalert.lua.state import LuaState, StateKind
    from trackalert.settings import Settings
    from trackalert.webhooks import WebHooks

    with tempfile.TemporaryDirectory(prefix="alert-bench-") as directory:
        clock = VirtualClock(1_700_000_000.0)
        host = Host(settings=Settings(config_dir=directory), clock=clock)
        host.webhooks = WebHooks(host.settings, host.metrics, clock)
        log = SQLiteEventLog(Path(directory) / "events.db", clock)
        await log.open()
        recording = hasattr(host.webhooks, "alerts")
        if recording:
            host.webhooks.alerts = log.alerts()
        LuaState(StateKind.CONFIG, host).execute(
            'addCustomWebHook("alerts", {url="http://127.0.0.1:9/alerts"})', "bench.conf")
        worker = LuaState(StateKind.WORKER, host)
        worker.execute('function send(i) return runCustomWebHook("alerts", jsonEncode({policy="p", '
                       'login="user" .. i, remote="192.0.2.1", n=i})) end', "bench.conf")
        send = worker.lua.globals().send
        send(0)  # opens the outbox
        wall0, cpu0 = time.perf_counter(), cpu()
        for i in range(1, calls + 1):
            assert send(i)
        wall, used = time.perf_counter() - wall0, cpu() - cpu0
        await log.close()
        host.webhooks.outbox().close()
    return wall / calls * 1e6, used / calls * 1e6, recording


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    wall, used, recording = asyncio.run(run(args.calls))
    import trackalert

    where = Path(trackalert.__file__).resolve().parent.parent
    print(f"{where} recording={recording}: {args.calls} calls, {wall:.0f} µs wall/call, "
          f"{used:.0f} µs CPU/call")


if __name__ == "__main__":
    main()
