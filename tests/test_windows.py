"""The window projection answers exactly what the SQL helpers answer, as of every event.

Real SQLite logs with seeded random histories (logins, IPv4 and IPv6 addresses and networks,
pwhashes, countries, device attributes, ties in `received`, bursts and quiet hours), driven
event by event the way the policy runner drives it, through the real runner and Lua states, and
through a real daemon killed with -9.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import marshal
import random
import re
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest

from test_console_server import KEY, connect, control_ports
from trackalert.clock import VirtualClock
from trackalert.console.protocol import encode_key
from trackalert.eventlog.base import Event
from trackalert.eventlog.bound import BoundFilter, bind_pairs
from trackalert.eventlog.filters import AsOf, Field, Filter, parse_field, parse_filter
from trackalert.eventlog.sqlite import SQLiteEventLog
from trackalert.eventlog import windows
from trackalert.eventlog.windows import Cursor, WindowProjection, cover, event_fields
from trackalert.lua.host import Host
from trackalert.lua.pool import LuaPool
from trackalert.lua.runner import PolicyRunner
from trackalert.lua.state import LuaState, StateKind
from trackalert.report import Enrichment, Report
from trackalert.testing import DaemonProcess, basic_auth, listener_config, wait_for

START = 1_700_000_000.0
HOUR, DAY = 3600.0, 86400.0
LOGINS = [f"user{i}@example.org" for i in range(9)] + ["User0@example.org", ""]
REMOTES = ["192.0.2.1", "192.0.2.77", "192.0.3.5", "198.51.100.5", "198.51.100.6",
           "2001:db8::1", "2001:db8::2:1", "2001:db9::7"]
GEOS = [None, Enrichment("DE", "Berlin", 52.5, 13.4, 3320, "DTAG"),
        Enrichment("FR", "Paris", 48.9, 2.35, 3215, "Orange"), Enrichment("", "", None, None, None, "")]
BROWSERS = ["Chrome", "Firefox", None]
#: Addresses the test City DB locates: London, Boxford (~90 km from it) and Linköping.
LONDON_AND_AWAY = ("81.2.69.160", "2.125.160.216", "89.160.20.112")
GEOIP_CITY = Path(__file__).resolve().parent / "data" / "geoip" / "GeoIP2-City-Test.mmdb"


def history(rng: random.Random, n: int) -> list[tuple[float, Report]]:
    """(seconds to advance the clock before, report): bursts sharing one `received`, quiet hours."""
    out = []
    for i in range(n):
        gap = rng.choice([0.0, 0.0, 0.0, 1.0, 30.0, 600.0, HOUR, 5 * HOUR, 2 * DAY])
        browser = rng.choice(BROWSERS)
        out.append((gap, Report(
            t=START + i, login=rng.choice(LOGINS), remote=rng.choice(REMOTES),
            pwhash=rng.choice(["aaaa", "bbbb", ""]), success=rng.random() < 0.4,
            protocol=rng.choice(["imap", "http"]),
            attrs={"site": rng.choice(["a", "b"])} if rng.random() < 0.5 else {},
            device_attrs={"browser.family": browser} if browser else {},
            geo=rng.choice(GEOS))))
    return out


async def fill(log: SQLiteEventLog, clock: VirtualClock, rng: random.Random, n: int) -> list[Event]:
    """Append a random history; events committed together share their `received`."""
    first = await log.last_seq()
    pending: list[Report] = []
    for gap, report in history(rng, n):
        if gap and pending:
            await asyncio.gather(*(log.append(r) for r in pending))
            pending = []
            await clock.advance(gap)
        pending.append(report)
    await asyncio.gather(*(log.append(r) for r in pending))
    return await log.read(first, n + 1)


def network(remote: str, bits: int) -> str:
    return str(ipaddress.ip_network(f"{remote}/{bits}", strict=False))


def starter_calls(event: Event) -> list[tuple[str | None, dict[str, Any]]]:
    """Every (counted field or None for countReports, filter) the starter policies ask for
    `event`, plus the other covered keys, with the windows shrunk to fit the history."""
    r = event.report
    fail = {"success": False, "window": HOUR}
    calls: list[tuple[str | None, dict[str, Any]]] = [
        (None, {"login": r.login, "success": True, "window": 180 * DAY}),
        (None, {"login": r.login, "success": True, "window": 7 * DAY,
                "country": r.geo.country if r.geo else "XX"}),
        (None, {"login": r.login, "success": True, "window": 7 * DAY,
                "device_attrs.browser.family": r.device_attrs.get("browser.family", "Chrome")}),
        ("remote", {"login": r.login, **fail}),
        ("remote/24", {"login": r.login, **fail}),
        (None, {"login": r.login, "remote": r.remote, **fail}),
        (None, {"login": r.login, "netmask": network(r.remote, 24), **fail}),
        ("login", {"remote": r.remote, **fail}),
        ("login", {"netmask": network(r.remote, 24), **fail}),
        ("login", {"pwhash": r.pwhash, "success": False, "window": DAY}),
        (None, {"pwhash": r.pwhash, "login": r.login, "success": False, "window": DAY}),
        ("login", {"netmask": network(r.remote, 9), "window": 600.0}),
        ("pwhash", {"attrs.site": "a", "protocol": r.protocol, "window": 2 * HOUR}),
        ("asn", {"country": "DE", "window": 3 * DAY}),
        (None, {"asn": 3215, "success": True, "window": 1.0}),
        ("country", {"window": 5 * HOUR}),
    ]
    return calls


def parsed(calls: list[tuple[str | None, dict[str, Any]]]) -> list[tuple[Field | None, Filter]]:
    return [(parse_field(name) if name else None, parse_filter(flt.items())) for name, flt in calls]


def sql_answer(log: SQLiteEventLog, counted: Field | None, flt: Filter, seq: int) -> int:
    queries = log.queries()
    if counted is None:
        return queries.count_reports(flt, AsOf(before_seq=seq))
    return queries.count_distinct(counted, flt, AsOf(before_seq=seq))


def projection_answer(projection: WindowProjection, counted: Field | None, flt: Filter,
                      seq: int) -> int | None:
    helper = "countReports" if counted is None else "countDistinct"
    return projection.answer(helper, flt, counted, AsOf(before_seq=seq))


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[tuple[SQLiteEventLog, VirtualClock]]:
    clock = VirtualClock(start=START)
    log = SQLiteEventLog(tmp_path / "events.db", clock)
    await log.open()
    try:
        yield log, clock
    finally:
        await log.close()


def register_all(projection: WindowProjection, events: list[Event]) -> None:
    """Every shape the history will ask for (IPv4 and IPv6 networks are distinct shapes)."""
    for event in events:
        for counted, flt in parsed(starter_calls(event)):
            assert projection.register(flt, counted)
    assert projection.wait_built(30)


# ------------------------------------------------------------------------ the unit level


async def test_event_fields_are_the_stored_row(log) -> None:
    """The head (events in memory) and the tail (rows read back) see the same values."""
    eventlog, clock = log
    events = await fill(eventlog, clock, random.Random(3), 300)
    def maps_parsed(row: tuple) -> tuple:
        return row[:9] + tuple(json.loads(m) if isinstance(m, str) else (m or {}) for m in row[9:])

    stored = [maps_parsed(row) for row in eventlog.read_fields(0, 1000)]
    assert [maps_parsed(event_fields(e)) for e in events] == stored
    # the seek on received: the first event received at/after a time, and nothing after
    middle = events[150]
    first = next(e for e in events if e.received >= middle.received)
    assert eventlog.read_fields(0, 1, middle.received)[0][0] == first.seq
    assert eventlog.read_fields(0, 5, events[-1].received + 1) == []


async def test_a_tail_takes_in_one_list_what_it_takes_in_runs(log) -> None:
    """The runner's tails (take_before: a short scan, then bisection) take exactly the rows
    take_while_before's runs hold, across chunk ends, with ties and bursts in `received`."""
    eventlog, clock = log
    events = await fill(eventlog, clock, random.Random(8), 12_000)  # more than two chunks
    rng = random.Random(8)
    runs, one = Cursor(eventlog.read_fields, 0), Cursor(eventlog.read_fields, 0)
    threshold = events[0].received
    while runs.after < events[-1].seq:
        threshold += rng.choice([0.0, 1.0, 30.0, HOUR, 3 * DAY])
        upto = min(events[-1].seq, runs.after + rng.choice([1, 5, 9, 100, 6000]))
        expected = [row for run in runs.take_while_before(threshold, upto) for row in run]
        assert one.take_before(threshold, upto) == expected
        assert one.after == runs.after


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_every_shape_equals_sql_at_every_event(log, seed: int) -> None:
    eventlog, clock = log
    events = await fill(eventlog, clock, random.Random(seed), 1500)
    projection = WindowProjection(eventlog)
    projection.start_at(0)
    register_all(projection, events)
    compared = tops = 0
    rng = random.Random(seed)
    for event in events:
        projection.begin(event)
        for (counted, flt), (_, pairs) in zip(parsed(starter_calls(event)), starter_calls(event)):
            expected = sql_answer(eventlog, counted, flt, event.seq)
            assert projection_answer(projection, counted, flt, event.seq) == expected, (
                event.seq, counted, flt)
            # as a helper called from Lua asks: the filter bound to the plan of its keys
            flat = tuple(item for pair in pairs.items() for item in pair)
            bound = bind_pairs(flat)
            assert type(bound) is BoundFilter
            assert projection_answer(projection, counted, bound, event.seq) == expected
            # and as the count helpers ask it first, from the flat pairs themselves
            helper = "countReports" if counted is None else "countDistinct"
            assert projection.count_pairs(helper, flat, counted, event.seq) == expected
            if counted is not None and counted.kind == "column" and counted.name != "remote":
                as_of = AsOf(before_seq=event.seq)
                n = rng.choice([1, 2, 3, 50])
                top = projection.top(bound, counted, n, as_of)
                assert top == eventlog.queries().top_values(counted, flt, n, as_of), (event.seq, flt)
                tops += bool(top)
            compared += 1
        projection.finish(event)
    projection.close()
    assert compared == 16 * len(events) and tops > len(events)
    sizes = projection.describe()["shapes"]
    assert len(sizes) == 19 and any(s["distinct_pairs"] for s in sizes)


async def test_the_flat_pairs_path_leaves_to_the_general_path_what_it_does_not_answer(log) -> None:
    """count_pairs answers only what `answer` answers from a shape (None otherwise: the general
    path then counts, registers or queries), and refuses a bad value as binding the pairs does."""
    eventlog, clock = log
    events = await fill(eventlog, clock, random.Random(3), 200)
    projection = WindowProjection(eventlog)
    projection.start_at(0)
    mine = ("login", events[0].report.login, "success", True, "window", 180 * DAY)
    assert projection.register(parse_filter(zip(mine[::2], mine[1::2])))
    assert projection.wait_built(30)
    for event in events[:-1]:
        projection.begin(event)
        projection.finish(event)
    event = events[-1]
    projection.begin(event)
    login = parse_field("login")
    expected = sql_answer(eventlog, None, parse_filter(zip(mine[::2], mine[1::2])), event.seq)
    assert projection.count_pairs("countReports", mine, None, event.seq) == expected
    calls = dict(projection.calls)
    left = [
        ("countReports", mine, None, event.seq - 1),  # not the report being judged
        ("countReports", mine[:4], None, event.seq),  # no window
        ("countReports", mine + ("since", START), None, event.seq),
        ("countReports", mine + ("until", START + DAY), None, event.seq),
        ("countReports", ("login", "x", "nonsense", 1, "window", HOUR), None, event.seq),
        ("countDistinct", mine, parse_field("city"), event.seq),  # no shape counts cities
        ("countDistinct", mine, login, event.seq),  # covered, not registered
        ("countReports", mine[:2] + ("success", False) + mine[4:], None, event.seq),
    ]
    for helper, pairs, counted, seq in left:
        assert projection.count_pairs(helper, pairs, counted, seq) is None, pairs
    assert dict(projection.calls) == calls  # nothing counted: the general path counts them
    bad = ("login", "x", "success", "yes", "window", HOUR)
    with pytest.raises(Exception) as general:
        bind_pairs(bad)
    with pytest.raises(type(general.value), match=re.escape(str(general.value))):
        projection.count_pairs("countReports", bad, None, event.seq)
    projection.finish(event)
    projection.close()


async def test_a_shape_registered_mid_stream_equals_sql_once_on(log) -> None:
    """Built in the background while the runner goes on, then switched on between events."""
    eventlog, clock = log
    events = await fill(eventlog, clock, random.Random(11), 3000)
    projection = WindowProjection(eventlog)
    projection.start_at(0)
    late = [(parse_field("login"), parse_filter({"netmask": "192.0.2.0/23", "success": False,
                                                 "window": "1d"}.items())),
            (None, parse_filter({"login": LOGINS[1], "window": "2d"}.items()))]
    answered = 0
    for event in events:
        projection.begin(event)
        if event.seq == 1200:
            for counted, flt in late:
                projection.register(flt, counted)
        for counted, flt in late:
            found = projection_answer(projection, counted, flt, event.seq)
            if found is not None:
                assert found == sql_answer(eventlog, counted, flt, event.seq), event.seq
                answered += 1
        projection.finish(event)
        if event.seq == 2000:
            assert projection.wait_built(30)  # the rest of the stream runs with them on
    projection.close()
    assert answered >= 2 * 1000
    assert projection.calls["countDistinct", "sql"] >= 1, "SQL answered until it was built"


async def test_retention_pruning_keeps_answers_equal_to_sql(log) -> None:
    """Pruning events a window still counts: the window falls back to SQL and is rebuilt."""
    eventlog, clock = log
    events = await fill(eventlog, clock, random.Random(5), 2000)
    projection = WindowProjection(eventlog)
    projection.start_at(0)
    register_all(projection, events)
    answered = after_prune = 0
    prunes = {600: events[300].received, 1400: events[1300].received}
    for event in events:
        if event.seq in prunes:
            assert await eventlog.prune(prunes[event.seq]) > 0
            projection.check_retention()  # the runner does this before every batch
        projection.begin(event)
        for counted, flt in parsed(starter_calls(event)):
            found = projection_answer(projection, counted, flt, event.seq)
            if found is not None:
                assert found == sql_answer(eventlog, counted, flt, event.seq), (event.seq, flt)
                answered += 1
                after_prune += event.seq > 1400
        projection.finish(event)
        if event.seq in (700, 1500):
            assert projection.wait_built(30)
    projection.close()
    assert answered > 0 and after_prune > 0, "rebuilt after each prune"
    assert projection.calls["countReports", "sql"] > 0


@pytest.mark.parametrize("seed", [21, 22])
async def test_a_build_from_grouped_counts_equals_sql_from_any_start(log, seed: int,
                                                                     monkeypatch) -> None:
    """Builds counted by groups (EventLog.count_fields, in ranges of any size) from runner
    positions anywhere in a random history, then driven on: every answer is SQL's. A prune
    before one of the starts leaves the groups to count only what the log still holds."""
    eventlog, clock = log
    events = await fill(eventlog, clock, random.Random(seed), 2400)
    rng = random.Random(seed)
    monkeypatch.setattr(windows, "GROUP_MIN", 0)  # every build groups, however short
    starts = sorted(rng.sample(range(1, 2100), 3))
    answered = 0
    for number, start in enumerate(starts):
        monkeypatch.setattr(windows, "GROUP_ROWS", rng.choice([1, 7, 250, 5000]))
        if number == 2:
            assert await eventlog.prune(events[rng.randrange(start // 2)].received) > 0
        projection = WindowProjection(eventlog)
        projection.start_at(start)
        register_all(projection, events)
        for event in events[start:start + 150]:
            projection.check_retention()
            projection.begin(event)
            for counted, flt in parsed(starter_calls(event)):
                found = projection_answer(projection, counted, flt, event.seq)
                assert found is not None, (event.seq, flt)
                assert found == sql_answer(eventlog, counted, flt, event.seq), (start, event.seq, flt)
                answered += 1
            projection.finish(event)
        projection.close()
    assert answered == 3 * 150 * 16


async def test_grouped_counts_are_the_rows_counted(log) -> None:
    """count_fields groups exactly the rows read_fields returns, for any column set."""
    eventlog, clock = log
    await fill(eventlog, clock, random.Random(4), 900)
    rows = eventlog.read_fields(100, 10_000)[:700]
    for columns in [(3,), (2, 3), (3, 4, 6, 9), (2, 3, 5, 7, 8, 10)]:
        expected = Counter(tuple(row[i] for i in columns) for row in rows)
        assert eventlog.count_fields(100, 800, columns) == expected, columns
    assert eventlog.count_fields(800, 800, (2, 3)) == {}


def drive(projection: WindowProjection, eventlog: SQLiteEventLog, events: list[Event]) -> int:
    """Run `events` through the projection as the runner does; every answer must be SQL's.
    Returns how many were answered from the projection."""
    answered = 0
    for event in events:
        projection.check_retention()
        projection.begin(event)
        for counted, flt in parsed(starter_calls(event)):
            found = projection_answer(projection, counted, flt, event.seq)
            if found is not None:
                assert found == sql_answer(eventlog, counted, flt, event.seq), (event.seq, flt)
                answered += 1
        projection.finish(event)
    return answered


@pytest.mark.parametrize("seed", [31, 32, 33])
async def test_a_restart_from_the_snapshot_equals_sql(log, seed: int, caplog) -> None:
    """Saved at a random event, restored at a start at or after it (the runner may have gone
    on without saving), caught up, and driven on: every answer is SQL's, from the first event."""
    eventlog, clock = log
    events = await fill(eventlog, clock, random.Random(seed), 2000)
    rng = random.Random(seed)
    saved_at = rng.randrange(200, 1500)
    first = WindowProjection(eventlog)
    first.start_at(0)
    register_all(first, events)
    drive(first, eventlog, events[:saved_at])
    first.close(save=True)
    path = Path(eventlog.projection_snapshot())
    assert path.stat().st_size > 0
    start = saved_at + rng.choice([0, 0, 1, 37, 400])
    caplog.set_level("INFO", logger="trackalert")
    restored = WindowProjection(eventlog)
    restored.start_at(start)
    assert restored.wait_built(30)
    assert "restored from" in caplog.text
    assert drive(restored, eventlog, events[start:start + 200]) == 200 * 16
    restored.close()


@pytest.mark.parametrize("spoil", ["truncated", "pruned", "other log", "ahead", "format"])
async def test_a_snapshot_that_does_not_match_is_ignored(log, tmp_path: Path, spoil: str,
                                                         caplog) -> None:
    """Truncated, older than the log's retention, of another log, saved after the runner's
    position, of another format: ignored with one line, the shapes built from the log, and
    every answer SQL's."""
    eventlog, clock = log
    events = await fill(eventlog, clock, random.Random(41), 1500)
    first = WindowProjection(eventlog)
    first.start_at(0)
    register_all(first, events)
    drive(first, eventlog, events[:1000])
    first.close(save=True)
    path = Path(eventlog.projection_snapshot())
    start = 1000
    if spoil == "truncated":
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    elif spoil == "pruned":  # up to the last events: rows every long window counts are gone
        assert await eventlog.prune(events[999].received) > 0
    elif spoil == "other log":
        other = SQLiteEventLog(tmp_path / "other.db", clock)
        await other.open()
        await fill(other, clock, random.Random(42), 1200)
        await other.close()
        Path(other.projection_snapshot()).write_bytes(path.read_bytes())
        path.unlink()
        eventlog = SQLiteEventLog(tmp_path / "other.db", clock)
        await eventlog.open()
        events = await eventlog.read(0, 2000)
        start = 1000
    elif spoil == "ahead":
        start = 990
    else:
        path.write_bytes(marshal.dumps(("trackalert-windows-0",) + marshal.loads(path.read_bytes())[1:]))
    caplog.set_level("INFO", logger="trackalert")
    restored = WindowProjection(eventlog)
    restored.start_at(start)
    assert "restored from" not in caplog.text
    assert caplog.text.count("is ignored") == 1, caplog.text
    register_all(restored, events)  # as the policies ask: built from the log
    assert drive(restored, eventlog, events[start:start + 150]) == 150 * 16
    restored.close()
    if spoil == "other log":
        await eventlog.close()


def test_uncovered_filters_are_left_to_sql() -> None:
    assert cover(parse_filter({"login": "a"}.items()), None) is None  # no window
    assert cover(parse_filter({"login": "a", "since": 5, "window": 60}.items()), None) is None
    assert cover(parse_filter({"window": 60}.items()), parse_field("city")) is None
    assert cover(parse_filter({"window": 60}.items()), parse_field("remote/16")) is not None


# ------------------------------------------------------------------------ the real runner


RECORDING = """
RESULTS = {}
function report(lt)
  local remote = lt.remote:tostring()
  local net = newNetmaskFromCA(lt.remote, 24):toStringNetwork()
  local fail = {success=false, window="1h"}
  local function with(t, k, v) local c = {} for a, b in pairs(t) do c[a] = b end c[k] = v return c end
  RESULTS[#RESULTS + 1] = table.concat({
    lt.login,
    countReports({login=lt.login, success=true, window="180d"}),
    countReports({login=lt.login, success=true, country=lt.country, window="7d"}),
    countDistinct("remote", with(fail, "login", lt.login)),
    countDistinct("remote/24", with(fail, "login", lt.login)),
    countDistinct("login", with(fail, "remote", remote)),
    countDistinct("login", with(fail, "netmask", net)),
    countDistinct("login", {pwhash=lt.pwhash, success=false, window="1d"}),
    countReports(with(with(fail, "login", lt.login), "remote", remote)),
  }, "|")
end
setReport(report)
"""


def expected_line(log: SQLiteEventLog, event: Event) -> str:
    r = event.report
    fail = {"success": False, "window": "1h"}
    net = network(r.remote, 24)
    country = r.geo.country if r.geo else ""  # lt.country: "" when unknown
    calls: list[tuple[str | None, dict[str, Any]]] = [
        (None, {"login": r.login, "success": True, "window": "180d"}),
        (None, {"login": r.login, "success": True, "window": "7d", "country": country}),
        ("remote", {**fail, "login": r.login}), ("remote/24", {**fail, "login": r.login}),
        ("login", {**fail, "remote": r.remote}), ("login", {**fail, "netmask": net}),
        ("login", {"pwhash": r.pwhash, "success": False, "window": "1d"}),
        (None, {**fail, "login": r.login, "remote": r.remote}),
    ]
    answers = [sql_answer(log, counted, flt, event.seq) for counted, flt in parsed(calls)]
    return "|".join([r.login] + [str(a) for a in answers])


def recorded(workers: list[LuaState]) -> list[str]:
    """Every state's RESULTS (batches may have run in either state)."""
    lines = []
    for state in workers:
        (results,) = state.execute("return RESULTS")
        lines += [results[i] for i in range(1, len(results) + 1)]
    return lines


async def run_recording(eventlog: SQLiteEventLog, clock: VirtualClock, policy: str, rounds: int,
                        expected: Callable[[SQLiteEventLog, Event], str]) -> Counter:
    """`policy` in two worker states under the real runner, while `rounds` of 400 random events
    arrive (so that shapes are built while it goes on): every event ran once, and its RESULTS
    line (whichever state ran it) is `expected`'s, from SQL. The projection's calls."""
    host = Host(clock=clock, eventlog=eventlog)
    workers = [LuaState(StateKind.WORKER, host, index=i) for i in range(2)]
    for state in workers:
        state.execute(policy)
    pool = LuaPool(workers, clock)
    runner = PolicyRunner(eventlog, pool, host, batch_max=32)
    await runner.start()
    rng = random.Random(21)
    for _ in range(rounds):
        await fill(eventlog, clock, rng, 400)
        await asyncio.sleep(0)
    head = await eventlog.last_seq()
    assert await wait_for(lambda: runner.done >= head, timeout=120)
    await runner.stop()
    pool.close()
    lines = recorded(workers)
    events = await eventlog.read(0, 10_000)
    assert len(lines) == len(events) == 400 * rounds, "one run per event"
    assert Counter(lines) == Counter(expected(eventlog, e) for e in events)
    assert runner.projection is not None
    return runner.projection.calls


async def test_the_runner_answers_from_the_projection_exactly_as_sql(log) -> None:
    """Through the real runner and Lua states, while events keep arriving."""
    eventlog, clock = log
    calls = await run_recording(eventlog, clock, RECORDING, 8, expected_line)
    assert calls["countDistinct", "projection"] > 5 * 3200 // 2, calls


ASKED_AGAIN = """
RESULTS = {}
function report(lt)
  local mine = {login=lt.login, success=true, window="180d"}
  local a, b = countReports(mine), countReports(mine)
  mine.success = false  -- the same table, another question
  local c = countReports(mine)
  mine.success = 1  -- not a boolean: an error, though Python's 1 == True
  local ok = pcall(countReports, mine)
  mine.success = true
  local d, e = countDistinct("remote", mine), countDistinct("remote", mine)
  local f = countDistinct("country", mine)
  RESULTS[#RESULTS + 1] = table.concat({lt.login, a, b, c, tostring(ok), d, e, f}, "|")
end
setReport(report)
"""


def asked_again_line(log: SQLiteEventLog, event: Event) -> str:
    mine = {"login": event.report.login, "success": True, "window": "180d"}
    a, c, d, f = (sql_answer(log, counted, flt, event.seq) for counted, flt in parsed([
        (None, mine), (None, {**mine, "success": False}), ("remote", mine), ("country", mine)]))
    return "|".join(str(v) for v in (event.report.login, a, a, c, "false", d, d, f))


async def test_a_question_asked_again_in_a_report_has_the_same_answer(log) -> None:
    """The count helpers answer a repeated question of one report(lt) from memory: the answers
    are SQL's, a filter table changed between two calls is asked anew, and a value of another
    type (1 for true) is still an error."""
    eventlog, clock = log
    calls = await run_recording(eventlog, clock, ASKED_AGAIN, 3, asked_again_line)
    events = 3 * 400
    assert sum(calls["countReports", path] for path in ("sql", "projection")) == 2 * events
    assert sum(calls["countDistinct", path] for path in ("sql", "projection")) == 2 * events


async def test_alerts_are_identical_with_the_projection_on_and_off(tmp_path: Path) -> None:
    """The starter policies over a stored log (test_policies' scenario, three copies)."""
    from test_policies import replay, store_copies

    stored = tmp_path / "stored.db"
    await store_copies(stored)
    on, on_errors = await replay(stored, tmp_path / "on", projection=True)
    off, off_errors = await replay(stored, tmp_path / "off", projection=False)
    assert on_errors == off_errors == 0
    assert on == off and len(on) > 0
    assert any("impossible_travel" in alert for alert in on), "recentReports' projection too"


# ------------------------------------------------------------------------ a real daemon


DAEMON_POLICY = listener_config() + f"""
controlSocket("127.0.0.1:0")
setKey("{encode_key(KEY)}")
setNumLuaStates(2)
-- recentReports (the recent-rows projection, incl. its 200-row wide keys) as the rows' unique t
function recent_ts(flt, n)
  local ts = {{}}
  for _, r in ipairs(recentReports(flt, n)) do ts[#ts + 1] = string.format("%.0f", r.t) end
  return table.concat(ts, ",")
end
-- the same with `fields` (recent_columns: the recent rows up to 16, the login index beyond)
local T = {{"t", "latitude", "longitude"}}
function picked_ts(flt, n)
  local ts = {{}}
  for _, r in ipairs(recentReports(flt, n, T)) do ts[#ts + 1] = string.format("%.0f", r.t) end
  return table.concat(ts, ",")
end
function report(lt)
  local fail = {{login=lt.login, success=false, window="1h"}}
  local line = table.concat({{string.format("%.0f", lt.t), lt.login,
    countReports({{login=lt.login, success=true, window="180d"}}),
    countDistinct("remote", fail),
    countDistinct("login", {{remote=lt.remote:tostring(), success=false, window="1h"}}),
    countDistinct("login", {{pwhash=lt.pwhash, success=false, window="1d"}}),
    recent_ts({{login=lt.login, success=true, window="7d"}}, 5),
    recent_ts({{login=lt.login, success=true, window="30d"}}, 200),
    picked_ts({{login=lt.login, success=true, window="7d"}}, 5),
    picked_ts({{login=lt.login, success=true, window="30d"}}, 200),
    string.format("%.6f", lastSeen({{login=lt.login, success=true}}) or -1),
    -- successes near London (located only where the config enriches), all and up to 2
    countNear({{login=lt.login, success=true, window="30d"}}, 200, 51.5, -0.1, 500),
    countNear({{login=lt.login, success=true, window="30d"}}, 200, 51.5, -0.1, 500, 2)}}, "|")
  local f = io.open("answers.txt", "a")
  f:write(line .. "\\n")
  f:close()
end
setReport(report)
"""


async def daemon_expected(path: Path) -> dict[str, str]:
    """The SQL answers as of every stored event (keyed by its unique `t`), from the log file."""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT seq, t, login, remote, pwhash FROM events ORDER BY seq").fetchall()
    log = SQLiteEventLog(path, VirtualClock(start=START))
    await log.open()
    out = {}
    try:
        for seq, t, login, remote, pwhash in rows:
            calls = parsed([
                (None, {"login": login, "success": True, "window": "180d"}),
                ("remote", {"login": login, "success": False, "window": "1h"}),
                ("login", {"remote": remote, "success": False, "window": "1h"}),
                ("login", {"pwhash": pwhash, "success": False, "window": "1d"})])
            key = f"{t:.0f}"
            answers = [str(sql_answer(log, c, f, seq)) for c, f in calls]
            queries, as_of = log.queries(), AsOf(before_seq=seq)
            for window, n in (("7d", 5), ("30d", 200)) * 2:  # without fields, then with them
                flt = parse_filter({"login": login, "success": True, "window": window}.items())
                answers.append(",".join(f"{e.report.t:.0f}" for e in queries.recent_reports(flt, n, as_of)))
            seen = queries.last_seen(parse_filter({"login": login, "success": True}.items()), as_of)
            answers.append(f"{-1 if seen is None else seen:.6f}")
            near = parse_filter({"login": login, "success": True, "window": "30d"}.items())
            answers += [str(queries.count_near(near, 200, 51.5, -0.1, 500.0, enough, as_of))
                        for enough in (None, 2)]
            out[key] = "|".join([key, login] + answers)
    finally:
        await log.close()
    return out


async def post_reports(process: DaemonProcess, first_t: int, n: int, rng: random.Random,
                       kill_after: int | None = None) -> int:
    """Reports with a unique `t` each (the answers are keyed by it); logins and addresses repeat."""
    import aiohttp

    acked = 0
    async with aiohttp.ClientSession() as session:
        for i in range(n):
            body = {"login": rng.choice(["alice", "bob", "carol", "dave"]), "t": first_t + i,
                    "remote": rng.choice(REMOTES[:6]), "pwhash": rng.choice(["aa", "bb"]),
                    "success": rng.random() < 0.3}
            try:
                async with session.post(process.url("/command/report"), data=json.dumps(body),
                                        headers=basic_auth()) as resp:
                    acked += resp.status == 200
            except aiohttp.ClientError:
                break
            if kill_after is not None and acked >= kill_after:
                process.kill()
                break
    return acked


def answer_lines(directory: Path) -> dict[str, set[str]]:
    lines: dict[str, set[str]] = {}
    path = directory / "answers.txt"
    for line in (path.read_text().splitlines() if path.exists() else []):
        lines.setdefault(line.split("|", 1)[0], set()).add(line)
    return lines


def show_event_log(process: DaemonProcess) -> str:
    """On the restarted daemon's console (the output holds both runs: its port is the last)."""
    with connect(process, port=control_ports(process)[-1]) as connection:
        return connection.command("showEventLog()")


async def test_kill_9_and_restart_keep_answers_exact(tmp_path: Path) -> None:
    """Every stored report runs at least once across kill -9, and every run answers as SQL."""
    rng = random.Random(4)
    db = tmp_path / "trackalert-events.db"
    process = DaemonProcess(tmp_path, DAEMON_POLICY).start()
    assert await post_reports(process, 1_000_000, 3000, rng, kill_after=1500) >= 1500
    assert process.process is not None and process.process.returncode == -9
    with DaemonProcess(tmp_path, DAEMON_POLICY) as process:
        await post_reports(process, 2_000_000, 500, rng)

        def all_ran() -> bool:
            with sqlite3.connect(db) as conn:
                stored = {f"{row[0]:.0f}" for row in conn.execute("SELECT t FROM events")}
            return stored <= set(answer_lines(tmp_path))

        assert await wait_for(all_ran, timeout=120)
        shown = await asyncio.to_thread(show_event_log, process)
    line = re.search(r"^Projection: +(\d+) shapes .*countDistinct (\d+) from it", shown, re.M)
    assert line and int(line[1]) == 4 and int(line[2]) > 0, shown
    expected = await daemon_expected(db)
    ran = answer_lines(tmp_path)
    assert set(ran) == set(expected), "every stored report ran at least once, and only those"
    for key, lines in ran.items():
        assert lines == {expected[key]}, key


async def test_a_daemon_restart_restores_the_saved_windows(tmp_path: Path) -> None:
    """A graceful stop saves the windows beside the log; the next start restores them (no
    build) and every report still answers as SQL."""
    rng = random.Random(6)
    db = tmp_path / "trackalert-events.db"

    def all_ran() -> bool:
        with sqlite3.connect(db) as conn:
            stored = {f"{row[0]:.0f}" for row in conn.execute("SELECT t FROM events")}
        return stored <= set(answer_lines(tmp_path))

    with DaemonProcess(tmp_path, DAEMON_POLICY) as process:
        await post_reports(process, 1_000_000, 800, rng)
        assert await wait_for(all_ran, timeout=120)
    assert "window(s) saved to" in process.output(), process.output()
    assert Path(f"{db}-windows").stat().st_size > 0
    with DaemonProcess(tmp_path, DAEMON_POLICY) as process:
        await post_reports(process, 2_000_000, 400, rng)
        assert await wait_for(all_ran, timeout=120)
        output = process.output()
    assert "window(s) restored from" in output and "is ignored" not in output, output
    expected = await daemon_expected(db)
    ran = answer_lines(tmp_path)
    assert set(ran) == set(expected)
    for key, lines in ran.items():
        assert lines == {expected[key]}, key


async def test_under_concurrent_load_with_web_processes_every_answer_is_sqls(tmp_path: Path) -> None:
    """64 connections through two web processes (the lean path, the workers' enrichment and
    encoding), repeated logins and addresses, filled attrs and device_attrs: every report is
    stored once with what was sent, runs once or more, and every projection answer equals the
    SQL's as of it."""
    import aiohttp

    from test_lua_values import metric, post_all

    rng = random.Random(9)
    located = REMOTES + list(LONDON_AND_AWAY)  # the test City DB's: two near London, one not
    sent = [{"login": rng.choice(["alice", "bob", "carol", "dave", "erin"]), "t": 3_000_000 + i,
             "remote": rng.choice(located), "pwhash": rng.choice(["aa", "bb", "cc"]),
             "success": rng.random() < 0.3, "protocol": "imap",
             "attrs": {"n": str(i), "client": rng.choice(["x", "y"])},
             "device_attrs": {"browser.family": rng.choice(["Firefox", "Chrome"]), "i": str(i)}}
            for i in range(3000)]
    config = DAEMON_POLICY + f"""setNumWebProcesses(2)
newGeoIP2DB("City", "{GEOIP_CITY}")
setEnrichment({{city="City"}})
"""
    db = tmp_path / "trackalert-events.db"
    with DaemonProcess(tmp_path, config) as process:
        statuses = await post_all(process.url("/command/report"), sent, connections=64)
        assert statuses.count(200) == len(sent)

        def all_ran() -> bool:
            return len(answer_lines(tmp_path)) >= len(sent)

        assert await wait_for(all_ran, timeout=120)
        shown = await asyncio.to_thread(show_event_log, process)
        async with aiohttp.ClientSession() as session:
            async with session.get(process.url("/metrics"), headers=basic_auth()) as resp:
                scraped = await resp.text()
    name = "trackalert_projection_answers_total"
    recent = metric(scraped, name, 'helper="recentReports",source="projection"')
    assert recent > len(sent), "the recent rows (16 and 200 per key) answered, not only SQL"
    assert metric(scraped, name, 'helper="lastSeen",source="projection"') > 0
    assert metric(scraped, name, 'helper="countNear",source="sql"') >= len(sent) * 2
    near = [line.split("|")[-2:] for lines in answer_lines(tmp_path).values() for line in lines]
    assert any(int(every) > 2 and int(two) == 2 for every, two in near), "places were counted"
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT t, login, remote, attrs, device_attrs FROM events").fetchall()
    assert len(stored) == len(sent), "each report stored once"
    by_t = {f"{row[0]:.0f}": row for row in stored}
    for report in sent:
        t, login, remote, attrs, device_attrs = by_t[str(report["t"])]
        assert (login, remote, json.loads(attrs), json.loads(device_attrs)) == (
            report["login"], report["remote"], report["attrs"], report["device_attrs"]), report
    line = re.search(r"^Projection: +(\d+) shapes .*countDistinct (\d+) from it", shown, re.M)
    assert line and int(line[2]) > 0, shown  # the projection did answer, not only SQL
    expected = await daemon_expected(db)
    ran = answer_lines(tmp_path)
    assert set(ran) == set(expected)
    wrong = [key for key, lines in ran.items() if lines != {expected[key]}]
    assert not wrong, [(ran[k], expected[k]) for k in wrong[:5]]
