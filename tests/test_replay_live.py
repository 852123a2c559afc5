"""The replay against real daemons: a generated month with planted attacks goes through a daemon
running the starter policies with a real webhook receiver, and the replay of that daemon's log
gives the same alerts field for field; a replay of the file of a daemon that is ingesting at the
same time sees the log as it was when it started, and the daemon misses nothing.

How live and replayed alerts are matched: the daemon's `received` is its real clock (the month
is in the reports' `t`), so the comparison is on seq. Each live delivery's X-Wforce-Delivery is
`caused_delivery_id("report <seq>", hook, body)`: finding the replayed alert whose seq gives the
live id for the live body proves seq, hook and body equal; login, remote and time are then those
of event seq in the daemon's log.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from test_policies import AUTH, config, stream
from trackalert.testing import DaemonProcess, basic_auth, listener_config, wait_for
from trackalert.webhooks import CustomWebHook, caused_delivery_id

from test_replay_engine import replay


async def receiver(deliveries: list[tuple[dict[str, str], bytes]]) -> tuple[web.AppRunner, int]:
    async def hook(request: web.Request) -> web.Response:
        deliveries.append((dict(request.headers), await request.read()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/alerts", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def live_month(directory: Path) -> tuple[list[tuple[dict[str, str], bytes]], str, Path]:
    """The planted month through a real daemon; the deliveries received (first copy of each)."""
    deliveries: list[tuple[dict[str, str], bytes]] = []
    runner, port = await receiver(deliveries)
    conf = config(port)
    try:
        with DaemonProcess(directory, conf) as daemon:
            async with aiohttp.ClientSession() as session:
                for body in stream():
                    async with session.post(daemon.url("/command/report"), json=body, headers=AUTH) as resp:
                        assert resp.status == 200, await resp.text()

                async def outbox_empty() -> bool:
                    async with session.get(daemon.url("/metrics"), headers=AUTH) as resp:
                        text = await resp.text()
                    return ('trackalert_policy_lag_events 0.0' in text
                            and "\ntrackalert_webhook_outbox_depth 0.0" in text)

                for _ in range(600):  # bounded: until every report ran and every alert is sent
                    if await outbox_empty():
                        break
                    await asyncio.sleep(0.1)
                assert await outbox_empty(), daemon.output()[-2000:]
    finally:
        await runner.cleanup()
    first: dict[str, tuple[dict[str, str], bytes]] = {}
    for headers, body in deliveries:  # at least once: a retry repeats its id
        first.setdefault(headers["X-Wforce-Delivery"], (headers, body))
    return list(first.values()), conf, directory / "trackalert-events.db"


def test_the_replay_of_a_live_month_gives_the_live_alerts_field_for_field(tmp_path: Path) -> None:
    live, conf, log = asyncio.run(live_month(tmp_path / "live"))
    status, alerts, summary = replay(tmp_path, conf, log)
    assert status == 0, summary
    assert summary["events"] == len(stream())
    assert len(alerts) == len(live) > 5
    hook = CustomWebHook(id=1, name="alerts", url="")
    with sqlite3.connect(log) as db:
        logged = {seq: (login, remote, received) for seq, login, remote, received
                  in db.execute("SELECT seq, login, remote, received FROM events")}
    unmatched = list(alerts)
    for headers, body in live:
        decoded = json.loads(body)
        candidates = [a for a in unmatched if a["hook"] == headers["X-Wforce-Event"]
                      and a["body"] == decoded
                      and caused_delivery_id(f"report {a['seq']}", hook, body) == headers["X-Wforce-Delivery"]]
        assert len(candidates) == 1, (headers, body)
        alert = candidates[0]
        unmatched.remove(alert)
        assert alert["policy"] == decoded["policy"]
        assert (alert["login"], alert["remote"], alert["time"]) == logged[alert["seq"]]
    assert unmatched == []
    assert {a["policy"] for a in alerts} == {"new_country", "new_device", "impossible_travel",
                                            "password_spray", "account_attack", "pwhash_spray"}
    assert summary["alerts_per_policy"]["password_spray"] == 2


EVERY_EVENT = """addCustomWebHook("seen", {url="http://192.0.2.1/never"})
setReport(function(lt)
  runCustomWebHook("seen", jsonEncode({policy="seen", before=countReports({login=lt.login}),
                                       fails=countReports({remote=lt.remote, success=false, window="1h"})}))
end)
"""


def report(i: int) -> dict[str, Any]:
    return {"login": f"user{i % 50}", "remote": f"198.51.100.{i % 20}", "t": 1_767_225_600.0 + i,
            "success": i % 4 != 0, "pwhash": f"{i % 7:02x}", "protocol": "imap"}


async def ingest_while_replaying(directory: Path, replay_conf: Path) -> tuple[int, int, int, int, Path, str]:
    """A daemon ingesting at 32 connections while a replay subprocess reads its file."""
    acked = 0
    with DaemonProcess(directory, listener_config() + "setReport(function(lt) end)\n") as daemon:
        log = directory / "trackalert-events.db"
        async with aiohttp.ClientSession() as session:
            async def post(i: int) -> None:
                nonlocal acked
                async with session.post(daemon.url("/command/report"), json=report(i),
                                        headers=basic_auth()) as resp:
                    assert resp.status == 200, await resp.text()
                    acked += 1

            async def poster(first: int, stop: asyncio.Event) -> None:
                i = first
                while not stop.is_set() and i < first + 100_000:
                    await post(i)
                    i += 32

            for start in range(0, 3000, 100):
                await asyncio.gather(*(post(i) for i in range(start, start + 100)))
            before = acked
            stop = asyncio.Event()
            posters = [asyncio.create_task(poster(3000 + k, stop)) for k in range(32)]
            assert await wait_for(lambda: acked > before + 200)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "trackalert.replay.cli", "--config", str(replay_conf), "--log",
                str(log), "-q", "--out", str(directory / "during.ndjson"),
                "--summary-json", str(directory / "during.json"))
            started = acked
            status = await asyncio.wait_for(proc.wait(), timeout=300)
            during = acked - started
            stop.set()
            await asyncio.gather(*posters)
        output = daemon.output()
    return status, before, during, acked, log, output


def test_replaying_the_file_of_a_daemon_that_is_ingesting(tmp_path: Path) -> None:
    conf = tmp_path / "every.conf"
    conf.write_text(EVERY_EVENT)
    directory = tmp_path / "daemon"
    status, before, during, acked, log, output = asyncio.run(ingest_while_replaying(directory, conf))
    assert status == 0
    assert during > 100, "the daemon kept acknowledging reports while the replay read its file"
    with sqlite3.connect(log) as db:
        assert db.execute("SELECT count(*) FROM events").fetchone()[0] == acked, output[-2000:]
    summary = json.loads((directory / "during.json").read_text())
    seen = summary["events"]
    assert before < seen < acked
    during_alerts = (directory / "during.ndjson").read_text().splitlines()
    assert [json.loads(line)["seq"] for line in during_alerts] == list(range(1, seen + 1))
    # the same as replaying, once the daemon stopped, the events that were there at the start
    status, final, _ = replay(tmp_path, EVERY_EVENT, log)
    assert status == 0 and len(final) == acked
    assert [json.dumps(a, separators=(",", ":"), ensure_ascii=False) for a in final[:seen]] == during_alerts
