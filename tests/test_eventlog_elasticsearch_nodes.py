"""Several trackalert nodes on one Elasticsearch log (osmem-server, or TRACKALERT_TEST_ES_URL's
cluster): a background function runs once per due time across the nodes, also when the lease
holder dies; each node runs `report` for the reports it stored, exactly once (at least once
across kill -9), and its helpers see the other nodes' reports."""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
from collections import Counter
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp
import pytest
from elasticsearch import AsyncElasticsearch

from elastic_server import elastic_base, elastic_url  # noqa: F401  (fixtures)
from test_eventlog_elasticsearch_daemon import ran
from test_scheduler import MONDAY
from trackalert.clock import VirtualClock
from trackalert.eventlog.elasticsearch import ElasticEventLog
from trackalert.eventlog.es_client import async_client, parse_elastic_url
from trackalert.lua.host import Host
from trackalert.lua.pool import LuaPool
from trackalert.lua.state import LuaState, StateKind
from trackalert.scheduler import Scheduler
from trackalert.testing import DaemonProcess, basic_auth, listener_config, wait_for

TICKS = """
setBackground("tick", function() _G.ticks = (_G.ticks or 0) + 1 end)
cronScheduleBackgroundFunc("* * * * *", "tick")
setBackground("sweep", function() _G.sweeps = (_G.sweeps or 0) + 1 end)
intervalScheduleBackgroundFunc("00:05:00", "sweep")
"""


class Node:
    """One node: its config and worker states, pool and scheduler on the shared virtual clock,
    and its own log on the shared cluster."""

    def __init__(self, url: str, clock: VirtualClock) -> None:
        self.host = Host(clock=clock)
        self.scheduler = Scheduler(clock, self.host.metrics, lambda: 2, zone=datetime.timezone.utc)
        self.host.scheduler = self.scheduler
        LuaState(StateKind.CONFIG, self.host).execute(TICKS, "trackalert.conf")
        self.workers = [LuaState(StateKind.WORKER, self.host, i) for i in range(2)]
        for worker in self.workers:
            worker.execute(TICKS, "trackalert.conf")
        self.pool = LuaPool(self.workers, clock)
        self.log = ElasticEventLog(parse_elastic_url(url), clock)
        self.alive = False

    async def start(self) -> "Node":
        await self.log.open()
        assert self.log.leases is not None
        self.scheduler.set_lease(self.log.leases.claim)
        await self.scheduler.start(self.pool)
        self.alive = True
        return self

    async def kill(self) -> None:
        """Stops as kill -9 leaves it: nothing is given back (a lease has no release)."""
        if self.alive:
            self.alive = False
            await self.scheduler.stop()
            self.pool.close()
            await self.log.close()

    def count(self, name: str) -> int:
        """How many times the Lua function counted into global `name`, over this node's states."""
        return sum(int(worker.lua.globals()[name] or 0) for worker in self.workers)


async def test_a_background_function_runs_once_per_minute_across_nodes_and_survives_its_holder(
        elastic_url: str) -> None:
    start = MONDAY.timestamp()
    clock = VirtualClock(start)
    a = await Node(elastic_url + "?node=a", clock).start()
    b = await Node(elastic_url + "?node=b", clock).start()
    nodes = [a, b]
    per_minute: list[int] = []
    holders: list[str] = []
    try:
        for minute in range(1, 41):
            if minute == 16:  # the holder of `tick` dies; the other takes the next run
                [holder] = [n for n in nodes if n.log.node == holders[-1]]
                await holder.kill()
                nodes.remove(holder)
            before = sum(n.count("ticks") for n in (a, b))
            await clock.advance(60)
            for node in nodes:
                await node.scheduler.idle()
            per_minute.append(sum(n.count("ticks") for n in (a, b)) - before)
            lease = await nodes[0].log.leases.holder("tick")  # type: ignore[union-attr]
            assert lease is not None and lease["due"] == start + 60 * minute
            holders.append(lease["holder"])
        assert per_minute == [1] * 40, "exactly one run per minute, none lost when the holder died"
        survivor = nodes[0].log.node
        assert set(holders[15:]) == {survivor}
        # every 5 minutes one sweep for the cluster while both live, and after the takeover at
        # most two intervals without one
        sweeps = a.count("sweeps") + b.count("sweeps")
        assert 40 // 5 - 2 <= sweeps <= 40 // 5, sweeps
    finally:
        for node in nodes:
            await node.kill()


# --------------------------------------------------------------------------- two daemons

AUTH = basic_auth()


def config(url: str) -> str:
    return listener_config() + f"""
setEventLog("{url}")
setNumLuaStates(2)
function report(lt)
  local f = io.open("ran.txt", "a")
  f:write(lt.pwhash .. " " .. lt.login .. " " .. countReports({{login=lt.login}}) .. "\\n")
  f:close()
end
setReport(report)
"""


async def send(process: DaemonProcess, numbers: range, login: str | None = None,
               concurrency: int = 8) -> list[int]:
    statuses: list[int] = []
    todo = iter(numbers)

    async def client(session: aiohttp.ClientSession) -> None:
        for i in todo:
            body = json.dumps({"login": login or f"u{i % 9}", "remote": f"192.0.2.{i % 11}",
                               "pwhash": f"p{i}", "success": True})
            try:
                async with session.post(process.url("/command/report"), data=body,
                                        headers=AUTH) as resp:
                    statuses.append(resp.status)
            except aiohttp.ClientError:
                statuses.append(0)  # the daemon was killed under this request

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return statuses


async def searchable(client: AsyncElasticsearch, index: str, login: str) -> int:
    """How many of `login`'s reports a search sees now (no refresh asked: the cluster's own)."""
    return (await client.count(index=index, query={"term": {"login": login}}))["count"]


async def test_two_daemons_each_run_their_reports_once_and_see_each_other(
        tmp_path: Path, elastic_url: str) -> None:
    dir_a, dir_b = tmp_path / "a", tmp_path / "b"
    client = async_client(parse_elastic_url(elastic_url))
    index = parse_elastic_url(elastic_url).prefix + "-events"
    try:
        with DaemonProcess(dir_a, config(elastic_url + "?node=a")) as a, \
                DaemonProcess(dir_b, config(elastic_url + "?node=b")) as b:
            assert await send(a, range(0, 100), login="x") == [200] * 100
            assert await wait_for(lambda: len(ran(dir_a)) == 100, timeout=60)
            # another node's acknowledged reports are searchable after the refresh interval
            assert await wait_for_async(lambda: searchable(client, index, "x"), 100)
            assert await send(b, range(100, 101), login="x") == [200]
            assert await wait_for(lambda: len(ran(dir_b)) == 1, timeout=60)
            assert ran(dir_b) == [["p100", "x", "100"]], "B's helper sees A's 100 reports"

            statuses = await asyncio.gather(send(a, range(1000, 1300)), send(b, range(2000, 2300)))
            assert statuses == [[200] * 300, [200] * 300]
            assert await wait_for(lambda: len(ran(dir_a)) + len(ran(dir_b)) == 701, timeout=90)
            assert b.stop() == 0
            runs_a = Counter(line[0] for line in ran(dir_a))
            runs_b = Counter(line[0] for line in ran(dir_b))
            expected_a = {f"p{i}" for i in [*range(0, 100), *range(1000, 1300)]}
            expected_b = {f"p{i}" for i in [100, *range(2000, 2300)]}
            assert set(runs_a) == expected_a and set(runs_a.values()) == {1}
            assert set(runs_b) == expected_b and set(runs_b.values()) == {1}

            # kill -9 under load: every acknowledged report runs at least once after the restart
            load = asyncio.ensure_future(send(a, range(3000, 3400), concurrency=4))
            assert await wait_for(lambda: len(ran(dir_a)) >= 450, timeout=60)
            a.kill()
            acknowledged = [f"p{i}" for i, s in zip(range(3000, 3400), await load) if s == 200]
        assert len(acknowledged) > 0
        with DaemonProcess(dir_a, config(elastic_url + "?node=a")) as a:
            assert await wait_for(
                lambda: set(acknowledged) <= {line[0] for line in ran(dir_a)}, timeout=60)
            assert a.stop() == 0
        ran_a = {line[0] for line in ran(dir_a)}
        assert not ran_a & expected_b, "node A never ran node B's reports, also after its restart"
    finally:
        await client.close()


async def wait_for_async(probe: Callable[[], Awaitable[int]], wanted: int,
                         timeout: float = 15.0) -> bool:
    """Poll an async count until it equals `wanted`, for at most `timeout` seconds."""
    for _ in range(int(timeout / 0.1)):
        if await probe() == wanted:
            return True
        await asyncio.sleep(0.1)
    return False


def test_the_node_id_is_the_host_name_unless_given_and_must_be_a_plain_name() -> None:
    assert parse_elastic_url("elasticsearch://h/p").node == socket.gethostname()[:64]
    assert parse_elastic_url("elasticsearch://h/p?node=web-2.dc1").node == "web-2.dc1"
    for bad in ("a:b", "a b", "x" * 65, "é"):
        with pytest.raises(ValueError, match="node id"):
            parse_elastic_url(f"elasticsearch://h/p?node={bad}")


async def test_the_runner_steps_from_each_of_a_nodes_blocks_to_its_next(elastic_url: str) -> None:
    """Blocks of two nodes interleave in seq order; `seq_after` leads the policy runner from one
    of node A's blocks straight to its next, so the events handed over in memory are run
    without reading the log back (and B's seqs are never A's to wait for)."""
    from test_eventlog_elasticsearch import report

    clock = VirtualClock()
    a = ElasticEventLog(parse_elastic_url(elastic_url + "?node=a"), clock)
    b = ElasticEventLog(parse_elastic_url(elastic_url + "?node=b"), clock)
    await a.open()
    await b.open()
    try:
        for i in range(20):  # alternate batches of 1-3 reports
            for log in (a, b):
                await asyncio.gather(*(log.append(report(i)) for _ in range(1 + i % 3)))
        own = [e.seq for e in await a.read(0, 1000)]
        assert len(own) == sum(1 + i % 3 for i in range(20))
        assert [a.seq_after(seq) for seq in own[:-1]] == own[1:]
        assert await a.last_seq() == own[-1] and await b.last_seq() > own[-1]
    finally:
        await a.close()
        await b.close()
