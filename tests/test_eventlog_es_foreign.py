"""The window projection on a cluster two nodes write to (eventlog/foreign.py, es_foreign.py).

Two Elasticsearch logs (nodes a and b) on one server (osmem-server, or the cluster of
TRACKALERT_TEST_ES_URL) append interleaved: node b's projection, fed the other node's events,
answers every starter question (and recentReports/lastSeen) as node b's queries answer as of
the same report once a's events are searchable; an event of a above the report being judged is
held back until the runner passes it; a poll the cluster refuses drops the counters (the
queries answer) and the projection rebuilds once the cluster answers. Driven from a worker
thread, as the policy runner drives it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any, AsyncIterator

import pytest

from elastic_server import elastic_base, elastic_url  # noqa: F401  (fixtures)
from test_eventlog_elasticsearch_spool import Relay
from test_eventlog_es_fields import count
from test_recent import answer as recent_answer, recent_calls
from test_windows import HOUR, START, history, parsed, projection_answer, starter_calls
from trackalert.clock import VirtualClock
from trackalert.eventlog.base import Event
from trackalert.eventlog.elasticsearch import ElasticEventLog
from trackalert.eventlog.es_client import async_client, parse_elastic_url
from trackalert.eventlog.filters import Filter
from trackalert.eventlog.foreign import ForeignFeed
from trackalert.eventlog.windows import WindowProjection
from trackalert.report import Report


def node_url(url: str, node: str, extra: str = "") -> str:
    return f"{url}?node={node}{extra}"


@pytest.fixture
async def nodes(elastic_url: str) -> AsyncIterator[tuple[ElasticEventLog, ElasticEventLog, VirtualClock]]:
    clock = VirtualClock(start=START)
    a = ElasticEventLog(parse_elastic_url(node_url(elastic_url, "a")), clock)
    b = ElasticEventLog(parse_elastic_url(node_url(elastic_url, "b")), clock)
    await a.open()
    await b.open()
    try:
        yield a, b, clock
    finally:
        await b.close()
        await a.close()


async def searchable(log: ElasticEventLog) -> None:
    """Refresh the events index, as its refresh interval does on a real cluster: the feed polls
    without refreshing (es_foreign.py), the queries refresh for their node's own events."""
    client = async_client(log.settings)
    try:
        await client.indices.refresh(index=log.events_index)
    finally:
        await client.close()


async def append_interleaved(rng: random.Random, a: ElasticEventLog, b: ElasticEventLog,
                             clock: VirtualClock, n: int) -> list[Event]:
    """`n` reports of a random history, each batch split at random between the two nodes and
    appended concurrently (their blocks of seqs interleave); node b's events, ascending."""
    mine: list[Event] = []
    heard: list[Event] = []
    b.add_listener(heard.extend)
    pending: list[Report] = []

    async def commit() -> None:
        await asyncio.gather(*((a if rng.random() < 0.5 else b).append(r) for r in pending))

    for gap, report in history(rng, n):
        if gap and pending:
            await commit()
            pending = []
            await clock.advance(gap)
        pending.append(report)
    await commit()
    await searchable(a)
    mine = sorted(heard, key=lambda e: e.seq)
    b._listeners.remove(heard.extend)
    return mine


def judge_all(projection: WindowProjection, b: ElasticEventLog, events: list[Event],
              recent: bool) -> tuple[int, int]:
    """The runner's loop over node b's events: every starter question (and the recent ones)
    from the projection equals b's query as of the same report; (answered here, asked)."""
    answered = asked = 0
    projected = projection.queries(b.queries())
    for event in events:
        projection.check_retention()
        projection.begin(event)
        for counted, flt in parsed(starter_calls(event)):
            expected = count(b.queries(), counted, flt, event.seq)
            found = projection_answer(projection, counted, flt, event.seq)
            if found is not None:
                assert found == expected, (event.seq, counted, flt)
                answered += 1
            asked += 1
        if recent:
            for call in recent_calls(event):
                assert recent_answer(projected, call, event.seq) == \
                    recent_answer(b.queries(), call, event.seq), (event.seq, call)
        projection.finish(event)
    return answered, asked


def warm_up(projection: WindowProjection, events: list[Event]) -> None:
    """Register every shape and let the feed start and the builds finish (they switch on at
    the next event)."""
    for event in events:
        for counted, flt in parsed(starter_calls(event)):
            projection.register(flt, counted)
    assert projection.wait_built(120)


@pytest.mark.parametrize("seed", [1, 2])
async def test_the_projection_on_node_b_equals_its_queries_as_the_nodes_interleave(
        nodes, seed: int) -> None:
    a, b, clock = nodes
    rng = random.Random(seed)
    projection = WindowProjection(b, feed_interval=0.0)  # poll before every report
    projection.start_at(0)
    answered = asked = 0
    rounds = 0
    for _ in range(4):  # the nodes keep appending while node b's runner goes on
        events = await append_interleaved(rng, a, b, clock, 60)
        if not events:
            continue
        assert not b.single_writer() or rounds == 0
        if rounds == 0:
            await asyncio.to_thread(judge_all, projection, b, events[:1], True)
            await asyncio.to_thread(warm_up, projection, events)
            events = events[1:]
        got = await asyncio.to_thread(judge_all, projection, b, events, True)
        answered, asked = answered + got[0], asked + got[1]
        rounds += 1
    projection.close()
    assert not b.single_writer(), "the other node's blocks came between b's"
    foreign = projection.describe()["foreign"]
    assert foreign["absorbed"] > 20 and foreign["ready"], foreign
    assert answered >= asked - 16 * 3, (answered, asked, projection.calls)
    assert projection.calls["recentReports", "projection"] > 0, projection.calls


def report(login: str, success: bool = False) -> Report:
    return Report(t=START, login=login, remote="192.0.2.5", pwhash="aaaa", success=success,
                  protocol="imap")


async def test_a_foreign_event_is_held_back_until_the_runner_passes_its_seq(nodes) -> None:
    a, b, clock = nodes
    heard: list[Event] = []
    b.add_listener(heard.extend)
    await b.append(report("x"))
    await b.append(report("x"))
    theirs = await a.append(report("x"))  # between b's second and third event
    await b.append(report("x"))
    await searchable(a)
    b0, b1, b2 = heard
    assert b1.seq < theirs.seq < b2.seq
    flt = Filter(login="x", success=False, window=HOUR)
    projection = WindowProjection(b, feed_interval=0.0)
    projection.start_at(0)

    def run() -> list[Any]:
        out = []
        projection.register(flt)
        projection.begin(b0)
        assert projection.wait_built(60)
        projection.finish(b0)
        for event in (b1, b2):
            projection.begin(event)
            out.append((projection.answer("countReports", flt, None, _as_of(event)),
                        projection.describe()["foreign"]["held"]))
            projection.finish(event)
        return out

    answers = await asyncio.to_thread(run)
    projection.close()
    assert answers == [(1, 1), (3, 0)], "a's event counts only once b's runner is past its seq"


def _as_of(event: Event) -> Any:
    from trackalert.eventlog.filters import AsOf
    return AsOf(before_seq=event.seq)


async def test_a_poll_the_cluster_refuses_drops_the_counters_until_they_rebuild(
        elastic_url: str, elastic_base: str, caplog: pytest.LogCaptureFixture) -> None:
    """Node b reaches the server through a relay that is cut: the next report's poll fails,
    the projection logs it once, answers nothing (the queries answer, and fail too while the
    cluster is away), and after the relay is back it starts the feed again and rebuilds."""
    host = elastic_base.split("://", 1)[1].split("/")[0]
    relay = Relay(int(host.rsplit(":", 1)[1]))
    await relay.start()
    clock = VirtualClock(start=START)
    a = ElasticEventLog(parse_elastic_url(node_url(elastic_url, "a")), clock)
    b_url = elastic_url.replace(host, f"127.0.0.1:{relay.port}")
    b = ElasticEventLog(parse_elastic_url(node_url(b_url, "b", "&timeout=1")), clock)
    await a.open()
    await b.open()
    now = [0.0]
    projection = WindowProjection(b, feed_interval=0.0, feed_monotonic=lambda: now[0])
    projection.start_at(0)
    try:
        heard: list[Event] = []
        b.add_listener(heard.extend)
        for i in range(6):
            await (a if i % 2 else b).append(report("y"))
        await searchable(a)
        flt = Filter(login="y", success=False, window=HOUR)

        def judge(event: Event) -> int | None:
            projection.begin(event)
            found = projection.answer("countReports", flt, None, _as_of(event))
            projection.finish(event)
            return found

        def warm(event: Event) -> None:
            projection.register(flt)
            projection.begin(event)
            assert projection.wait_built(60)
            projection.finish(event)

        await asyncio.to_thread(warm, heard[0])
        assert await asyncio.to_thread(judge, heard[1]) == heard[1].seq - 1
        await relay.cut()
        await a.append(report("y"))
        caplog.set_level(logging.INFO, logger="trackalert")
        assert await asyncio.to_thread(judge, heard[2]) is None
        assert projection.describe()["shapes"] == []
        refused = [r for r in caplog.records if "did not answer" in r.getMessage()]
        assert len(refused) == 1, [r.getMessage() for r in caplog.records]
        await relay.start()
        for i in range(3):
            await b.append(report("y"))
        await a.append(report("y"))
        await b.append(report("y"))
        await searchable(a)
        now[0] += 2.0  # past the feed's retry pause
        events = heard[3:]
        await asyncio.to_thread(warm, events[0])
        for event in events[1:]:
            assert await asyncio.to_thread(judge, event) == event.seq - 1, event.seq
        assert "followed again" in caplog.text
    finally:
        projection.close()
        await b.close()
        await a.close()
        await relay.cut()


def test_a_hole_closes_after_late_seconds_and_what_arrives_in_it_then_is_never_counted() -> None:
    """The feed's own bookkeeping, on a source of a fixed set of stored events: a seq missing
    between two seen (a block whose bulk has not landed) stays open and is asked for again; it
    is filled when its event appears; one missing for `late` seconds is closed."""
    stored: dict[int, Event] = {}

    class Stored:  # the log's three questions, answered from `stored` (not our code)
        def poll(self, after, holes, limit):
            seqs = sorted(s for s in stored if (after is not None and s > after)
                          or any(lo <= s <= hi for lo, hi in holes))
            return [stored[s] for s in seqs[:limit]]

        def read_nodes(self, after, upto, received_from=None):
            return []

        def own_between(self, lo, hi):
            return 0

    def event(seq: int) -> Event:
        return Event(seq, START + seq, report("z"), None)

    now = [0.0]
    feed = ForeignFeed(Stored(), lambda: now[0], interval=0.0, late=60.0)
    feed.start(0, START)
    stored.update({s: event(s) for s in (1, 2, 4, 6)})  # 3 and 5: blocks still in flight
    assert [e.seq for e in feed.absorb(5)] == [1, 2, 4]
    assert feed.stable == 2 and feed.counts(4) and not feed.counts(3)
    feed.note_own(5, START + 5)  # this node's own event 5, judged
    stored[3] = event(3)  # lands late: below events already absorbed
    now[0] = 30.0
    assert [e.seq for e in feed.absorb(7)] == [3, 6]
    assert feed.stable == 6 and feed.closed == ()
    stored.update({s: event(s) for s in (8, 10)})
    feed.note_own(7, START + 7)
    assert [e.seq for e in feed.absorb(11)] == [8, 10]
    assert feed.stable == 8, "9 is open"
    now[0] = 100.0
    assert feed.absorb(11) == [] and feed.stable == 10 and feed.closed == ((9, 9),)
    stored[9] = event(9)  # after its hole closed: never absorbed, never counted by the tails
    assert feed.absorb(12) == [] and not feed.counts(9) and feed.counts(8)
