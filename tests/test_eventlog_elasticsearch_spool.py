"""The Elasticsearch log's spool (es_spool.py): nothing is lost while the cluster is away.

The cluster is osmem-server, one of its own for this module, *stopped* with SIGSTOP and
restarted with SIGCONT: requests hang until the client's timeout, as with a cluster that stops
answering, and what was in flight when it stopped is executed once it resumes (so a bulk the
log gave up on may be stored after all: the spool must not store it twice). osmem-server keeps
its data in memory, so stopping its process for good would lose what it stored; a real cluster
(TRACKALERT_TEST_ES_URL) cannot be stopped from here, hence these tests need osmem-server.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import time
import uuid
from pathlib import Path
from typing import AsyncIterator, Iterator

import aiohttp
import pytest

from elastic_server import ENV, with_prefix
from eventlog_contract import report
from trackalert.clock import VirtualClock
from trackalert.eventlog import Appended, EventLogError
from trackalert.eventlog.base import Event
from trackalert.eventlog.elasticsearch import ElasticEventLog, SpoolStats
from trackalert.eventlog.es_docs import delivery_ids
from trackalert.eventlog.es_client import async_client, parse_elastic_url
from trackalert.eventlog.es_docs import to_doc
from trackalert.eventlog.es_spool import Spool, Spooled
from trackalert.lua.api_console import format_eventlog_summary
from test_daemon import RECORDING_POLICY
from trackalert.testing import DaemonProcess, basic_auth, wait_for

AUTH = basic_auth()


class Stoppable:
    """A private osmem-server whose process can be stopped and resumed."""

    def __init__(self) -> None:
        from osmem_server import OsmemServer

        self.server = OsmemServer.start(addr="127.0.0.1:0", japanese=False)
        self.base = "elasticsearch://" + self.server.url.split("://", 1)[1]
        self.stopped = False

    def stop(self) -> None:
        """SIGSTOP the server and return once every one of its threads is stopped.

        kill() only queues the signal: until the thread it picked is scheduled and starts the
        group stop, the server's other threads still answer. On a loaded machine (parallel
        workers, load 15-20) that window took a whole bulk: an append after stop() was stored.
        """
        os.kill(self.server.pid, signal.SIGSTOP)
        self.stopped = True
        for _ in range(2000):  # bounded: 10 s of 5 ms polls
            if all(thread_state(stat) in ("T", "") for stat in Path(f"/proc/{self.server.pid}/task").glob("*/stat")):
                return
            time.sleep(0.005)
        raise AssertionError(f"osmem-server {self.server.pid} did not stop")

    def resume(self) -> None:
        os.kill(self.server.pid, signal.SIGCONT)
        self.stopped = False


def thread_state(stat: Path) -> str:
    """The state letter of /proc/PID/task/TID/stat (after the parenthesised command name);
    "" when the thread has gone."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


@pytest.fixture(scope="module")
def stoppable() -> Iterator[Stoppable]:
    if os.environ.get(ENV):
        pytest.skip("stopping the cluster needs osmem-server, not the cluster of " + ENV)
    cluster = Stoppable()
    try:
        yield cluster
    finally:
        cluster.resume()
        cluster.server.close()


@pytest.fixture
def url(stoppable: Stoppable, tmp_path: Path) -> Iterator[str]:
    """A log URL (an index prefix of its own) with a spool file and short timeouts; the server
    runs again afterwards (the private server and its indices go at the module's end)."""
    yield with_prefix(stoppable.base, f"spool-{uuid.uuid4().hex[:12]}") + \
        f"?spool={tmp_path / 'spool.db'}&timeout=0.3"
    stoppable.resume()


@pytest.fixture
async def open_log(url: str) -> AsyncIterator[ElasticEventLog]:
    log = ElasticEventLog(parse_elastic_url(url), VirtualClock(start=1_700_000_000.0))
    await log.open()
    yield log
    await log.close()


async def test_reports_sent_while_the_cluster_is_stopped_arrive_once_in_order(
        open_log: ElasticEventLog, stoppable: Stoppable) -> None:
    log = open_log
    clock = log.clock
    assert isinstance(log.stats, SpoolStats) and isinstance(clock, VirtualClock)
    heard: list[Event] = []
    log.add_listener(heard.extend)
    before = await asyncio.gather(*(log.append(report(i), delivery_id=f"d{i}") for i in range(20)))
    assert sorted(a.seq for a in before) == list(range(1, 21)) and not log.spooling
    stoppable.stop()
    # a concurrent burst (the first bulk times out: it and everything after it is spooled)...
    burst = await asyncio.gather(*(log.append(report(i), delivery_id=f"d{i}" if i % 2 else None)
                                   for i in range(20, 60)))
    assert burst == [Appended(0, False)] * 40 and log.spooling
    await clock.advance(30)
    for i in range(60, 100):  # ... then one at a time, each answered from the spool
        assert await log.append(report(i), delivery_id=f"d{i}") == Appended(0, False)
    assert await log.append(report(61), delivery_id="d61") == Appended(0, False)  # a retry
    assert log.stats.spool_depth == 81
    assert log.stats.spool_age_seconds >= 30
    shown = format_eventlog_summary(await log.describe())
    assert "Spool:        81 reports, oldest 30.0 s" in shown and "Cluster:      away:" in shown
    stoppable.resume()
    assert await wait_for(lambda: not log.spooling, timeout=30)
    assert log.stats.spool_depth == 0 and log.stats.spool_age_seconds == 0
    stored = await log.read(0, 1000)
    assert [e.report.login for e in stored] == [f"user{i}" for i in range(100)]
    seqs = [e.seq for e in stored]
    assert seqs == sorted(set(seqs)), "every report once, in the order it came"
    assert [e.seq for e in heard] == seqs, "the listeners heard each once, in log order"
    received = [e.received for e in stored]
    assert received == sorted(received) and received[-1] >= received[59] + 30
    after = await log.append(report(100))
    assert after.seq > seqs[-1] and not after.duplicate, "live again once the spool is empty"
    assert "Spool:        0 reports" in format_eventlog_summary(await log.describe())


async def test_a_cluster_stopped_twice_under_concurrent_load_loses_nothing(
        open_log: ElasticEventLog, stoppable: Stoppable) -> None:
    """32 appenders, each sending its reports one after another (some with delivery ids, some
    of those twice: a wforce retry) while the server is stopped and resumed twice at random
    moments: every report is answered, stored once, and each appender's reports are in the
    order it sent them; the listeners hear every stored event once, in seq order."""
    log = open_log
    rng = random.Random(11)
    heard: list[Event] = []
    log.add_listener(heard.extend)
    answered: dict[str, Appended] = {}
    per_sender = 60

    async def sender(n: int) -> None:
        for k in range(per_sender):
            login = f"s{n:02d}-{k:02d}"
            delivery = f"{login}-d" if k % 3 else None
            answered[login] = await log.append(report(0, login=login), delivery_id=delivery)
            if delivery and k % 5 == 0:  # the same delivery again: stored once
                assert (await log.append(report(0, login=login), delivery_id=delivery)).seq in (
                    0, answered[login].seq)
            await asyncio.sleep(rng.random() * 0.004)

    async def outages() -> None:
        for _ in range(2):
            await asyncio.sleep(0.1 + rng.random() * 0.3)
            stoppable.stop()  # longer than the client's 3 tries of 0.3 s: a bulk gives up
            await asyncio.sleep(1.2 + rng.random() * 0.5)
            stoppable.resume()

    await asyncio.gather(outages(), *(sender(n) for n in range(32)))
    assert len(answered) == 32 * per_sender
    assert any(a.seq == 0 for a in answered.values()), "some were answered from the spool"
    assert await wait_for(lambda: not log.spooling, timeout=60)
    stored = await log.read(0, 10_000)
    logins = [e.report.login for e in stored]
    assert sorted(logins) == sorted(answered), "every report stored, and once"
    for n in range(32):
        mine = [login for login in logins if login.startswith(f"s{n:02d}-")]
        assert mine == sorted(mine), f"sender {n}'s reports in the order it sent them"
    assert [e.seq for e in heard] == [e.seq for e in stored]
    for event in stored:  # a live answer names the seq its report got
        assert answered[event.report.login].seq in (0, event.seq)


async def test_a_spooled_retry_of_a_report_sent_before_repeats_it(open_log: ElasticEventLog) -> None:
    """What made the test above fail now and then: a forwarded batch holding a report sent
    before the cluster went away (its seq and `_id` kept in the spool) and a wforce retry of
    it spooled meanwhile. The retry repeats the sent report; it must not take the delivery's
    `_id` too (the bulk's 409 then made the stored report look stored elsewhere, and the
    listeners never heard it)."""
    from trackalert.eventlog.base import delivery_key
    from trackalert.eventlog.elasticsearch import _Append

    loop = asyncio.get_running_loop()
    sent_report = report(0, login="sent")
    key = delivery_key(sent_report, "wf-1", None)
    assert key is not None
    sent = _Append(sent_report, "wf-1", key, loop.create_future())
    sent.seq, sent.doc_id, sent.received = 41, delivery_ids(key)[0], 1.0
    retry = _Append(sent_report, "wf-1", key, loop.create_future())
    other_report = report(0, login="other")
    other = _Append(other_report, "wf-2", delivery_key(other_report, "wf-2", None),
                    loop.create_future())
    duplicates, collisions = await open_log._sort_out([sent, retry, other])
    assert duplicates == {1: sent} and collisions == []
    assert retry.doc_id is None and other.doc_id not in (None, sent.doc_id)


async def test_a_start_without_the_cluster_needs_a_spool_that_has_seen_it(
        url: str, stoppable: Stoppable, tmp_path: Path) -> None:
    stoppable.stop()
    log = ElasticEventLog(parse_elastic_url(url), VirtualClock())
    with pytest.raises(EventLogError, match="has never seen the cluster"):
        await log.open()


async def test_a_refused_certificate_is_no_reason_to_spool(
        url: str, open_log: ElasticEventLog, stoppable: Stoppable) -> None:
    """Waiting does not fix a TLS failure (here: https to a plain-HTTP server): even with a
    spool that has seen the cluster, the start fails instead of spooling for ever."""
    await open_log.append(report(0))  # the spool has seen the cluster
    await open_log.close()
    log = ElasticEventLog(parse_elastic_url(url.replace("?", "?tls=1&", 1)), VirtualClock())
    with pytest.raises(EventLogError, match="does not start without its event log"):
        await log.open()
    assert not log.spooling


async def test_a_forward_repeated_after_a_crash_stores_nothing_twice(
        url: str, stoppable: Stoppable, tmp_path: Path) -> None:
    """The seqs a forward is about to use are in the spool before its bulk: rows left behind by
    a crash after the bulk are sent again under the same `_id`s and found stored."""
    first = ElasticEventLog(parse_elastic_url(url), VirtualClock())
    await first.open()
    await first.append(report(0))
    stoppable.stop()
    spooled = await asyncio.gather(*(first.append(report(i)) for i in range(1, 11)))
    assert spooled == [Appended(0, False)] * 10
    stoppable.resume()
    assert await wait_for(lambda: not first.spooling, timeout=30)
    await first.close()
    spool = Spool(str(tmp_path / "spool.db"))  # put back the rows as a crash would leave them
    await spool.open()
    stored = [e for e in await stored_events(url) if e.seq > 1]
    await spool.add([Spooled(e.received, to_doc(e.seq, e.received, e.report, None, None), None,
                             None, e.seq, f"s{e.seq}") for e in stored])
    await spool.close()
    again = ElasticEventLog(parse_elastic_url(url), VirtualClock())
    heard: list[Event] = []
    again.add_listener(heard.extend)
    await again.open()
    try:
        assert await wait_for(lambda: not again.spooling, timeout=30)
        assert [e.seq for e in heard] == [e.seq for e in stored]
        assert [e.report.login for e in await again.read(0, 100)] == [
            f"user{i}" for i in range(11)]
    finally:
        await again.close()


async def stored_events(url: str) -> list[Event]:
    log = ElasticEventLog(parse_elastic_url(url.split("?")[0]), VirtualClock())
    await log.open()
    try:
        return await log.read(0, 1000)
    finally:
        await log.close()


# --------------------------------------------------------------------------- the daemon


def config(url: str) -> str:
    """test_daemon's policy (each report's login into ran.txt) on the spooled log."""
    return RECORDING_POLICY + f'setEventLog("{url}")\n'


def ran(directory: Path) -> list[str]:
    path = directory / "ran.txt"
    return path.read_text().split() if path.exists() else []


async def send(process: DaemonProcess, numbers: range, concurrency: int = 1,
               statuses: list[int] | None = None) -> list[int]:
    """POST a report per number (login u000, u001, ...); the statuses, in order for one sender."""
    statuses = [] if statuses is None else statuses
    todo = iter(numbers)

    async def client(session: aiohttp.ClientSession) -> None:
        for i in todo:
            body = json.dumps({"login": f"u{i:03d}", "remote": "192.0.2.7", "success": True})
            async with session.post(process.url("/command/report"), data=body, headers=AUTH) as resp:
                statuses.append(resp.status)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return statuses


async def metric(process: DaemonProcess, name: str) -> float:
    async with aiohttp.ClientSession() as session:
        async with session.get(process.url("/metrics"), headers=AUTH) as resp:
            text = await resp.text()
    [value] = [line.split()[1] for line in text.splitlines() if line.startswith(name + " ")]
    return float(value)


@pytest.mark.parametrize("web_processes", [0, 2])
async def test_a_daemon_killed_with_a_full_spool_forwards_it_after_restart(
        url: str, stoppable: Stoppable, tmp_path: Path, web_processes: int) -> None:
    policy = config(url) + f"setNumWebProcesses({web_processes})\n"
    with DaemonProcess(tmp_path, policy) as process:
        assert await send(process, range(0, 30), concurrency=4) == [200] * 30
        assert await wait_for(lambda: len(ran(tmp_path)) == 30, timeout=30)
        statuses: list[int] = []
        sending = asyncio.create_task(send(process, range(30, 60), statuses=statuses))
        assert await wait_for(lambda: len(statuses) >= 5, timeout=30)
        stoppable.stop()  # mid-load: the one in flight and the rest are answered from the spool
        assert await sending == [200] * 30
        spooled = await metric(process, "trackalert_eventlog_spool_depth")
        assert spooled >= 1  # those after the stop (how many went live first depends on timing)
        assert await metric(process, "trackalert_eventlog_spool_age_seconds") > 0
        ran_before = len(ran(tmp_path))
        process.kill()
    # restarted while the cluster is still away: it starts on the spool and keeps answering
    with DaemonProcess(tmp_path, policy) as process:
        assert await send(process, range(60, 70)) == [200] * 10
        assert await metric(process, "trackalert_eventlog_spool_depth") == spooled + 10
        assert len(ran(tmp_path)) == ran_before, "no policy runs before the reports are stored"
        stoppable.resume()
        assert await wait_for(lambda: len(ran(tmp_path)) >= 70, timeout=30)
        for _ in range(200):  # removed from the spool right after the listeners heard them
            if await metric(process, "trackalert_eventlog_spool_depth") == 0:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the spool was not emptied")
        assert process.stop() == 0
    expected = [f"u{i:03d}" for i in range(70)]
    assert ran(tmp_path)[30:] == expected[30:], "each report ran once, in order"
    stored = await stored_events(url)
    assert [e.report.login for e in stored[30:]] == expected[30:]
    assert sorted(e.report.login for e in stored) == expected


# --------------------------------------------------------------------------- several nodes


class Relay:
    """A TCP relay on loopback in front of the server, for one node: `cut` refuses new
    connections and drops the open ones, so the cluster is away for that node alone while the
    other nodes keep storing."""

    def __init__(self, port: int) -> None:
        self._target, self.port = port, 0
        self._server: asyncio.AbstractServer | None = None
        self._open: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._open:
            writer.transport.abort()
        self._open.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._open |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer),
                             return_exceptions=True)


async def cluster_events(url: str) -> list[dict]:
    """Every event document of the prefix, in seq order (all nodes)."""
    settings = parse_elastic_url(url)
    async with async_client(settings) as client:
        index = f"{settings.prefix}-events"
        await client.indices.refresh(index=index)
        hits = (await client.search(index=index, size=10_000, sort=[{"seq": "asc"}],
                                    source=["seq", "received", "node", "login"]))["hits"]["hits"]
    return [hit["_source"] for hit in hits]


async def reopened(url: str, clock: VirtualClock, heard: list[Event]) -> ElasticEventLog:
    log = ElasticEventLog(parse_elastic_url(url), clock)
    log.add_listener(heard.extend)
    await log.open()
    return log


async def test_a_node_spooling_while_another_stores_never_puts_received_back_in_seq_order(
        stoppable: Stoppable, tmp_path: Path) -> None:
    """Node a reaches the server through a relay that is cut twice; node b keeps storing
    meanwhile the first time and not the second. a's spooled reports are stored with its node
    id after b's (seqs taken at the forward), run by a's listeners alone; `received` never goes
    back in seq order: the first outage's reports take b's newest stamp, the second's keep their
    arrival times (later than b's newest then). A spooled start of a (relay cut) has a's own
    last seq from the spool, not the cluster's."""
    shared = with_prefix(stoppable.base, f"spool-{uuid.uuid4().hex[:12]}")
    relay = Relay(int(stoppable.base.rsplit(":", 1)[1]))
    await relay.start()
    spool = f"spool={tmp_path / 'a.db'}&timeout=0.3&node=a"
    a_url = shared.replace(stoppable.base.split("://")[1], f"127.0.0.1:{relay.port}") + "?" + spool
    clock = VirtualClock(start=1_700_000_000.0)
    a = ElasticEventLog(parse_elastic_url(a_url), clock)
    b = ElasticEventLog(parse_elastic_url(shared + "?node=b"), clock)
    heard: list[Event] = []
    a.add_listener(heard.extend)
    await a.open()
    await b.open()
    try:
        for i in range(10):
            await asyncio.gather(a.append(report(i, login=f"a{i}")),
                                 b.append(report(i, login=f"b{i}")))
            await clock.advance(1)
        await relay.cut()
        arrivals: dict[str, float] = {}
        for i in range(10, 40):  # a spools while b stores, both at the same times
            arrivals[f"a{i}"] = clock.time()
            assert (await a.append(report(i, login=f"a{i}"))).seq == 0
            await b.append(report(i, login=f"b{i}"))
            await clock.advance(1)
        assert a.spooling and a.stats.spool_depth == 30
        b_newest = clock.time() - 1
        await clock.advance(5)
        await relay.start()
        assert await wait_for(lambda: not a.spooling, timeout=30)
        await a.close()
        for i in range(40, 45):  # b stores while a is down, then nothing during a's second outage
            await b.append(report(i, login=f"b{i}"))
            await clock.advance(1)
        a = await reopened(a_url, clock, heard)  # it reads the cluster's counter (b's seqs)
        await relay.cut()
        for i in range(40, 50):
            arrivals[f"a{i}"] = clock.time()
            assert (await a.append(report(i, login=f"a{i}"))).seq == 0
            await clock.advance(1)
        await a.close()  # 10 reports stay in the spool; a restarts while the cluster is away
        a = await reopened(a_url, clock, heard)
        assert a.spooling and a.stats.spool_depth == 10
        own = [e["seq"] for e in await cluster_events(shared) if e["node"] == "a"]
        assert await a.last_seq() == own[-1], "this node's last seq, not the cluster's"
        assert await a.last_seq() < max(e["seq"] for e in await cluster_events(shared))
        await relay.start()
        assert await wait_for(lambda: not a.spooling, timeout=30)
        events = await cluster_events(shared)
        received = [e["received"] for e in events]
        assert received == sorted(received), "received never goes back in seq order"
        mine = [e for e in events if e["node"] == "a"]
        assert [e["login"] for e in mine] == [f"a{i}" for i in range(50)]
        assert [e["login"] for e in events if e["node"] == "b"] == [f"b{i}" for i in range(45)]
        assert min(e["seq"] for e in mine[10:40]) > max(
            e["seq"] for e in events if e["login"] == "b39"), "forwarded after b's reports"
        assert [e["received"] for e in mine[10:40]] == [b_newest] * 30, "moved to b's newest"
        assert [e["received"] for e in mine[40:]] == [arrivals[f"a{i}"] for i in range(40, 50)]
        assert [e.report.login for e in heard] == [f"a{i}" for i in range(50)]
        assert [e.seq for e in heard] == [e["seq"] for e in mine]
        assert await a.last_seq() == mine[-1]["seq"]
    finally:
        await a.close()
        await b.close()
        await relay.cut()


# --------------------------------------------------------------------------- the projection


def projected_config(url: str) -> str:
    """Each report's login into ran.txt, after a projected helper call (which may fail while the
    cluster is away: the line is written anyway), on a console to read the projection's state."""
    from test_console_server import KEY
    from trackalert.console.protocol import encode_key
    from trackalert.testing import listener_config

    return listener_config() + f"""
controlSocket("127.0.0.1:0")
setKey("{encode_key(KEY)}")
setNumLuaStates(2)
setEventLog("{url}")
function report(lt)
  pcall(countReports, {{login=lt.login, success=true, window="1d"}})
  pcall(countDistinct, "login", {{remote=lt.remote:tostring(), success=true, window="1h"}})
  local f = io.open("ran.txt", "a")
  f:write(lt.login .. "\\n")
  f:close()
end
setReport(report)
"""


def projection_line(process: DaemonProcess) -> str:
    from test_windows import show_event_log

    shown = show_event_log(process)
    [line] = [line for line in shown.splitlines() if line.startswith("Projection:")]
    return line


async def test_the_cluster_stopped_mid_run_with_the_projection_following_another_node(
        url: str, stoppable: Stoppable, tmp_path: Path) -> None:
    """A daemon whose projection follows another node's events (written here, node `other`):
    the server stops mid-load; the spool takes the reports, every one gets its 200; the
    projection drops its counters or rebuilds; once the server is back every report runs,
    once, in order, and the projection answers again with the other node's events."""
    other = ElasticEventLog(parse_elastic_url(url.split("?")[0] + "?node=other&timeout=5"),
                            VirtualClock(start=1_700_000_000.0))
    await other.open()
    try:
        with DaemonProcess(tmp_path, projected_config(url)) as process:
            for i in range(0, 20, 5):
                assert await send(process, range(i, i + 5)) == [200] * 5
                await other.append(report(i))  # a block of the other node between ours
            assert await wait_for(lambda: len(ran(tmp_path)) == 20, timeout=60)
            sent, line = await until_answered(process, tmp_path, 20, 0)
            assert "other nodes' events:" in line, line
            statuses: list[int] = []
            sending = asyncio.create_task(send(process, range(sent, sent + 30), statuses=statuses))
            assert await wait_for(lambda: len(statuses) >= 5, timeout=30)
            stoppable.stop()  # mid-load: the rest are answered from the spool
            assert await sending == [200] * 30
            assert await metric(process, "trackalert_eventlog_spool_depth") >= 1
            stoppable.resume()
            sent += 30
            await other.append(report(99))
            assert await send(process, range(sent, sent + 10)) == [200] * 10
            sent += 10
            assert await wait_for(lambda: len(ran(tmp_path)) >= sent, timeout=60)
            sent, line = await until_answered(process, tmp_path, sent, _from_it(line))
            assert process.stop() == 0
        assert ran(tmp_path) == [f"u{i:03d}" for i in range(sent)], "each report ran once, in order"
    finally:
        await other.close()


async def until_answered(process: DaemonProcess, directory: Path, sent: int,
                         answered: int) -> tuple[int, str]:
    """Send one report at a time until the projection has answered more countReports calls
    than `answered` (its shapes are built in the background and switch on at a report after
    that); how many reports have been sent then, and the console's projection line."""
    for _ in range(60):
        assert await send(process, range(sent, sent + 1)) == [200]
        sent += 1
        assert await wait_for(lambda: len(ran(directory)) >= sent, timeout=60)
        line = await asyncio.to_thread(projection_line, process)
        if _from_it(line) > answered:
            return sent, line
    raise AssertionError(f"the projection does not answer: {line}")


def _from_it(line: str) -> int:
    found = re.search(r"countReports (\d+) from it", line)
    return int(found[1]) if found else 0
