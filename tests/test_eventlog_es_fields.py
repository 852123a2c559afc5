"""The window projection on the Elasticsearch log (es_fields.py, EventLog.single_writer).

Several writers: tests/test_eventlog_es_foreign.py.

The same seeded history in a SQLite log and in an Elasticsearch log (osmem-server, or the
cluster of TRACKALERT_TEST_ES_URL): the narrow rows are SQLite's, and the projection over the
Elasticsearch log answers what the Elasticsearch queries and the SQLite queries answer, as of
every event. Driven from a worker thread, as the policy runner drives it.
"""

from __future__ import annotations

import asyncio
import random
import socket
from pathlib import Path
from typing import AsyncIterator

import pytest
from elastic_transport import TransportError

from elastic_server import elastic_base, elastic_url  # noqa: F401  (fixtures)
from test_recent import answer as recent_answer, recent_calls
from test_windows import START, history, parsed, projection_answer, starter_calls
from trackalert.clock import VirtualClock
from trackalert.eventlog.base import Event, EventLogError
from trackalert.eventlog.elasticsearch import ElasticEventLog
from trackalert.eventlog.es_client import parse_elastic_url, sync_client
from trackalert.eventlog.es_fields import FieldsReader
from trackalert.eventlog.es_queries import Visibility
from trackalert.eventlog.filters import AsOf, Field, Filter
from trackalert.eventlog.sqlite import SQLiteEventLog
from trackalert.eventlog.windows import WindowProjection
from trackalert.report import Report

EVENTS = 400


async def fill_both(logs: list, clocks: list[VirtualClock], n: int, seed: int) -> list[Event]:
    """The same batches at the same virtual times in every log; the first log's events."""
    pending: list[Report] = []

    async def commit() -> None:
        for log in logs:
            await asyncio.gather(*(log.append(r) for r in pending))

    for gap, report in history(random.Random(seed), n):
        if gap and pending:
            await commit()
            pending = []
            for clock in clocks:
                await clock.advance(gap)
        pending.append(report)
    await commit()
    return await logs[0].read(0, n + 1)


@pytest.fixture
async def both(tmp_path: Path, elastic_url: str) -> AsyncIterator[tuple[SQLiteEventLog, ElasticEventLog, list[Event]]]:
    clocks = [VirtualClock(start=START), VirtualClock(start=START)]
    sqlite_log = SQLiteEventLog(tmp_path / "events.db", clocks[0])
    es_log = ElasticEventLog(parse_elastic_url(elastic_url), clocks[1])
    await sqlite_log.open()
    await es_log.open()
    try:
        events = await fill_both([sqlite_log, es_log], clocks, EVENTS, seed=4)
        assert await es_log.read(0, EVENTS + 1) == events
        yield sqlite_log, es_log, events
    finally:
        await es_log.close()
        await sqlite_log.close()


def count(queries, counted: Field | None, flt: Filter, seq: int) -> int:
    if counted is None:
        return queries.count_reports(flt, AsOf(before_seq=seq))
    return queries.count_distinct(counted, flt, AsOf(before_seq=seq))


async def test_the_narrow_rows_are_sqlites(both) -> None:
    sqlite_log, es_log, events = both
    assert es_log.single_writer()
    rows = await asyncio.to_thread(es_log.read_fields, 0, 10_000)
    assert rows == sqlite_log.read_fields(0, 10_000) and len(rows) == len(events)
    # chunks, the seek on received, and nothing past the end
    middle = events[EVENTS // 2]
    for after, limit, since in [(0, 7, None), (middle.seq, 50, None), (0, 3, middle.received),
                                (middle.seq, 10, events[10].received), (0, 5, events[-1].received + 1)]:
        got = await asyncio.to_thread(es_log.read_fields, after, limit, since)
        assert got == sqlite_log.read_fields(after, limit, since), (after, limit, since)
    assert await asyncio.to_thread(es_log.read_fields, events[-1].seq, 10) == []


async def test_the_narrow_read_refuses_the_event_loop(both) -> None:
    """It blocks on the cluster: on the loop it would stall every append, so it says so."""
    _, es_log, _ = both
    with pytest.raises(EventLogError, match="worker thread"):
        es_log.read_fields(0, 1)


def drive(projection: WindowProjection, sqlite_log: SQLiteEventLog, es_log: ElasticEventLog,
          events: list[Event]) -> tuple[int, int]:
    """The runner's loop: begin, every starter question, finish; (answered here, compared)."""
    projection.start_at(0)
    for event in events:
        for counted, flt in parsed(starter_calls(event)):
            projection.register(flt, counted)
    assert projection.wait_built(60)
    answered = compared = 0
    for event in events:
        projection.check_retention()
        projection.begin(event)
        for counted, flt in parsed(starter_calls(event)):
            expected = count(sqlite_log.queries(), counted, flt, event.seq)
            assert count(es_log.queries(), counted, flt, event.seq) == expected, (event.seq, flt)
            found = projection_answer(projection, counted, flt, event.seq)
            if found is not None:
                assert found == expected, (event.seq, counted, flt)
                answered += 1
            compared += 1
        projection.finish(event)
    projection.close()
    return answered, compared


async def test_the_projection_on_elasticsearch_equals_both_queries(both) -> None:
    sqlite_log, es_log, events = both
    projection = WindowProjection(es_log)
    assert WindowProjection.supports(es_log)
    answered, compared = await asyncio.to_thread(drive, projection, sqlite_log, es_log, events)
    assert compared == 16 * len(events)
    assert answered >= compared - 16 * 2, "the shapes are on after the first event or two"


async def test_another_writer_ends_the_single_writer_state(both, elastic_url: str) -> None:
    """Once another node writes into the log the events between this node's are not the
    runner's to add (`single_writer` turns False); the projection then follows the other
    nodes' events (tests/test_eventlog_es_foreign.py)."""
    sqlite_log, es_log, events = both
    other = ElasticEventLog(parse_elastic_url(elastic_url + "?node=other"), VirtualClock(start=START))
    await other.open()
    # this node, started again after the other node wrote last (its id: the same host name)
    again = ElasticEventLog(parse_elastic_url(elastic_url), VirtualClock(start=START))
    try:
        await es_log.append(events[-1].report)
        await other.append(events[-2].report)
        assert es_log.single_writer()
        await again.open()
        assert not again.single_writer(), "the cluster's last seq is not this node's"
        assert again.foreign_source() is not None
        await es_log.append(events[-3].report)
        assert not es_log.single_writer(), "another node's block came between two of ours"
    finally:
        await again.close()
        await other.close()


async def test_an_unreachable_cluster_fails_the_read_instead_of_hanging() -> None:
    """The projection catches this, logs it and lets the queries answer (windows.begin)."""
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = parse_elastic_url(f"elasticsearch://127.0.0.1:{port}/gone?timeout=1")
    visibility = Visibility()
    visibility.committed = 5  # acknowledged events to read: it must ask the cluster
    reader = FieldsReader(sync_client(settings), "gone-events", visibility)
    try:
        with pytest.raises(TransportError):
            await asyncio.to_thread(reader.read, 0, 10)
    finally:
        reader.close()


def walk_recent(projection: WindowProjection, sqlite_log: SQLiteEventLog, es_log: ElasticEventLog,
                events: list[Event]) -> int:
    """recentReports/lastSeen inside each report: projection over ES == ES == SQLite; the
    calls the projection answered."""
    projection.start_at(0)
    projected = projection.queries(es_log.queries())
    for event in events:
        projection.begin(event)
        for call in recent_calls(event):
            expected = recent_answer(sqlite_log.queries(), call, event.seq)
            assert recent_answer(es_log.queries(), call, event.seq) == expected, (event.seq, call)
            assert recent_answer(projected, call, event.seq) == expected, (event.seq, call)
        projection.finish(event)
    projection.close()
    return projection.calls["recentReports", "projection"] + projection.calls["lastSeen", "projection"]


async def test_the_recent_rows_on_elasticsearch_equal_both_queries(both) -> None:
    sqlite_log, es_log, events = both
    projection = WindowProjection(es_log)
    answered = await asyncio.to_thread(walk_recent, projection, sqlite_log, es_log, events)
    assert answered > 10 * len(events) // 2, projection.calls
