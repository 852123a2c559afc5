"""esQuery from real Lua states on an Elasticsearch log (osmem-server, or TRACKALERT_TEST_ES_URL's
cluster): the stored queries of elasticqueries/queries/ with their parameters as data, as of the
running report, and their errors."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import AsyncIterator

import pytest

from elastic_server import elastic_base, elastic_url  # noqa: F401  (fixtures)
from trackalert.clock import VirtualClock
from trackalert.eventlog.base import Event
from trackalert.eventlog.elasticsearch import ElasticEventLog
from trackalert.eventlog.es_client import parse_elastic_url
from trackalert.eventlog.sqlite import SQLiteEventLog
from trackalert.lua.host import Host
from trackalert.lua.state import LuaError, LuaState, StateKind
from trackalert.lua.stored_queries import StoredQueryError, load_query, parse_query, query_names
from trackalert.report import Enrichment, Report

#: Ten days ago by the wall clock: login_history's `now-180d` is the cluster's own clock.
START = float(int(time.time()) - 10 * 86400)
#: A login that, spliced into the query text, would end the term and match every event.
EVIL = 'x"}}, {"match_all": {}}, {"term": {"login": "* OR login:* \\\\ \u00e9'
LOGINS = ["alice@example.org", "bob@example.org", EVIL, "*"]
GEOS = [Enrichment("DE", "Berlin", 52.5, 13.4, 3320, "DTAG"),
        Enrichment("FR", "Paris", 48.9, 2.35, 3215, "Orange")]


@pytest.fixture
async def worker(elastic_url: str) -> AsyncIterator[tuple[LuaState, list[Event], VirtualClock]]:
    clock = VirtualClock(start=START)
    log = ElasticEventLog(parse_elastic_url(elastic_url), clock)
    await log.open()
    rng = random.Random(11)
    try:
        for _ in range(40):  # batches share one `received`, as group commit does
            await asyncio.gather(*(log.append(Report(
                t=clock.time(), login=rng.choice(LOGINS[:3]), remote=f"192.0.2.{rng.randint(1, 9)}",
                success=rng.random() < 0.5, geo=rng.choice(GEOS),
            )) for _ in range(rng.randint(1, 6))))
            await clock.advance(rng.choice([1.0, 60.0, 3600.0]))
        events = await log.read(0, 10_000)
        host = Host(clock=clock)
        host.eventlog = log
        state = LuaState(StateKind.WORKER, host)
        state.lua.globals().evil = EVIL
        yield state, events, clock
    finally:
        await log.close()


def recent_seqs(state: LuaState, login_expr: str, n: int, since: float) -> list[int]:
    (seqs,) = state.execute(f"""
        local r = esQuery("login_recent", {{login={login_expr}, n={n}, since={since!r}}})
        local seqs = {{}}
        for i, hit in ipairs(r.hits.hits) do seqs[i] = hit._source.seq end
        return table.concat(seqs, ",")
    """)
    return [int(s) for s in seqs.split(",")] if seqs else []


def test_a_report_sees_only_the_events_before_it(worker) -> None:
    """login_recent inside report(lt), at random points, against the events read back."""
    state, events, _ = worker
    rng = random.Random(3)
    checked = 0
    for lt in rng.sample(events, 25):
        state.as_of_seq = lt.seq  # as the runner sets it while report(lt) runs
        login = rng.choice(LOGINS[:2])
        since = rng.choice([START, lt.received - 3600.0])
        want = [e.seq for e in reversed(events)
                if e.seq < lt.seq and e.report.login == login and e.received >= since][:20]
        assert recent_seqs(state, f'"{login}"', 20, since) == want
        checked += len(want)
    assert checked > 50


def test_aggregations_come_back_as_tables(worker) -> None:
    state, events, _ = worker
    state.as_of_seq = None
    login = LOGINS[0]
    mine = [e for e in events if e.report.login == login]
    counts: dict[str, int] = {}
    for e in mine:
        counts[e.report.geo.country] = counts.get(e.report.geo.country, 0) + 1
    (text,) = state.execute(f"""
        local r = esQuery("login_history", {{login="{login}"}})
        local out = {{}}
        for _, b in ipairs(r.aggregations.countries.buckets) do
          out[#out + 1] = b.key .. "=" .. b.doc_count
        end
        table.sort(out)
        return table.concat(out, " ")
    """)
    assert text == " ".join(sorted(f"{k}={v}" for k, v in counts.items()))


def test_a_parameter_is_data_whatever_it_holds(worker) -> None:
    """A login of JSON and Lucene metacharacters finds exactly its own events; "*" none."""
    state, events, _ = worker
    state.as_of_seq = None
    evil = [e.seq for e in reversed(events) if e.report.login == EVIL]
    assert 0 < len(evil) < len(events)
    assert recent_seqs(state, "evil", 500, START) == evil
    assert recent_seqs(state, '"*"', 500, START) == []
    body = load_query("login_recent").bind({"login": EVIL, "n": 3, "since": START})
    assert body["query"]["bool"]["filter"][0] == {"term": {"login": EVIL}}
    assert body["size"] == 3 and type(body["size"]) is int


def test_outside_report_only_events_received_up_to_now(worker) -> None:
    state, events, clock = worker
    state.as_of_seq = None
    assert len(recent_seqs(state, '"alice@example.org"', 500, START)) == sum(
        e.report.login == "alice@example.org" for e in events)
    state.host.clock = VirtualClock(start=START - 1)  # before every event: nothing is visible
    assert recent_seqs(state, '"alice@example.org"', 500, START) == []


@pytest.mark.parametrize(("code", "message"), [
    ('esQuery("no_such_query", {})', "no stored query 'no_such_query'"),
    ('esQuery("../templates/trackalert-events", {})', "no stored query '../templates"),
    ('esQuery("login_history", {})', "missing parameter 'login'"),
    ('esQuery("login_history", {login="a", logn="b"})', "unknown parameter 'logn'"),
    ('esQuery("login_history", {login=5})', "parameter 'login' must be a string, got number"),
    ('esQuery("login_recent", {login="a", since=0, n=2.5})', "parameter 'n' must be a integer"),
    ('esQuery("login_recent", {login="a", since="0", n=2})', "'since' must be a number, got string"),
    ('esQuery("login_history", "alice")', "params must be a table"),
    ('esQuery("alerts_per_policy_per_day", {})', "alerts index"),
])
def test_errors_name_the_query_and_the_parameter(worker, code, message) -> None:
    state, _, _ = worker
    with pytest.raises(LuaError) as caught:
        state.execute(code)
    assert message in str(caught.value)


async def test_a_sqlite_log_says_esquery_needs_elasticsearch(tmp_path: Path) -> None:
    log = SQLiteEventLog(tmp_path / "events.db", VirtualClock(start=START))
    await log.open()
    try:
        state = LuaState(StateKind.WORKER, Host(eventlog=log))
        with pytest.raises(LuaError, match="esQuery needs an Elasticsearch event log"):
            state.execute('return esQuery("login_history", {login="alice"})')
    finally:
        await log.close()


def test_every_stored_query_parses_and_a_partial_placeholder_is_refused() -> None:
    params = {name: dict(load_query(name).params) for name in query_names()}
    assert params["login_history"] == {"login": "string"}
    assert params["login_recent"] == {"login": "string", "n": "integer", "since": "number"}
    with pytest.raises(StoredQueryError, match="not a placeholder"):
        parse_query("bad", '{"query": {"term": {"login": "user-{{login}}"}}}')
    with pytest.raises(StoredQueryError, match="not a placeholder"):
        parse_query("bad", '{"size": "{{n:float}}"}')
    with pytest.raises(StoredQueryError, match="two types"):
        parse_query("bad", '{"a": "{{n}}", "b": "{{n:integer}}"}')
