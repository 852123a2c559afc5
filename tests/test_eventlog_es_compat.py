"""One installed client against Elasticsearch 8, Elasticsearch 9 and OpenSearch 2 (es_client.py).

No such cluster is reachable from the test machine, so each is a `Persona` (elastic_server.py):
a real HTTP server on loopback in front of osmem-server that answers `GET /`, the media-type
rule, the product header and the point-in-time API as that server does (the facts in issue 11).
Through each: the stock client fails where the issue says it does (so the persona enforces the
rule), and the event log opens, appends concurrently, answers the helpers, records an alert,
exports through that server's point in time and closes, with no request refused. Also here:
the projection's feed polls the other node's events without refreshing the index.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import AsyncIterator, Iterator

import pytest
from elasticsearch import ApiError, AsyncElasticsearch, UnsupportedProductError

from elastic_server import PERSONAS, Persona, with_prefix
from trackalert.clock import VirtualClock
from trackalert.eventlog.elasticsearch import ElasticEventLog
from trackalert.eventlog.es_client import parse_elastic_url
from trackalert.eventlog.es_snapshot import ElasticSnapshot
from trackalert.eventlog.filters import AsOf, Filter
from trackalert.eventlog.foreign import ForeignFeed
from trackalert.report import Report

START = 1_750_000_000.0


@pytest.fixture(scope="module")
def osmem() -> Iterator[str]:
    """An osmem-server of these tests' own (also under TRACKALERT_TEST_ES_URL: a persona
    stands in front of a test server, not of a real cluster)."""
    from osmem_server import OsmemServer

    server = OsmemServer.start(addr="127.0.0.1:0", japanese=False)
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture(params=sorted(PERSONAS))
async def persona(request: pytest.FixtureRequest, osmem: str) -> AsyncIterator[Persona]:
    server = Persona(request.param, osmem)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def report(rng: random.Random, i: int) -> Report:
    return Report(t=START + i, login=f"user{rng.randrange(8)}", remote=f"192.0.2.{rng.randrange(1, 40)}",
                  pwhash="ab12", success=rng.random() < 0.3, protocol="imap")


async def test_the_stock_client_meets_each_servers_rule(persona: Persona) -> None:
    """Without our transport nodes: Elasticsearch 9 takes the 9.x client, Elasticsearch 8
    refuses its media type with a 400, OpenSearch with a 406 (and sends no product header)."""
    client = AsyncElasticsearch(f"http://127.0.0.1:{persona.port}")
    try:
        if persona.kind == "elasticsearch-9":
            assert (await client.info())["version"]["number"].startswith("9.")
            await client.index(index=f"stock-{uuid.uuid4().hex[:8]}", document={"a": 1})
            assert persona.refused == []
        elif persona.kind == "elasticsearch-8":
            with pytest.raises(ApiError) as raised:
                await client.index(index=f"stock-{uuid.uuid4().hex[:8]}", document={"a": 1})
            assert raised.value.meta.status == 400
            assert "media_type_header_exception" in str(raised.value)
        else:
            with pytest.raises((ApiError, UnsupportedProductError)):
                await client.info()
            with pytest.raises(ApiError) as raised:
                await client.index(index=f"stock-{uuid.uuid4().hex[:8]}", document={"a": 1})
            assert raised.value.meta.status == 406
        assert persona.requests
    finally:
        await client.close()


async def test_the_log_works_through_each_server(persona: Persona) -> None:
    prefix = f"ta-{persona.kind.replace('-', '')}-{uuid.uuid4().hex[:8]}"
    url = with_prefix(persona.base, prefix) + "?node=n1"
    log = ElasticEventLog(parse_elastic_url(url), VirtualClock(start=START))
    await log.open()
    rng = random.Random(persona.kind)
    reports = [report(rng, i) for i in range(120)]
    try:
        appended = await asyncio.gather(*(log.append(r, delivery_id=f"d{i}")
                                          for i, r in enumerate(reports)))
        assert sorted(a.seq for a in appended) == list(range(1, 121))
        again = await log.append(reports[7], delivery_id="d7")  # a wforce retry
        assert again.seq == appended[7].seq
        login = reports[0].login
        flt = Filter(login=login, success=False, window=86400 * 30)
        counted = await asyncio.to_thread(log.queries().count_reports, flt, AsOf(before_seq=10**9))
        assert counted == sum(1 for r in reports if r.login == login and not r.success)
        events = await log.read(0, 1000)
        assert [e.seq for e in events] == list(range(1, 121))
        await log.close()
        rows = await asyncio.to_thread(snapshot_rows, url)  # the proxy runs on this loop
        assert [row[0] for row in rows] == list(range(1, 121))
        pit = ("POST", "_pit") if PERSONAS[persona.kind]["pit"] == "_pit" else \
            ("POST", "point_in_time")
        assert persona.requests[pit] == 1, persona.requests
        assert persona.requests["GET", "/"] >= 1
        assert persona.refused == [], persona.refused
    finally:
        await log.close()
        client = AsyncElasticsearch(persona.upstream)
        await client.options(ignore_status=404).indices.delete(index=f"{prefix}-*")
        await client.close()


def snapshot_rows(url: str) -> list[tuple]:
    with ElasticSnapshot(url) as snapshot:  # this server's point in time
        return [row for page in snapshot.rows() for row in page]


async def test_the_feed_polls_without_refreshing(osmem: str) -> None:
    """Node b's feed finds node a's events with searches alone: no refresh of the index (a
    refresh per poll made tiny segments on a real cluster, up to ten a second per node)."""
    counting = Persona("opensearch-2", osmem)
    await counting.start()
    prefix = f"ta-feed-{uuid.uuid4().hex[:8]}"
    clock = VirtualClock(start=START)
    a = ElasticEventLog(parse_elastic_url(with_prefix(counting.base, prefix) + "?node=a"), clock)
    b = ElasticEventLog(parse_elastic_url(with_prefix(counting.base, prefix) +
                                          "?node=b&feed_interval=0.25&hole_limit=45"), clock)
    await a.open()
    await b.open()
    try:
        rng = random.Random(5)
        for i in range(30):
            await (a if i % 3 else b).append(report(rng, i))
        source = b.foreign_source()
        assert (source.interval, source.late) == (0.25, 45.0)
        feed = ForeignFeed(source)  # as the projection makes it: the URL's settings
        assert (feed.interval, feed.late) == (0.25, 45.0)
        refreshes = counting.requests["POST", "_refresh"]
        found = []
        after = 0
        for _ in range(5):
            polled = await asyncio.to_thread(source.poll, after, [], 7)
            found += polled
            after = max([after] + [e.seq for e in polled])
        assert counting.requests["POST", "_refresh"] == refreshes, counting.requests
        assert counting.requests["POST", "_search"] >= 5
        assert [e.report.login for e in found] and len(found) == 20
    finally:
        await b.close()
        await a.close()
        client = AsyncElasticsearch(counting.upstream)
        await client.options(ignore_status=404).indices.delete(index=f"{prefix}-*")
        await client.close()
        await counting.close()
