"""The Elasticsearch event log: the shared contract, against osmem-server (or a real cluster,
see tests/elastic_server.py), plus what only this backend has (URLs, templates, start-up)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import threading
import time
from typing import Any, AsyncIterator, Callable
from urllib.parse import urlsplit

import pytest
from elasticsearch import ApiError, AsyncElasticsearch

from elastic_server import ENV, elastic_base, elastic_url  # noqa: F401  (fixtures)
from eventlog_contract import EventLogContract, MakeLog, report
from trackalert.clock import Clock, VirtualClock
from trackalert.eventlog import Appended, EventLogClosed, EventLogError, open_event_log
from trackalert.eventlog.elasticsearch import ElasticEventLog
from trackalert.eventlog.es_client import async_client, parse_elastic_url
from trackalert.eventlog.es_queries import Visibility
from trackalert.eventlog.filters import AsOf, Filter


@pytest.fixture
async def elastic_logs(elastic_url: str) -> AsyncIterator[tuple[str, list[ElasticEventLog]]]:
    opened: list[ElasticEventLog] = []
    yield elastic_url, opened
    for log in opened:
        await log.close()


@pytest.fixture
async def make_log_at() -> AsyncIterator[Callable[..., Any]]:
    """Open a log at a URL (several at one URL are several nodes); closed after the test."""
    opened: list[ElasticEventLog] = []

    async def make(url: str) -> ElasticEventLog:
        log = ElasticEventLog(parse_elastic_url(url), VirtualClock())
        opened.append(log)
        await log.open()
        return log

    yield make
    for log in opened:
        await log.close()


class TestElasticContract(EventLogContract):
    @pytest.fixture
    def make_log(self, elastic_logs: tuple[str, list[ElasticEventLog]]) -> MakeLog:
        url, opened = elastic_logs

        async def make(clock: Clock | None = None) -> ElasticEventLog:
            log = ElasticEventLog(parse_elastic_url(url), clock or VirtualClock())
            opened.append(log)
            await log.open()
            return log

        return make


# --------------------------------------------------------------------------- URLs


def test_the_url_says_everything_and_hides_the_password() -> None:
    settings = parse_elastic_url(
        "elasticsearch://elastic:s%40cret@es1,es2:9201,[2001:db8::5]:9200/logins"
        "?tls=1&ca_file=/etc/ca.pem&templates=0&timeout=3")
    assert settings.hosts == ("https://es1:9200", "https://es2:9201", "https://[2001:db8::5]:9200")
    assert (settings.prefix, settings.username, settings.password) == ("logins", "elastic", "s@cret")
    assert (settings.ca_file, settings.install_templates, settings.request_timeout) == (
        "/etc/ca.pem", False, 3.0)
    assert settings.location == "elasticsearch://es1:9200,es2:9201,[2001:db8::5]:9200/logins"
    assert "cret" not in settings.location
    plain = parse_elastic_url("elasticsearch://127.0.0.1?api_key=abc")
    assert (plain.hosts, plain.prefix, plain.api_key) == (("http://127.0.0.1:9200",), "trackalert", "abc")
    assert plain.client_options()["api_key"] == "abc" and "basic_auth" not in plain.client_options()


@pytest.mark.parametrize("url, message", [
    ("elasticsearch:///prefix", "must look like"),
    ("elasticsearch://h/Upper", "not a valid lower-case index name"),
    ("elasticsearch://h/p?tsl=1", "unknown Elasticsearch event log option(s) tsl"),
    ("elasticsearch://h/p?tls=maybe", "option tls must be"),
    ("elasticsearch://h/p?timeout=soon", "option timeout must be a number of seconds, got 'soon'"),
    ("elasticsearch://h/p?timeout=0", "option timeout=0 is out of range"),
    ("elasticsearch://h/p?feed_interval=0.001", "polls for the other nodes' events every 0.01 to 60"),
    ("elasticsearch://h/p?feed_interval=nan", "option feed_interval=nan is out of range"),
    ("elasticsearch://h/p?feed_interval=", "option feed_interval must be a number of seconds"),
    ("elasticsearch://h/p?hole_limit=20", "a bulk can take 3 x timeout = 30 s to land"),
    ("elasticsearch://h/p?timeout=30&hole_limit=60", "3 x timeout = 90 s"),
    ("elasticsearch://h/p?hole_limit=100000", "and at most a day"),
])
def test_bad_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_elastic_url(url)


def test_the_feed_settings_default_follow_the_timeout_and_reach_the_feed() -> None:
    """feed_interval and hole_limit: the projection's feed of the other nodes' events."""
    default = parse_elastic_url("elasticsearch://h/p")
    assert (default.feed_interval, default.hole_limit) == (0.5, 60.0)
    slow = parse_elastic_url("elasticsearch://h/p?timeout=30")
    assert slow.hole_limit == 90.0  # never below the time a bulk may take to land
    tuned = parse_elastic_url("elasticsearch://h/p?feed_interval=2&hole_limit=120")
    assert (tuned.feed_interval, tuned.hole_limit) == (2.0, 120.0)


def test_open_event_log_knows_the_scheme() -> None:
    log = open_event_log("elasticsearch://127.0.0.1:9200/x", VirtualClock())
    assert isinstance(log, ElasticEventLog) and log.backend == "elasticsearch"
    assert log.location == "elasticsearch://127.0.0.1:9200/x"
    with pytest.raises(ValueError, match="supported schemes are sqlite://, elasticsearch://"):
        open_event_log("mongodb://x", VirtualClock())


# --------------------------------------------------------------------------- start-up


async def test_an_unreachable_cluster_is_a_clear_start_up_error() -> None:
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = ElasticEventLog(parse_elastic_url(f"elasticsearch://127.0.0.1:{port}/x?timeout=2"),
                          VirtualClock())
    with pytest.raises(EventLogError, match=f"cannot use the Elasticsearch cluster at "
                                            f"http://127.0.0.1:{port}.*does not start"):
        await log.open()
    with pytest.raises(EventLogClosed):
        await log.append(report(1))


async def test_the_stock_client_is_refused_and_ours_is_not(elastic_url: str) -> None:
    """Why es_client has its own nodes: the client's compatibility media type is refused by
    OpenSearch-compatible servers (a real Elasticsearch 9 takes both)."""
    settings = parse_elastic_url(elastic_url)
    if not os.environ.get(ENV):  # a real cluster may be an Elasticsearch 9, which takes both
        stock = AsyncElasticsearch(hosts=list(settings.hosts))
        try:
            with pytest.raises(ApiError) as refused:
                await stock.indices.create(index=f"{settings.prefix}-stock", mappings={})
            assert refused.value.meta.status == 406
        finally:
            await stock.close()
    ours = async_client(settings)
    try:
        created = await ours.indices.create(index=f"{settings.prefix}-ours", mappings={})
        assert created["acknowledged"] is True
    finally:
        await ours.close()


async def test_start_installs_the_templates_and_the_indices_get_their_mapping(
        elastic_url: str, make_log_at: Callable[..., Any]) -> None:
    log = await make_log_at(elastic_url)
    client = async_client(parse_elastic_url(elastic_url))
    try:
        mapping = await client.indices.get_mapping(index=log.events_index)
        properties = mapping[log.events_index]["mappings"]["properties"]
        assert properties["ip"] == {"type": "ip"}
        assert properties["device_attrs"]["enabled"] is False
        assert properties["location"] == {"type": "geo_point"}
        templates = await client.indices.get_index_template(name=f"{log.settings.prefix}-events")
        [template] = templates["index_templates"]
        assert template["index_template"]["index_patterns"] == [f"{log.settings.prefix}-events*"]
    finally:
        await client.close()


async def test_templates_0_installs_none(elastic_url: str, make_log_at: Callable[..., Any]) -> None:
    log = await make_log_at(elastic_url + "?templates=0")
    client = async_client(log.settings)
    try:
        missing = await client.options(ignore_status=404).indices.get_index_template(
            name=f"{log.settings.prefix}-events")
        assert missing.meta.status == 404
        assert await log.append(report(1)) == Appended(1, False)
    finally:
        await client.close()


# --------------------------------------------------------------------------- several nodes


async def test_two_nodes_share_one_order_and_see_each_other(
        elastic_url: str, make_log_at: Callable[..., Any]) -> None:
    """Two logs on one cluster (two trackalert nodes) appending at once: every seq is taken
    once, together they are 1..N, each node reads back its own events (those its policy
    runner runs) and counts the other's, and a wforce retry reaching the other node is
    recognised as one."""
    a = await make_log_at(elastic_url + "?node=a")
    b = await make_log_at(elastic_url + "?node=b")
    sent = [(log, i) for i in range(300) for log in (a, b)]
    results = await asyncio.gather(*(log.append(report(i), delivery_id=f"{id(log)}-{i}")
                                     for log, i in sent))
    assert sorted(r.seq for r in results) == list(range(1, 601))
    assert not any(r.duplicate for r in results)
    own = {log: sorted(r.seq for (sender, _), r in zip(sent, results) if sender is log)
           for log in (a, b)}
    for log in (a, b):
        stored = await log.read(0, 1000)
        assert [e.seq for e in stored] == own[log]
        assert await log.last_seq() == own[log][-1]
        assert log.queries().count_reports(Filter(), AsOf(now=1e12)) == 600
    first_of_a = results[0]
    assert await b.append(report(0), delivery_id=f"{id(a)}-0") == Appended(first_of_a.seq, True)
    assert await b.append(report(5), delivery_id=f"{id(a)}-0") == Appended(601, False)
    assert b.stats.delivery_id_collisions_total == 1


# --------------------------------------------------------------------------- visibility


def test_one_refresh_serves_every_query_waiting_for_it() -> None:
    visibility = Visibility()
    refreshes: list[int] = []
    visibility.ensure(10, lambda: refreshes.append(0))
    assert refreshes == []  # nothing committed: nothing to refresh
    visibility.committed = 50
    gate = threading.Barrier(8)

    def query(upto: int) -> None:
        gate.wait()
        visibility.ensure(upto, lambda: (refreshes.append(visibility.committed), time.sleep(0.01)))

    threads = [threading.Thread(target=query, args=(40 + i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert refreshes == [50] and visibility.visible == 50
    visibility.ensure(50, lambda: refreshes.append(-1))
    visibility.committed = 60
    visibility.ensure(49, lambda: refreshes.append(-1))  # what it needs is visible already
    visibility.ensure(60, lambda: refreshes.append(60))
    assert refreshes == [50, 60]


# --------------------------------------------------------------------------- retried bulks


class LosingProxy:
    """A loopback TCP proxy to the server that, for the first `lose` bulk requests, forwards the
    request but drops its answer and the connection: the cluster stored the bulk, the client
    never heard, and retries it (what a timeout or a reset behind a load balancer does)."""

    def __init__(self, upstream: tuple[str, int], lose: int) -> None:
        self.upstream, self.lose, self.lost = upstream, lose, 0
        self.server: asyncio.base_events.Server | None = None
        #: While set, every connection is closed at once (the cluster is unreachable).
        self.cut = False
        self._open: set[asyncio.StreamWriter] = set()

    def cut_off(self) -> None:
        self.cut = True
        for writer in self._open:
            writer.close()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.cut:
            client_w.close()
            return
        self._open.add(client_w)
        server_r, server_w = await asyncio.open_connection(*self.upstream)
        dropping = asyncio.Event()

        async def upward() -> None:
            while data := await client_r.read(65536):
                if b"/_bulk" in data and self.lost < self.lose:
                    self.lost += 1
                    dropping.set()
                server_w.write(data)
                await server_w.drain()

        async def downward() -> None:
            while data := await server_r.read(65536):
                if dropping.is_set():  # the bulk's answer: lose it, and the connection
                    client_w.close()
                    server_w.close()
                    return
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.create_task(upward()), asyncio.create_task(downward())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        self._open.discard(client_w)
        client_w.close()
        server_w.close()


@pytest.fixture
async def proxied(elastic_url: str) -> AsyncIterator[tuple[str, LosingProxy]]:
    """(the log URL through a `LosingProxy`, the proxy), on osmem-server or a plain-HTTP cluster."""
    settings = parse_elastic_url(elastic_url)
    if settings.hosts[0].startswith("https"):
        pytest.skip("the proxy speaks plain HTTP (the test runs on osmem-server and http clusters)")
    upstream = urlsplit(settings.hosts[0])
    proxy = LosingProxy((upstream.hostname, upstream.port), lose=0)
    port = await proxy.start()
    yield elastic_url.replace(upstream.netloc, f"127.0.0.1:{port}", 1), proxy
    await proxy.close()


async def test_a_bulk_retried_after_a_lost_answer_stores_nothing_twice(
        proxied: tuple[str, LosingProxy], make_log_at: Callable[..., Any]) -> None:
    url, proxy = proxied
    log = await make_log_at(url)
    proxy.lose = 1
    results = await asyncio.gather(
        *(log.append(report(i), delivery_id=f"d-{i}" if i % 2 else None) for i in range(50)))
    assert proxy.lost == 1  # the first bulk's answer was lost; its retry got through
    assert sorted(r.seq for r in results) == list(range(1, 51))
    assert not any(r.duplicate for r in results)
    proxy.lose = 3  # the next bulk's answer is lost twice: the client's last retry gets it
    more = await asyncio.gather(*(log.append(report(i)) for i in range(50, 60)))
    assert proxy.lost == 3
    assert sorted(r.seq for r in more) == list(range(51, 61))
    stored = await log.read(0, 1000)
    assert [e.seq for e in stored] == list(range(1, 61))
    assert [e.report.login for e in stored] == [f"user{i}" for i in range(60)]
    assert log.stats.appended_total == 60 and log.failure is None


async def test_a_cluster_gone_while_running_fails_appends_until_it_is_back(
        proxied: tuple[str, LosingProxy], make_log_at: Callable[..., Any],
        caplog: pytest.LogCaptureFixture) -> None:
    """No 200 for what is not stored (the spool comes later): appends fail with EventLogError,
    readiness sees `failure`, nothing is half-counted, and the log carries on once it is back."""
    url, proxy = proxied
    log = await make_log_at(url + "?timeout=2")
    assert (await log.append(report(0))).seq == 1
    proxy.cut_off()
    failed = await asyncio.gather(*(log.append(report(i)) for i in range(1, 21)),
                                  return_exceptions=True)
    assert all(isinstance(f, EventLogError) for f in failed), failed
    assert log.failure is not None and log.stats.pending == 0
    assert "a bulk of 20 appends failed" in caplog.text
    proxy.cut = False
    back = await asyncio.gather(*(log.append(report(i)) for i in range(21, 31)))
    assert log.failure is None
    seqs = sorted(a.seq for a in back)
    assert seqs == list(range(seqs[0], seqs[0] + 10)) and seqs[0] >= 2
    stored = await log.read(0, 100)
    assert [e.report.login for e in stored] == ["user0"] + [f"user{i}" for i in range(21, 31)]
    assert log.stats.appended_total == 11
