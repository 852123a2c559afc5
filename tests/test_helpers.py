"""The long-term helpers on a real SQLite log, checked against brute force over the same events."""

from __future__ import annotations

import asyncio
import ipaddress
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from trackalert.clock import VirtualClock
from trackalert.eventlog.base import REPORT_COLUMNS, Event, EventQueries
from trackalert.eventlog.filters import AsOf, Filter, FilterError, parse_field, parse_filter
from trackalert.eventlog.places import distance_km
from trackalert.eventlog.sqlite import SQLiteEventLog
from trackalert.lua.convert import ARGS_MAX, call_with_tuple, tuple_runner
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


#: (latitude, longitude, km) asked of countNear: Berlin and Paris (GEOS) inside, outside and
#: exactly at the edge (a place at exactly `km` is not nearer than it: the same in SQL).
NEAR_POINTS = [(52.5, 13.4, 1.0), (50.0, 8.0, 500.0), (50.0, 8.0, distance_km(48.9, 2.35, 50.0, 8.0)),
               (50.0, 8.0, distance_km(52.5, 13.4, 50.0, 8.0)), (-33.9, 151.2, 20_000.0),
               (48.9, 2.35, 0.0), (0.0, -179.9, 1e9)]


def near_brute_force(events: list[Event], flt: Filter, n: int, as_of: AsOf,
                     point: tuple[float, float, float], enough: int | None) -> int:
    latitude, longitude, km = point
    newest = list(reversed(visible(events, flt, as_of)))[:n]
    found = sum(1 for e in newest if e.report.geo and e.report.geo.latitude is not None
                and distance_km(e.report.geo.latitude, e.report.geo.longitude, latitude, longitude) < km)
    return found if enough is None else min(found, enough)


@pytest.mark.parametrize("spec", FILTERS, ids=lambda s: ",".join(sorted(s)) or "all")
async def test_count_near_agrees_with_brute_force(filled, spec) -> None:
    """SQLite's one aggregate, and the generic path of the other backends (and of an SQLite
    without math functions), count what measuring the newest n matching events counts."""
    log, events, clock = filled
    queries = log.queries()
    assert queries._has_math(queries._conn())  # else the aggregate below would not be tested
    flt = parse_filter(spec.items())
    for as_of in (AsOf(now=clock.time()), AsOf(before_seq=250), AsOf(before_seq=1)):
        for n, enough in ((0, None), (1, None), (7, None), (200, None), (200, 3), (7, 1), (9, 0)):
            for point in NEAR_POINTS:
                expected = near_brute_force(events, flt, n, as_of, point, enough)
                found = queries.count_near(flt, n, *point, enough, as_of)
                assert found == expected, (as_of, n, point, enough)
                assert EventQueries.count_near(queries, flt, n, *point, enough, as_of) == expected


def test_the_sql_distance_is_pythons_to_the_last_bit(tmp_path: Path) -> None:
    """NEAR_SQL is distance_km's operations in the same order: a place at exactly the distance
    Python measures is not counted, one ulp further it is, for places all over the globe."""
    import math
    import sqlite3 as sqlite

    from trackalert.eventlog.places import NEAR_SQL, near_params

    rng = random.Random(3)
    conn = sqlite.connect(tmp_path / "d.db")
    for _ in range(2000):
        lat1, lat2 = rng.uniform(-90, 90), rng.uniform(-90, 90)
        lon1, lon2 = rng.uniform(-180, 180), rng.uniform(-180, 180)
        km = distance_km(lat1, lon1, lat2, lon2)
        for edge, counted in ((km, 0), (math.nextafter(km, math.inf), 1)):
            found = conn.execute(f"SELECT count(*) FROM (SELECT ? AS latitude, ? AS longitude) "
                                 f"WHERE {NEAR_SQL}", [lat1, lon1] + near_params(lat2, lon2, edge))
            assert found.fetchone()[0] == counted, (lat1, lon1, lat2, lon2)


def test_the_sql_checks_before_the_distance_never_leave_out_a_near_place(tmp_path: Path) -> None:
    """NEAR_SQL's cheap checks (lower bounds of the distance) count exactly what the formula
    alone counts, for places all over the globe, near the poles and across the date line."""
    import sqlite3 as sqlite

    from trackalert.eventlog.places import NEAR_SQL, near_params

    rng = random.Random(4)
    conn = sqlite.connect(tmp_path / "d.db")
    checks = NEAR_SQL.count(" AND ")
    assert checks == 2  # the two checks, then the formula: the last term
    formula = NEAR_SQL.split(" AND ")[-1]
    for _ in range(3000):
        lat1, lon1 = rng.uniform(-90, 90), rng.uniform(-180, 180)
        if rng.random() < 0.5:  # a place nearby (a neighbourhood of lat1, lon1)
            lat2 = max(-90.0, min(90.0, lat1 + rng.uniform(-8, 8)))
            lon2 = (lon1 + rng.uniform(-30, 30) + 180) % 360 - 180
        else:
            lat2, lon2 = rng.uniform(-90, 90), rng.uniform(-180, 180)
        km = rng.choice([rng.uniform(0, 3000), rng.uniform(0, 21_000),
                         distance_km(lat1, lon1, lat2, lon2) * rng.uniform(0.999, 1.001)])
        row = "(SELECT ? AS latitude, ? AS longitude)"
        both = conn.execute(f"SELECT count(*) FROM {row} WHERE {NEAR_SQL}",
                            [lat1, lon1] + near_params(lat2, lon2, km)).fetchone()[0]
        alone = conn.execute(f"SELECT count(*) FROM {row} WHERE {formula}",
                             [lat1, lon1] + near_params(lat2, lon2, km)[-9:]).fetchone()[0]
        assert both == alone == int(distance_km(lat1, lon1, lat2, lon2) < km), (lat1, lon1, lat2, lon2, km)


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


def test_count_near_from_lua_inside_report_and_out(worker) -> None:
    """As of lt inside report(lt), as of now outside: the answers of the queries."""
    state, events, clock = worker
    queries = state.host.eventlog.queries()
    login = LOGINS[2]
    mine = [e for e in events if e.report.login == login]
    flt = parse_filter({"login": login, "success": True}.items())
    state.as_of_seq = mine[-1].seq
    as_of = AsOf(before_seq=mine[-1].seq)
    inside = state.execute(f'return countNear({{login="{login}", success=true}}, 50, 50, 8, 700)')
    assert inside == (queries.count_near(flt, 50, 50.0, 8.0, 700.0, None, as_of),)
    assert inside[0] > 2  # something located was counted
    assert state.execute(f'return countNear({{login="{login}", success=true}}, 50, 50, 8, 700, 2)') == (2,)
    state.as_of_seq = None
    now = AsOf(now=clock.time())
    code = f'local f = {{login="{login}", success=true}}; return countNear(f, 50, 50, 8, 700)'
    assert state.execute(code) == (queries.count_near(flt, 50, 50.0, 8.0, 700.0, None, now),)
    assert state.execute(code.replace("50, 8, 700", "50, 8, 1")) == (0,)
    # the slow path (another number of arguments) gives its own errors, with the same checks
    with pytest.raises(LuaError, match="countNear"):
        state.execute(code.replace("50, 8, 700", "50, 8, 700, 3, 4"))


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
    ('countNear({}, 10, 91, 0, 5)', "latitude must be from -90 to 90, got 91"),
    ('countNear({}, 10, 0, "east", 5)', "longitude must be a number, got string"),
    ('countNear({}, 10, 0, 0, -1)', "km must be from 0 to inf, got -1"),
    ('countNear({}, 10, 0, 0)', "km must be a number, got nil"),
    ('countNear({}, nil, 0, 0, 5)', "n must be a number, got nil"),
    ('countNear({logn="x"}, 10, 0, 0, 5)', "unknown filter key 'logn'"),
    ('countNear({}, 10, 0, 0, 5, "all")', "enough must be a number, got string"),
    ('countNear({}, 10, 0, 0, 5, 3, 4)', "takes from 0 to 6 positional arguments but 7"),
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


async def test_an_accounts_recent_places_never_read_the_table(filled) -> None:
    """recentReports with the fields of a place (impossible_travel's habit sample: 200 rows) is
    answered from ix_events_login alone (migration 0008); other fields read the table."""
    from trackalert.lua.convert import FieldPlan

    log, _, clock = filled
    state = LuaState(StateKind.WORKER, Host(clock=clock, eventlog=log))
    queries = log.queries()
    conn = queries._conn()
    flt = parse_filter({"login": "x", "success": True, "window": "30d"}.items())
    source, where, params = queries._where(conn, flt, AsOf(now=clock.time()))

    def plan_of(fields: tuple[str, ...]) -> str:
        columns = ", ".join(REPORT_COLUMNS[i] for i in FieldPlan(state, fields).columns)
        return " ".join(str(r) for r in conn.execute(
            f"EXPLAIN QUERY PLAN SELECT {columns} FROM {source} WHERE {where} "
            "ORDER BY seq DESC LIMIT 200", params))

    for fields in (("latitude", "longitude"), ("longitude",), ("seq", "country", "latitude")):
        assert "COVERING INDEX ix_events_login" in plan_of(fields), fields
    assert "COVERING" not in plan_of(("latitude", "city")) and "ix_events_login" in plan_of(("city",))


async def test_count_near_never_reads_the_table(filled) -> None:
    """countNear of an account (impossible_travel's habit) is one aggregate over ix_events_login."""
    log, _, clock = filled
    queries = log.queries()
    conn = queries._conn()
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        flt = parse_filter({"login": LOGINS[1], "success": True, "window": "30d"}.items())
        queries.count_near(flt, 200, 52.5, 13.4, 500.0, 3, AsOf(now=clock.time()))
    finally:
        conn.set_trace_callback(None)
    [aggregate] = [sql for sql in statements if "count(*)" in sql]
    plan = " ".join(str(r) for r in conn.execute("EXPLAIN QUERY PLAN " + aggregate))
    assert "COVERING INDEX ix_events_login" in plan and "SCAN events" not in plan, plan


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


# ------------------------------------------------------------ what crosses, and how often

RICH_GEOS = GEOS + [Enrichment("", "", None, None, None, ""), Enrichment("NL", "", 52.4, None, None, "")]


def rich_reports(rng: random.Random, n: int) -> list[Report]:
    """Reports using every LoginTuple field, empty and unknown values included."""
    return [Report(
        t=START + i + rng.random(), login=rng.choice(LOGINS[:3]),
        remote=rng.choice(REMOTES + ["10.1.2.3", "::ffff:192.0.2.9"]), pwhash=rng.choice(["aaaa", ""]),
        success=rng.random() < 0.6, policy_reject=rng.random() < 0.3, protocol=rng.choice(["imap", ""]),
        tls=rng.random() < 0.5, device_id=rng.choice(["", "Mozilla/5.0 (X11)", "imap-client"]),
        session_id=rng.choice(["", f"s{i}"]), fail_type=rng.choice(["", "credentials", "account"]),
        attrs=rng.choice([{}, {"site": "a"}, {"site": "b", "ünïcode": "ja\u00e9"}]),
        attrs_mv=rng.choice([{}, {"groups": ("admin", "staff")}, {"none": ()}]),
        device_attrs=rng.choice([{}, {"browser.family": "Firefox", "os.family": "Linux"}]),
        geo=rng.choice(RICH_GEOS),
    ) for i in range(n)]


@pytest.fixture
async def rich(tmp_path: Path) -> AsyncIterator[tuple[LuaState, list[Event]]]:
    """A worker state over a log of rich reports, and the events as the runner got them."""
    clock = VirtualClock(start=START)
    log = SQLiteEventLog(tmp_path / "rich.db", clock)
    await log.open()
    handed: list[Event] = []
    log.add_listener(handed.extend)  # in memory, right after the commit, as the runner gets them
    rng = random.Random(3)
    for report in rich_reports(rng, 300):
        await log.append(report)
        await clock.advance(rng.choice([0.5, 60.0]))
    try:
        yield LuaState(StateKind.WORKER, Host(clock=clock, eventlog=log)), handed
    finally:
        await log.close()


#: Lua: two values equal, tables compared deeply.
_SAME = """
local function same(a, b)
  if type(a) ~= "table" or type(b) ~= "table" then return a == b end
  for k, v in pairs(a) do if not same(v, b[k]) then return false end end
  for k in pairs(b) do if a[k] == nil then return false end end
  return true
end
"""

# Every field of each recentReports() table against the lt of the same event: the same keys,
# equal values (tables compared deeply), remote as lt.remote's text, plus seq and received.
_COMPARE = _SAME + """
return function(lt, r)
  for k, v in pairs(lt) do
    local want = k == "remote" and v:tostring() or v
    if not same(want, r[k]) then return k .. ": " .. tostring(want) .. " ~= " .. tostring(r[k]) end
  end
  for k in pairs(r) do
    if lt[k] == nil and k ~= "seq" and k ~= "received" then return k .. " is not in lt" end
  end
end
"""


def test_recent_reports_hold_exactly_the_fields_of_lt(rich) -> None:
    state, events = rich
    (keep,) = state.execute("seen = {} return function(lt) seen[#seen + 1] = lt end")
    runner = tuple_runner(state)
    for event in events:
        state.as_of_seq = event.seq
        assert call_with_tuple(state, runner, keep, event) == (True, None)
    state.as_of_seq = None
    (compare,) = state.execute(_COMPARE)
    seen = state.lua.globals().seen
    lt_of = {event.seq: seen[i + 1] for i, event in enumerate(events)}
    for n in (1, 5, ARGS_MAX, ARGS_MAX + 1, 200, 1000):  # rows as arguments, then as a table
        recent = state.execute(f"return recentReports({{}}, {n})")[0]
        newest = events[::-1][:n]
        assert len(recent) == len(newest)
        for i, event in enumerate(newest):
            r = recent[i + 1]
            assert (r.seq, r.received) == (event.seq, event.received)
            assert compare(lt_of[event.seq], r) is None, (event.seq, compare(lt_of[event.seq], r))
    # the nil cases are there: no enrichment, an unknown latitude with a known city, empty maps
    kinds = {(e.report.geo is None, (e.report.geo or RICH_GEOS[1]).latitude is None,
              not e.report.attrs_mv) for e in events}
    assert len(kinds) >= 4, kinds


# recentReports(f, n, fields) against recentReports(f, n): the same rows, each holding exactly
# the fields asked for, with the same values (tables compared deeply).
_PICKED = _SAME + """
return function(f, n, fields)
  local whole, picked = recentReports(f, n), recentReports(f, n, fields)
  if #whole ~= #picked then return "rows: " .. #whole .. " ~= " .. #picked end
  local asked = {}
  for _, name in ipairs(fields) do asked[name] = true end
  for i, r in ipairs(picked) do
    for k in pairs(r) do if not asked[k] then return i .. ": " .. k .. " was not asked" end end
    for name in pairs(asked) do
      if not same(whole[i][name], r[name]) then
        return i .. ": " .. name .. ": " .. tostring(whole[i][name]) .. " ~= " .. tostring(r[name])
      end
    end
  end
end
"""


def test_recent_reports_with_fields_hold_just_them_with_the_same_values(rich) -> None:
    from trackalert.lua.convert import PICKABLE

    state, events = rich
    (compare,) = state.execute(_PICKED)
    lua = state.lua
    rng = random.Random(5)
    subsets = [[name] for name in PICKABLE] + [["latitude", "longitude"], list(PICKABLE)]
    subsets += [rng.sample(PICKABLE, rng.randint(2, 8)) for _ in range(12)]
    filters = [lua.table_from({}), lua.table_from({"login": events[-1].report.login}),
               lua.table_from({"success": True, "window": "1d"})]
    for fields in subsets:
        for flt in filters:
            for n in (1, ARGS_MAX + 1, 200):
                assert compare(flt, n, lua.table_from(fields)) is None, (fields, n)
    # the cases that make the values differ from the stored columns are there
    assert any(e.report.geo is None for e in events) and any(e.report.attrs_mv for e in events)


def test_recent_reports_fields_from_a_flat_filter_and_inside_report(rich) -> None:
    """The flat path (a filter of plain values, two or three arguments) gives what the table
    path gives, and so does a report call asking as of its lt."""
    state, events = rich
    login = events[-1].report.login
    (fn,) = state.execute(f"""
        return function()
          local t = {{}}
          for _, r in ipairs(recentReports({{login="{login}", success=true}}, 50, {{"seq", "city"}})) do
            t[#t + 1] = r.seq .. "/" .. r.city
          end
          return table.concat(t, ","), #recentReports({{login="{login}", success=true}}, 50)
        end""")
    def expected(before: int) -> list[Event]:
        return [e for e in events if e.report.login == login and e.report.success
                and e.seq < before][::-1][:50]

    def text_of(chosen: list[Event]) -> str:
        return ",".join(f"{e.seq}/{e.report.geo.city if e.report.geo else ''}" for e in chosen)

    newest = expected(events[-1].seq + 1)
    assert fn() == (text_of(newest), len(newest)) and len(newest) > 2
    state.as_of_seq = newest[1].seq  # as of an older report: it and the newer are not there
    try:
        assert fn() == (text_of(expected(newest[1].seq)), len(expected(newest[1].seq)))
        assert fn()[0].startswith(f"{newest[2].seq}/")
    finally:
        state.as_of_seq = None


async def test_recent_reports_fields_blank_a_longitude_as_the_whole_tables_do(tmp_path: Path) -> None:
    """A stored longitude with no other enrichment value is not shown (E.reports); with a city
    but no country nor latitude it is. The index alone cannot tell the two apart: such answers
    are read whole."""
    clock = VirtualClock(start=START)
    log = SQLiteEventLog(tmp_path / "lon.db", clock)
    await log.open()
    geos = [Enrichment("", "", None, 4.9, None, ""), Enrichment("", "Utrecht", None, 5.1, None, ""),
            Enrichment("NL", "", 52.1, 5.2, None, ""), None]
    for i, geo in enumerate(geos * 3):
        await log.append(Report(t=START + i, login="lon", remote="10.0.0.1", success=True, geo=geo))
        await clock.advance(1.0)
    try:
        state = LuaState(StateKind.WORKER, Host(clock=clock, eventlog=log))
        (compare,) = state.execute(_PICKED)
        lua = state.lua
        for fields in (["longitude"], ["longitude", "city"], ["latitude", "longitude", "seq"]):
            assert compare(lua.table_from({"login": "lon"}), 12, lua.table_from(fields)) is None
        (shown,) = state.execute('local t = {} for _, r in ipairs(recentReports({login="lon"}, 4, '
                                 '{"longitude"})) do t[#t + 1] = tostring(r.longitude) end '
                                 'return table.concat(t, ",")')
        assert shown == "nil,5.2,5.1,nil"
    finally:
        await log.close()


@pytest.mark.parametrize("fields, message", [
    ('{"latitude", "nope"}', "unknown report field 'nope' in fields (known: seq, received"),
    ("{}", "fields must name at least one report field"),
    ('"latitude"', "fields must be a table of field names, got"),
    ("{1}", "fields must hold field names, got"),
    ('{"latitude", x="longitude"}', "fields must be an array of field names"),
])
def test_recent_reports_bad_fields_raise_a_lua_error_naming_the_problem(rich, fields, message) -> None:
    state, _ = rich
    for call in (f"recentReports({{}}, 3, {fields})", f"recentReports({{login='x'}}, 3, {fields})"):
        with pytest.raises(LuaError, match=re.escape(message)):
            state.execute(f"return {call}")


def test_each_recent_report_is_a_table_of_its_own(rich) -> None:
    """The decoded maps are shared templates inside Lua: a policy changing one report's table
    must not change another report, nor the next answer."""
    state, events = rich
    with_attrs = [e for e in events if e.report.device_attrs and e.report.attrs_mv.get("groups")]
    first = with_attrs[-1]
    second = [e for e in with_attrs if e.report.login == first.report.login][-2]
    assert state.execute(f"""
        local f = {{login="{first.report.login}"}}
        local a = recentReports(f, 300)
        local mine, other
        for _, r in ipairs(a) do
          if r.seq == {first.seq} then mine = r elseif r.seq == {second.seq} then other = r end
        end
        mine.device_attrs["browser.family"] = "changed"; mine.attrs_mv.groups[1] = "changed"
        local again
        for _, r in ipairs(recentReports(f, 300)) do if r.seq == {first.seq} then again = r end end
        return other.device_attrs["browser.family"], other.attrs_mv.groups[1],
               again.device_attrs["browser.family"], again.attrs_mv.groups[1]
    """) == ("Firefox", "admin", "Firefox", "admin")


def test_rows_of_the_log_make_the_tables_its_events_make(worker) -> None:
    """SQLite reads recentReports' rows straight from its columns; the interface's default
    makes them from decoded Events. Both must give the same tables, for every event."""
    from trackalert.eventlog.base import EventQueries
    from trackalert.lua.convert import report_tables

    state, _, clock = worker
    queries = state.host.eventlog.queries()
    (compare,) = state.execute(_COMPARE.replace("k == \"remote\" and v:tostring() or v", "v"))
    for spec in FILTERS:
        flt = parse_filter(spec.items())
        for as_of in (AsOf(now=clock.time()), AsOf(before_seq=250)):
            narrow = report_tables(state, queries.recent_rows(flt, 50, as_of))
            default = report_tables(state, EventQueries.recent_rows(queries, flt, 50, as_of))
            assert len(narrow) == len(default) == len(queries.recent_reports(flt, 50, as_of))
            for i in range(len(narrow)):
                assert compare(default[i + 1], narrow[i + 1]) is None, (spec, i)


def _python_calls(fn: Any) -> list[str]:
    """The Python functions (and C functions called from Python) run by `fn()`."""
    import sys

    calls: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            calls.append(frame.f_code.co_name)
        elif event == "c_call":
            calls.append(getattr(arg, "__name__", "?"))

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def test_recent_reports_do_no_python_work_per_report(rich) -> None:
    """Rows cross into Lua in one table and Lua builds the reports: the Python work of a call
    does not grow with the number of reports it returns (it grew by a decode and a dict each)."""
    state, events = rich
    login = events[-1].report.login
    fetch = state.execute(f'return function(n) return #recentReports({{login="{login}"}}, n) end')[0]
    assert fetch(200) > 50
    assert fetch(1) == 1
    # up to ARGS_MAX rows cross as a call's arguments, more as one table: neither grows
    for least, most in ((1, ARGS_MAX), (ARGS_MAX + 1, 200)):
        few, many = _python_calls(lambda: fetch(least)), _python_calls(lambda: fetch(most))
        assert len(many) == len(few), (Counter(many) - Counter(few)).most_common(8)


def test_a_filter_is_parsed_once_per_shape_and_a_window_once(worker) -> None:
    """The starter policies ask the same filters with another login on every report: a filter's
    keys are parsed once (its plan, eventlog/bound.py), and each call only converts its values;
    a window is parsed once (parse_filter and parse_span ran on every call of a new login)."""
    state, _, _ = worker
    key = f"attrs.k{random.randrange(10**9)}"  # a shape never seen before, even in a rerun
    count = state.execute(f"""return function(login, window)
        return countReports({{login=login, success=true, window=window, ["{key}"]="v"}}) end""")[0]
    window = f"{random.randrange(10**6, 10**7)}s"
    first = _python_calls(lambda: count("alice", window))
    assert "key_converter" in first and "parse_span" in first
    for login in ("alice", "bob"):
        again = _python_calls(lambda: count(login, window))
        assert not {"key_converter", "parse_filter", "parse_span"} & set(again), again
    assert count("alice", window) == count("bob", window) == 0


def test_filters_read_in_one_call_keep_their_errors_and_values(worker) -> None:
    """Each way a filter can be read (flat in one call, item by item for anything unusual, from
    the cache) gives the same answer, and errors are raised every time, not remembered."""
    state, events, _ = worker
    login = LOGINS[1]
    expected = sum(1 for e in events if e.report.login == login and e.report.success)
    for code in (f'{{login="{login}", success=true}}', f'{{success=true, login="{login}"}}',
                 f'{{login="{login}", success=true, [1]=nil}}'):
        assert state.execute(f"return countReports({code}), countReports({code})") == (expected, expected)
    many = ", ".join(f'["attrs.k{i}"]="v"' for i in range(20))  # more pairs than read flat
    assert state.execute(f"return countReports({{{many}}})") == (0,)
    for _ in range(2):
        with pytest.raises(LuaError, match="filter key 'success' must be a boolean"):
            state.execute(f'return countReports({{login="{login}", success=1}})')
        with pytest.raises(LuaError, match="filter key 'login' must be a string, got _LuaTable"):
            state.execute("return countReports({login={}})")
        with pytest.raises(LuaError, match="filter keys must be strings"):
            state.execute("return countReports({1, 2})")


def test_top_values_from_lua_for_any_n(worker) -> None:
    """topValues' array is built in Lua from one flat table: every value and count in place."""
    state, events, _ = worker
    top = state.execute('return function(n) return topValues("remote", {}, n) end')[0]
    counts = sorted(Counter(e.report.remote for e in events).items(), key=lambda kv: (-kv[1], kv[0]))
    for n in (0, 1, 3, 100):
        listed = top(n)
        assert [(listed[i].value, listed[i].count) for i in range(1, len(listed) + 1)] == counts[:n]


def test_inside_report_a_window_needs_no_lookup_of_lts_time(worker) -> None:
    """The runner hands lt over with its time, so a windowed helper inside report(lt) runs no
    query to find when lt was received (it ran one on every call), and answers the same."""
    state, events, _ = worker
    queries = state.host.eventlog.queries()
    conn = queries._conn()  # this thread's connection: the one the helpers below use
    (count,) = state.execute("""answers = {}
        return function(lt)
          answers[#answers + 1] = countReports({login=lt.login, window="1d"})
          answers[#answers + 1] = countDistinct("remote", {success=false, window="2h"})
        end""")
    runner = tuple_runner(state)
    sql: list[str] = []
    conn.set_trace_callback(sql.append)
    try:
        for event in events[::7]:
            state.as_of_seq = event.seq
            assert call_with_tuple(state, runner, count, event) == (True, None)
    finally:
        conn.set_trace_callback(None)
        state.as_of_seq = None
    assert sql and not [s for s in sql if s.startswith("SELECT received FROM events WHERE seq <=")]
    answers = state.lua.globals().answers
    expected = []
    for event in events[::7]:
        as_of = AsOf(before_seq=event.seq)
        expected.append(len(visible(events, parse_filter([("login", event.report.login), ("window", "1d")]), as_of)))
        expected.append(len({e.report.remote for e in visible(
            events, parse_filter([("success", False), ("window", "2h")]), as_of)}))
    assert [answers[i + 1] for i in range(len(expected))] == expected
