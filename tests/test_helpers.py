"""The long-term helpers on a real SQLite log, checked against brute force over the same events."""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from trackalert.clock import VirtualClock
from trackalert.eventlog.base import Event
from trackalert.eventlog.filters import AsOf, Filter, FilterError, parse_field, parse_filter
from trackalert.eventlog.sqlite import SQLiteEventLog
from trackalert.lua.host import Host
from trackalert.lua.state import LuaError, LuaState, StateKind
from trackalert.report import Enrichment, Report

START = 1_700_000_000.0
LOGINS = [f"user{i}@example.org" for i in range(12)]
REMOTES = ["192.0.2.1", "192.0.2.77", "192.0.2.200", "198.51.100.5", "198.51.100.6",
           "203.0.113.9", "2001:db8::1", "2001:db8::2:1"]
GEOS = [None, Enrichment("DE", "Berlin", 52.5, 13.4, 3320, "DTAG"),
        Enrichment("FR", "Paris", 48.9, 2.35, 3215, "Orange"), Enrichment("RU", "", None, None, 12389, "")]
BROWSERS = ["Chrome", "Firefox", "Safari"]


def make_reports(rng: random.Random, n: int) -> list[Report]:
    reports = []
    for i in range(n):
        browser = rng.choice(BROWSERS + [None])
        reports.append(Report(
            t=START + i, login=rng.choice(LOGINS), remote=rng.choice(REMOTES),
            pwhash=rng.choice(["aaaa", "bbbb", "cccc", ""]), success=rng.random() < 0.6,
            protocol=rng.choice(["imap", "http"]),
            attrs={"site": rng.choice(["a", "b"])} if rng.random() < 0.7 else {},
            device_attrs={"browser.family": browser} if browser else {},
            geo=rng.choice(GEOS),
        ))
    return reports


@pytest.fixture
async def filled(tmp_path: Path) -> AsyncIterator[tuple[SQLiteEventLog, list[Event], VirtualClock]]:
    clock = VirtualClock(start=START)
    log = SQLiteEventLog(tmp_path / "events.db", clock)
    await log.open()
    rng = random.Random(7)
    reports = make_reports(rng, 400)
    position = 0
    while position < len(reports):  # batches share one `received`, as group commit does
        size = rng.randint(1, 4)
        await asyncio.gather(*(log.append(r) for r in reports[position:position + size]))
        position += size
        await clock.advance(rng.choice([1.0, 30.0, 600.0, 3600.0]))
    events = await log.read(0, 10_000)
    assert len(events) == 400
    try:
        yield log, events, clock
    finally:
        await log.close()


# ---------------------------------------------------------------------------- brute force


def visible(events: list[Event], flt: Filter, as_of: AsOf) -> list[Event]:
    """The events a helper may see, computed the slow and obvious way."""
    if as_of.before_seq is not None:
        pool = [e for e in events if e.seq < as_of.before_seq]
        now = next(e.received for e in events if e.seq == as_of.before_seq)
        end = None
    else:
        pool, now, end = list(events), as_of.now, as_of.now
    out = []
    for e in pool:
        r = e.report
        if flt.window is not None and e.received < now - flt.window:
            continue
        if flt.since is not None and e.received < flt.since:
            continue
        if flt.until is not None and e.received > flt.until:
            continue
        if end is not None and e.received > end:
            continue
        if flt.login is not None and r.login != flt.login:
            continue
        if flt.remote is not None and r.remote != flt.remote:
            continue
        if flt.netmask is not None and ipaddress.ip_address(r.remote) not in ipaddress.ip_network(flt.netmask):
            continue
        if flt.success is not None and r.success != flt.success:
            continue
        if flt.protocol is not None and r.protocol != flt.protocol:
            continue
        if flt.pwhash is not None and r.pwhash != flt.pwhash:
            continue
        if flt.country is not None and (r.geo.country if r.geo else None) != flt.country:
            continue
        if flt.asn is not None and (r.geo.asn if r.geo else None) != flt.asn:
            continue
        if any(r.device_attrs.get(k) != v for k, v in flt.device_attrs):
            continue
        if any(r.attrs.get(k) != v for k, v in flt.attrs):
            continue
        out.append(e)
    return out


def value_of(event: Event, field: str) -> Any:
    r = event.report
    if field.startswith("device_attrs."):
        return r.device_attrs.get(field[len("device_attrs."):])
    if field.startswith("attrs."):
        return r.attrs.get(field[len("attrs."):])
    if field.startswith("remote/"):
        return str(ipaddress.ip_network(f"{r.remote}/{field[7:]}", strict=False))
    if field in ("country", "city", "asn", "isp"):
        value = getattr(r.geo, field) if r.geo else None
        return value or None
    return getattr(r, field)


FILTERS: list[dict[str, Any]] = [
    {}, {"login": LOGINS[0]}, {"login": LOGINS[1], "success": True}, {"remote": "192.0.2.77"},
    {"remote": "2001:db8::1", "success": False}, {"netmask": "192.0.2.0/24"},
    {"netmask": "2001:db8::/32", "success": True}, {"success": False}, {"protocol": "http"},
    {"pwhash": "aaaa", "success": False}, {"pwhash": "bbbb"}, {"country": "DE"},
    {"asn": 3215}, {"device_attrs.browser.family": "Firefox"}, {"attrs.site": "b"},
    {"login": LOGINS[2], "country": "FR", "device_attrs.browser.family": "Chrome"},
    {"window": "2h"}, {"window": 86400}, {"since": START + 20_000}, {"until": START + 50_000},
    {"since": START + 10_000, "until": START + 90_000, "success": True},
    {"login": LOGINS[3], "window": "1d"}, {"netmask": "198.51.100.0/24", "window": "12h"},
    {"login": LOGINS[4], "pwhash": "cccc", "success": False, "window": "7d", "attrs.site": "a"},
]


@pytest.mark.parametrize("spec", FILTERS, ids=lambda s: ",".join(sorted(s)) or "all")
async def test_count_first_last_recent_agree_with_brute_force(filled, spec) -> None:
    log, events, clock = filled
    queries = log.queries()
    flt = parse_filter(spec.items())
    points = [AsOf(now=clock.time()), AsOf(now=START + 40_000)] + [
        AsOf(before_seq=s) for s in (1, 2, 57, 200, 399, 400)
    ]
    for as_of in points:
        expected = visible(events, flt, as_of)
        assert queries.count_reports(flt, as_of) == len(expected), as_of
        assert queries.first_seen(flt, as_of) == (expected[0].received if expected else None)
        assert queries.last_seen(flt, as_of) == (expected[-1].received if expected else None)
        recent = queries.recent_reports(flt, 5, as_of)
        assert [e.seq for e in recent] == [e.seq for e in reversed(expected)][:5]
        assert [e.report for e in recent] == [e.report for e in reversed(expected)][:5]


FIELDS = ["login", "remote", "pwhash", "protocol", "country", "asn", "city", "isp",
          "device_attrs.browser.family", "attrs.site", "remote/24", "remote/16"]


@pytest.mark.parametrize("field", FIELDS)
async def test_count_distinct_and_top_values_agree_with_brute_force(filled, field) -> None:
    log, events, clock = filled
    queries = log.queries()
    for spec in FILTERS:
        flt = parse_filter(spec.items())
        for as_of in (AsOf(now=clock.time()), AsOf(before_seq=250)):
            counts = Counter(v for e in visible(events, flt, as_of)
                             if (v := value_of(e, field)) is not None)
            assert queries.count_distinct(parse_field(field), flt, as_of) == len(counts), spec
            expected = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
            assert queries.top_values(parse_field(field), flt, 3, as_of) == expected, spec


async def test_a_report_never_sees_itself_or_later_events(filled) -> None:
    log, events, _ = filled
    queries = log.queries()
    for event in events[::37]:
        same = parse_filter({"login": event.report.login}.items())
        seen = queries.recent_reports(same, 1000, AsOf(before_seq=event.seq))
        assert all(e.seq < event.seq for e in seen)
        assert len(seen) == sum(1 for e in events if e.seq < event.seq and e.report.login == event.report.login)


async def test_background_sees_only_events_received_up_to_now(filled) -> None:
    log, events, _ = filled
    queries = log.queries()
    middle = events[200].received
    assert queries.count_reports(Filter(), AsOf(now=middle)) == sum(1 for e in events if e.received <= middle)
    assert queries.count_reports(Filter(), AsOf(now=START - 1)) == 0


async def test_the_chosen_index_is_used(filled) -> None:
    log, _, clock = filled
    queries = log.queries()
    conn = queries._conn()
    for spec, index in (({"login": "x", "success": True, "window": "1d"}, "ix_events_login"),
                        ({"netmask": "192.0.2.0/24", "success": False}, "ix_events_ip"),
                        ({"remote": "192.0.2.1", "success": False, "window": "1h"}, "ix_events_ip"),
                        ({"pwhash": "aaaa", "success": False}, "ix_events_pwhash_failed")):
        source, where, params = queries._where(conn, parse_filter(spec.items()), AsOf(now=clock.time()))
        plan = " ".join(str(r) for r in conn.execute(f"EXPLAIN QUERY PLAN SELECT count(*) FROM {source} WHERE {where}", params))
        assert index in plan, plan


# ---------------------------------------------------------------------------- from Lua


@pytest.fixture
def worker(filled) -> tuple[LuaState, list[Event], VirtualClock]:
    log, events, clock = filled
    host = Host(clock=clock)
    host.eventlog = log
    return LuaState(StateKind.WORKER, host), events, clock


def test_helpers_from_lua(worker) -> None:
    state, events, clock = worker
    login = LOGINS[0]
    mine = [e for e in events if e.report.login == login]
    state.as_of_seq = mine[-1].seq  # as the runner sets it while report(lt) runs
    result = state.execute(f"""
        local f = {{login="{login}"}}
        local top = topValues("remote", f, 2)
        local recent = recentReports(f, 2)
        return countReports(f), countDistinct("remote", f), #top, top[1].value, top[1].count,
               firstSeen(f), lastSeen(f), #recent, recent[1].login, recent[1].seq
    """)
    before = mine[:-1]
    remotes = Counter(e.report.remote for e in before)
    top = sorted(remotes.items(), key=lambda kv: (-kv[1], kv[0]))
    assert result == (len(before), len(remotes), 2, top[0][0], top[0][1], before[0].received,
                      before[-1].received, 2, login, before[-1].seq)
    state.as_of_seq = None
    assert state.execute(f'return countReports({{login="{login}"}})') == (len(mine),)
    assert state.execute("return countReports()") == (len(events),)
    state.host.clock = VirtualClock(start=START - 1)  # a now before every event: nothing visible
    assert state.execute("return countReports(), firstSeen({})") == (0,)


def test_recent_reports_carry_enrichment_and_attributes(worker) -> None:
    state, events, _ = worker
    newest_de = [e for e in events if e.report.geo and e.report.geo.country == "DE"][-1]
    assert state.execute("""
        local r = recentReports({country="DE"}, 1)[1]
        return r.country, r.city, r.asn, r.isp, r.remote, r.seq, r.success, r.latitude
    """) == ("DE", "Berlin", 3320, "DTAG", newest_de.report.remote, newest_de.seq,
             newest_de.report.success, 52.5)


@pytest.mark.parametrize(("code", "message"), [
    ('countReports({logn="x"})', "unknown filter key 'logn'"),
    ('countReports({success="yes"})', "filter key 'success' must be a boolean"),
    ('countReports({window="forever"})', "filter key 'window'"),
    ('countReports({netmask="300.1.2.0/24"})', "filter key 'netmask'"),
    ('countReports({remote="not an address"})', "filter key 'remote'"),
    ('countReports({asn="AS1"})', "filter key 'asn' must be a number"),
    ('countReports("alice")', "filter must be a table"),
    ('countDistinct("colour", {})', "unknown field 'colour'"),
    ('topValues("remote/20", {}, 3)', "multiple of 8"),
    ('recentReports({}, "ten")', "n must be a number"),
])
def test_bad_filters_raise_a_lua_error_naming_the_problem(worker, code, message) -> None:
    state, _, _ = worker
    with pytest.raises(LuaError) as caught:
        state.execute(code)
    assert message in str(caught.value)
    assert code.split("(")[0] + "()" in str(caught.value)


def test_filter_values_accept_lua_addresses_and_numbers(worker) -> None:
    state, events, _ = worker
    expected = sum(1 for e in events if e.report.remote.startswith("192.0.2."))
    assert state.execute('return countReports({netmask=newNetmask("192.0.2.0/24")}), '
                         'countReports({remote=newCA("192.0.2.1")})')[0] == expected
    with pytest.raises(FilterError):
        parse_filter([(1, "x")])


def test_helpers_need_an_open_log() -> None:
    state = LuaState(StateKind.WORKER, Host())
    with pytest.raises(LuaError, match="event log is not open"):
        state.execute("return countReports({})")


async def test_per_login_helpers_never_read_the_table(filled) -> None:
    """The per-login questions are answered from ix_events_login alone (the 2 ms p99 promise)."""
    log, _, clock = filled
    queries = log.queries()
    conn = queries._conn()
    flt = parse_filter({"login": "x", "success": True, "window": "180d"}.items())
    source, where, params = queries._where(conn, flt, AsOf(now=clock.time()))
    for select in ("count(*)", "min(seq)", "count(DISTINCT country)", "count(DISTINCT ip)"):
        plan = " ".join(str(r) for r in conn.execute(
            f"EXPLAIN QUERY PLAN SELECT {select} FROM {source} WHERE {where}", params))
        assert "COVERING INDEX ix_events_login" in plan, (select, plan)


async def test_time_to_seq_search_is_exact_with_gaps_and_any_previous_answer(filled) -> None:
    """The one-seek search (ix_events_received) finds the same seq as a scan, even where
    retention or a failed batch left holes in the seqs, and ties share one `received`."""
    import sqlite3 as sqlite

    log, events, _ = filled
    with sqlite.connect(log.path) as db:
        db.execute("DELETE FROM events WHERE seq IN (1, 2, 3, 50, 51, 52, 53, 120, 300)")
    stored = [e for e in events if e.seq not in (1, 2, 3, 50, 51, 52, 53, 120, 300)]
    queries = log.queries()
    conn = queries._conn()
    rng = random.Random(11)
    times = sorted({e.received for e in stored})
    probes = [t + d for t in times for d in (-0.5, 0.0, 0.5)] + [START - 5, times[-1] + 5]
    rng.shuffle(probes)
    for when in probes:
        for strict in (False, True):
            expected = next((e.seq for e in stored if (e.received > when if strict else e.received >= when)),
                            stored[-1].seq + 1)
            assert queries._first_seq(conn, when, strict) == expected, (when, strict)


async def test_a_window_start_is_one_seek_of_the_received_index(filled) -> None:
    """Every windowed helper turns its time bound into a seq first; that must be one index seek
    (migration 0006), not a search over primary-key probes nor a scan."""
    from trackalert.eventlog.queries import _FIRST_AFTER, _FIRST_FROM

    log, events, _ = filled
    queries = log.queries()
    conn = queries._conn()
    calls: list[str] = []
    conn.set_trace_callback(calls.append)
    try:
        for strict in (False, True):
            queries._first_seq(conn, events[200].received, strict)
    finally:
        conn.set_trace_callback(None)
    assert len(calls) == 2, calls
    for sql in (_FIRST_FROM, _FIRST_AFTER):
        plan = " ".join(str(r) for r in conn.execute("EXPLAIN QUERY PLAN " + sql, (0.0,)))
        assert "SEARCH events USING COVERING INDEX ix_events_received" in plan, plan
