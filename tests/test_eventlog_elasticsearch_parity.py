"""Helper parity: the same generated history in a SQLite log and an Elasticsearch log (osmem-server,
or the cluster of TRACKALERT_TEST_ES_URL); every helper, with every filter key and field, as of
many points of the log, must give the same answer on both."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from elastic_server import elastic_base, elastic_url  # noqa: F401  (fixtures)
from trackalert.clock import VirtualClock
from trackalert.eventlog.alerts import AlertFilter
from trackalert.eventlog.base import EventLog, EventQueries
from trackalert.eventlog.elasticsearch import ElasticEventLog
from trackalert.eventlog.es_client import parse_elastic_url
from trackalert.eventlog.filters import FIELDS, AsOf, parse_field, parse_filter
from trackalert.eventlog.sqlite import SQLiteEventLog
from trackalert.lua.stored_queries import parse_query
from trackalert.report import Enrichment, Report

START = 1_700_000_000.0
LOGINS = [f"user{i}@example.org" for i in range(10)] + ["", "jörg@example.org"]
REMOTES = ["192.0.2.1", "192.0.2.77", "192.0.2.200", "198.51.100.5", "198.51.100.6",
           "203.0.113.9", "10.1.2.3", "2001:db8::1", "2001:db8::2:1", "2001:db8:1::5"]
GEOS = [None, Enrichment("DE", "Berlin", 52.5, 13.4, 3320, "DTAG"),
        Enrichment("FR", "Paris", 48.9, 2.35, 3215, "Orange"),
        Enrichment("RU", "", None, None, 12389, ""), Enrichment("", "", None, None, None, ""),
        Enrichment("NL", "", 52.4, None, None, "")]
DEVICES = [{}, {"browser.family": "Firefox", "os.family": "Linux"},
           {"browser.family": "Chrome", "os.family": "Windows", "device.family": "Other"},
           {"os": "iOS", "os.family": "iOS"},  # a mapped object would refuse this one
           {"browser.family": "Safari"}]
ATTRS = [{}, {"site": "a"}, {"site": "b", "ünïcode": "jaé"}, {"a=b": "x", "back\\slash": "y"},
         {"site": "a", "empty": ""}]
EVENTS = 1500


def make_reports(rng: random.Random, n: int) -> list[Report]:
    return [Report(
        t=START + i + rng.random(), login=rng.choice(LOGINS), remote=rng.choice(REMOTES),
        pwhash=rng.choice(["aaaa", "bbbb", "cccc", ""]), success=rng.random() < 0.6,
        policy_reject=rng.random() < 0.2, protocol=rng.choice(["imap", "http", ""]),
        tls=rng.random() < 0.5, device_id=rng.choice(["", "Mozilla/5.0 (X11)", "imap-client"]),
        session_id=rng.choice(["", f"s{i % 40}"]), fail_type=rng.choice(["", "credentials", "account"]),
        attrs=rng.choice(ATTRS), attrs_mv=rng.choice([{}, {"groups": ("admin", "staff")}]),
        device_attrs=rng.choice(DEVICES), geo=rng.choice(GEOS),
    ) for i in range(n)]


@pytest.fixture
async def both(tmp_path: Path, elastic_url: str) -> AsyncIterator[tuple[EventLog, EventLog, list]]:
    """(SQLite log, Elasticsearch log, their events), filled with the same batches at the same
    virtual times (batches share one `received`, as group commit does; some times repeat)."""
    sqlite_clock, es_clock = VirtualClock(start=START), VirtualClock(start=START)
    sqlite_log = SQLiteEventLog(tmp_path / "events.db", sqlite_clock)
    es_log = ElasticEventLog(parse_elastic_url(elastic_url), es_clock)
    await sqlite_log.open()
    await es_log.open()
    try:
        rng = random.Random(11)
        reports = make_reports(rng, EVENTS)
        position = 0
        while position < len(reports):
            chunk = reports[position:position + rng.randint(1, 6)]
            for log in (sqlite_log, es_log):
                await asyncio.gather(*(log.append(r) for r in chunk))
            position += len(chunk)
            step = rng.choice([0.0, 1.0, 30.0, 600.0, 3600.0])
            await sqlite_clock.advance(step)
            await es_clock.advance(step)
        events = await sqlite_log.read(0, 10_000)
        assert await es_log.read(0, 10_000) == events  # the same log, field for field
        yield sqlite_log, es_log, events
    finally:
        await es_log.close()
        await sqlite_log.close()


FILTER_VALUES: dict[str, list[Any]] = {
    "login": LOGINS[:4] + ["", "nobody"], "remote": REMOTES[:3] + ["2001:db8::1", "192.0.2.99"],
    "netmask": ["192.0.2.0/24", "198.51.100.0/30", "2001:db8::/32", "10.0.0.0/8", "192.0.2.64/26"],
    "success": [True, False], "protocol": ["imap", "http", ""], "pwhash": ["aaaa", "cccc", ""],
    "country": ["DE", "FR", "NL", ""], "asn": [3320, 12389, 1],
    "device_attrs.browser.family": ["Firefox", "Chrome"], "device_attrs.os": ["iOS"],
    "device_attrs.os.family": ["Linux", "iOS"], "attrs.site": ["a", "b"], "attrs.a=b": ["x"],
    "attrs.empty": [""], "attrs.ünïcode": ["jaé"],
    "window": ["1h", "6h", "2d", 90.0], "since": [START + 3600 * k for k in (0, 5, 40)],
    "until": [START + 3600 * k for k in (2, 30, 200)],
}
COUNTED = list(FIELDS) + ["device_attrs.browser.family", "device_attrs.os.family", "device_attrs.os",
                          "attrs.site", "attrs.a=b", "attrs.ünïcode", "attrs.empty",
                          "remote/24", "remote/16", "remote/64", "remote/8", "remote/128"]


#: countNear's points (latitude, longitude, km): around and between the history's places.
NEAR = [(52.5, 13.4, 1.0), (50.0, 8.0, 500.0), (48.0, 5.0, 300.0), (0.0, 0.0, 20_000.0)]


def random_filter(rng: random.Random) -> dict[str, Any]:
    keys = rng.sample(sorted(FILTER_VALUES), rng.choice([0, 1, 1, 2, 2, 3]))
    return {key: rng.choice(FILTER_VALUES[key]) for key in keys}


def answers(q: EventQueries, spec: dict[str, Any], fields: list[str], as_of: AsOf) -> dict:
    flt = parse_filter(spec.items())
    out: dict[str, Any] = {
        "count": q.count_reports(flt, as_of), "first": q.first_seen(flt, as_of),
        "last": q.last_seen(flt, as_of), "recent": q.recent_reports(flt, 6, as_of),
        "rows": q.recent_rows(flt, 3, as_of),
        "places": q.recent_columns(flt, 5, as_of, (0, 16, 18, 19)),  # seq, country, lat, lon
        "near": [q.count_near(flt, n, *point, enough, as_of)
                 for n, enough in ((3, None), (200, None), (200, 2)) for point in NEAR],
    }
    for name in fields:
        field = parse_field(name)
        out[f"distinct {name}"] = q.count_distinct(field, flt, as_of)
        out[f"top {name}"] = q.top_values(field, flt, 4, as_of)
    return out


async def test_every_helper_gives_sqlites_answers(both) -> None:
    sqlite_log, es_log, events = both
    rng = random.Random(5)
    sqlite_q, es_q = sqlite_log.queries(), es_log.queries()
    last = events[-1]
    points = [AsOf(before_seq=rng.choice(events).seq) for _ in range(40)] + [
        AsOf(before_seq=last.seq), AsOf(before_seq=1), AsOf(now=last.received),
        AsOf(now=START - 1)] + [AsOf(now=rng.choice(events).received + rng.choice([0, 0.5]))
                                for _ in range(20)]
    specs = [{}, {"login": LOGINS[0]}, {"success": False, "window": "6h"}] + [
        random_filter(rng) for _ in range(70)]
    compared = nonzero = 0
    for i, spec in enumerate(specs):
        fields = COUNTED if i < 3 else rng.sample(COUNTED, 3)
        for as_of in (rng.sample(points, 2) if i >= 3 else points[:2] + points[-2:]):
            expected = answers(sqlite_q, spec, fields, as_of)
            got = answers(es_q, spec, fields, as_of)
            assert got == expected, (spec, as_of, {k: (v, got[k]) for k, v in expected.items()
                                                   if got[k] != v})
            compared += len(expected)
            nonzero += expected["count"] > 0
    # the comparison is about real answers, not empty ones
    assert compared > 1500 and nonzero > 60
    every_key = {key.split(".")[0] for spec in specs for key in spec}
    assert every_key >= {"login", "remote", "netmask", "success", "protocol", "pwhash", "country",
                         "asn", "device_attrs", "attrs", "window", "since", "until"}


async def test_the_sample_queries_run_on_our_fields(elastic_url: str) -> None:
    """Every search body of elasticqueries/queries runs on the events index and finds events
    (their dates moved to the history's own time)."""
    clock = VirtualClock(start=START)
    log = ElasticEventLog(parse_elastic_url(elastic_url), clock)
    await log.open()
    try:
        for chunk in range(20):
            await asyncio.gather(*(log.append(r) for r in make_reports(random.Random(chunk), 10)))
            await clock.advance(3600.0)
        client = log._client
        assert client is not None
        root = Path(__file__).resolve().parent.parent / "elasticqueries" / "queries"
        ran = 0
        for path in sorted(root.glob("*.json")):
            if path.name.startswith("alerts"):
                continue  # the alerts index's: the next test
            text = path.read_text().replace('"now-', f'"{int(clock.time() * 1000)}||-')
            query = parse_query(path.stem, text)
            params = {"login": LOGINS[1], "network": "192.0.2.0/24", "n": 5, "since": START}
            body = query.bind({name: params[name] for name in query.params})
            result = await client.search(index=log.events_index, **body)
            assert result["hits"]["total"]["value"] > 0, path.name
            ran += 1
        assert ran == 5
    finally:
        await log.close()


async def test_the_alerts_sample_query_counts_each_policys_alerts_per_day(elastic_url: str) -> None:
    """elasticqueries/queries/alerts_per_policy_per_day.json on the alerts index the log
    records into: its buckets are a Python recount of the recorded alerts."""
    from test_alerts import history

    clock = VirtualClock(start=START)
    log = ElasticEventLog(parse_elastic_url(elastic_url), clock)
    await log.open()
    try:
        alerts = [dataclasses.replace(alert, time=START + 613.0 * i, created=START + 613.0 * i)
                  for i, alert in enumerate(history(500, seed=3))]  # ~3.5 days
        store = log.alerts()
        for alert in alerts:
            assert await asyncio.to_thread(store.record, alert)
        now = START + 613.0 * 500
        expected = collections.Counter(
            (int(a.time * 1000) // 86_400_000 * 86_400_000, a.policy) for a in alerts
            if a.policy is not None)
        root = Path(__file__).resolve().parent.parent / "elasticqueries" / "queries"
        text = (root / "alerts_per_policy_per_day.json").read_text()
        query = parse_query("alerts_per_policy_per_day", text.replace('"now-', f'"{int(now * 1000)}||-'))
        await asyncio.to_thread(store.count, AlertFilter(), AsOf())  # this node's writes searchable
        assert log._client is not None
        result = await log._client.search(index=log.alerts_index, **query.bind({}))
        found = collections.Counter({(day["key"], policy["key"]): policy["doc_count"]
                                     for day in result["aggregations"]["per_day"]["buckets"]
                                     for policy in day["per_policy"]["buckets"]})
        assert found == expected and len({day for day, _ in expected}) >= 4
    finally:
        await log.close()
