"""The recent-reports projection answers recentReports and lastSeen exactly as SQL, as of every
event: the same rows, in the same order, with the same column content.

Real SQLite logs with the seeded random histories of test_windows (IPv4 and IPv6 addresses,
ties in `received` at the window edges, quiet hours), driven event by event as the policy
runner drives the projection, then through the real runner and Lua states, and a real daemon
whose /metrics counts the answers.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from test_lua_values import metric, post_all
from test_windows import DAY, HOUR, START, fill, log, network, run_recording  # noqa: F401 (fixture)
from trackalert.clock import VirtualClock
from trackalert.eventlog.base import REPORT_COLUMNS, Event
from trackalert.eventlog.filters import AsOf, Filter, parse_filter
from trackalert.eventlog.recent import BOUND, BUILD_MAX, WIDE, recent_cover, report_columns
from trackalert.eventlog.sqlite import SQLiteEventLog
from trackalert.eventlog.windows import WindowProjection
from trackalert.report import Report
from trackalert.testing import DaemonProcess, basic_auth, listener_config

Call = tuple[str, Filter, int]


def recent_calls(event: Event) -> list[Call]:
    """The starter policies' recentReports (impossible_travel: 5 in 7d, its 200-row habit
    sample in 30d), lastSeen, and the other covered forms (IPv4/IPv6 addresses and networks,
    maps, no window, n at the bound)."""
    r = event.report
    net = network(r.remote, 64 if ":" in r.remote else 24)
    calls: list[tuple[str, dict[str, Any], int]] = [
        ("recentReports", {"login": r.login, "success": True, "window": 7 * DAY}, 5),
        ("recentReports", {"login": r.login, "success": True, "window": 30 * DAY}, 200),
        ("recentReports", {"login": r.login, "success": True, "window": 30 * DAY}, BOUND),
        ("recentReports", {"login": r.login}, 3),
        ("recentReports", {"remote": r.remote, "success": False, "window": HOUR}, 4),
        ("recentReports", {"netmask": net, "window": 5 * HOUR}, 6),
        ("recentReports", {"login": r.login, "device_attrs.browser.family": "Chrome",
                           "window": 2 * DAY}, 2),
        ("recentReports", {"attrs.site": "a", "protocol": r.protocol, "window": HOUR}, BOUND),
        ("recentReports", {"country": "DE", "success": True, "window": DAY}, 1),
        ("lastSeen", {"login": r.login, "success": True, "window": 7 * DAY}, 1),
        ("lastSeen", {"login": r.login, "success": True}, 1),
        ("lastSeen", {"remote": r.remote, "success": False, "window": HOUR}, 1),
    ]
    return [(helper, parse_filter(flt.items()), n) for helper, flt, n in calls]


def shape_id(flt: Filter) -> Any:
    covered = recent_cover(flt)
    assert covered is not None
    return covered[0]


def answer(queries: Any, call: Call, seq: int) -> Any:
    helper, flt, n = call
    as_of = AsOf(before_seq=seq)
    if helper == "lastSeen":
        return queries.last_seen(flt, as_of)
    return queries.recent_rows(flt, n, as_of)


def judge(projection: WindowProjection, log: SQLiteEventLog, event: Event,
          calls: list[Call]) -> Counter:
    """Inside `event`'s report: every call answered as SQL answers it. Counts the rows found,
    and the rows received exactly at the start of their window (ties at the edge)."""
    sql = log.queries()
    projected = projection.queries(sql)
    found: Counter = Counter()
    for call in calls:
        expected = answer(sql, call, event.seq)
        assert answer(projected, call, event.seq) == expected, (event.seq, call)
        if isinstance(expected, list):
            found["rows"] += len(expected)
            window = call[1].window
            found["edge"] += sum(window is not None and row[1] == event.received - window
                                 for row in expected)
    return found


def walk(projection: WindowProjection, log: SQLiteEventLog, events: list[Event],
         asked_from: int = 0) -> Counter:
    found: Counter = Counter()
    for event in events:
        projection.begin(event)
        if event.seq >= asked_from:
            found += judge(projection, log, event, recent_calls(event))
        projection.finish(event)
    return found


# ------------------------------------------------------------------------ the unit level


async def test_rows_from_memory_are_the_stored_rows(log) -> None:
    eventlog, clock = log
    events = await fill(eventlog, clock, random.Random(3), 300)
    with sqlite3.connect(eventlog.path) as db:
        stored = db.execute(f"SELECT {', '.join(REPORT_COLUMNS)} FROM events ORDER BY seq").fetchall()
    assert [report_columns(e) for e in events] == stored


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_every_form_equals_sql_at_every_event(log, seed: int) -> None:
    eventlog, clock = log
    events = await fill(eventlog, clock, random.Random(seed), 1500)
    projection = WindowProjection(eventlog)
    projection.start_at(0)
    found = walk(projection, eventlog, events)
    projection.close()
    assert found["rows"] > 20_000, "the histories give the forms rows to return"
    assert found["edge"] > 0, "rows received exactly at the window's start are returned"
    calls = projection.calls
    logins = len({e.report.login for e in events})
    assert 0 < calls["recentReports", "sql"] <= logins, "only n=200 loads: each login once, wide"
    assert calls["recentReports", "projection"] == 9 * len(events) - calls["recentReports", "sql"]
    assert calls["lastSeen", "projection"] == 3 * len(events)
    shapes = projection.describe()["recent"]
    assert len(shapes) == 10, "lastSeen shares the shapes of recentReports' filters"
    assert all(s["complete"] and 0 < s["rows"] <= WIDE * s["key_tuples"] for s in shapes)


@pytest.mark.parametrize("build_max", [0, BUILD_MAX])
async def test_shapes_first_asked_mid_stream_and_after_a_restart_equal_sql(log, build_max: int) -> None:
    """Created while the runner is at event 1200, or by a runner resuming at 800: either built
    at once from their window (it holds fewer than BUILD_MAX rows), or, with no build, each key
    loaded from SQL the first time it is asked and kept current from then on."""
    eventlog, clock = log
    events = await fill(eventlog, clock, random.Random(11), 2000)
    late = WindowProjection(eventlog)
    late.start_at(0)
    late.recent.build_max = build_max
    late.recent.sweep_after = 5  # keys out of their window are swept, and known to be empty
    walk(late, eventlog, events, asked_from=1200)
    resumed = WindowProjection(eventlog)
    resumed.start_at(800)
    resumed.recent.build_max = build_max
    walk(resumed, eventlog, events[800:])
    logins = len({e.report.login for e in events})
    for projection, asked in ((late, 801), (resumed, 1200)):
        projection.close()
        calls = projection.calls
        assert calls["recentReports", "projection"] > 8 * asked, "most from memory"
        shapes = projection.describe()["recent"]
        if build_max:
            assert calls["recentReports", "sql"] <= logins, "only n=200 widens each login once"
            assert all(s["complete"] for s in shapes)
        else:
            assert calls["recentReports", "sql"] > logins, "keys were loaded (besides n=200)"
            assert not any(s["complete"] for s in shapes if s["window"] is None)


async def test_retention_pruning_keeps_answers_equal_to_sql(log) -> None:
    """Pruned rows are never returned: they are below the oldest stored seq, read before each
    batch."""
    eventlog, clock = log
    events = await fill(eventlog, clock, random.Random(5), 2000)
    projection = WindowProjection(eventlog)
    projection.start_at(0)
    prunes = {600: events[300].received, 1400: events[1300].received}
    for event in events:
        if event.seq in prunes:
            assert await eventlog.prune(prunes[event.seq]) > 0
            projection.check_retention()  # the runner does this before every batch
        projection.begin(event)
        judge(projection, eventlog, event, recent_calls(event))
        projection.finish(event)
    projection.close()
    with sqlite3.connect(eventlog.path) as db:
        assert projection.recent.oldest == db.execute("SELECT min(seq) FROM events").fetchone()[0]
    assert projection.calls["recentReports", "projection"] > 7 * len(events)


async def logins_history(path: Path, seed: int, n: int, logins: int,
                         success: float) -> tuple[SQLiteEventLog, list[Event]]:
    """A log of `n` reports of `logins` accounts from one address, one every 0 s to an hour."""
    clock = VirtualClock(start=START)
    eventlog = SQLiteEventLog(path / "events.db", clock)
    await eventlog.open()
    rng = random.Random(seed)
    for i in range(n):
        await clock.advance(rng.choice([0.0, 60.0, 600.0, HOUR]))
        await eventlog.append(Report(t=START + i, login=f"u{rng.randrange(logins)}",
                                     remote="192.0.2.1", success=rng.random() < success))
    return eventlog, await eventlog.read(0, n + 1)


async def test_keys_out_of_their_window_are_swept(tmp_path: Path) -> None:
    """Memory: a key none of whose rows is in the window any more is dropped (and answers stay
    exact); a shape holds at most BOUND rows per key."""
    eventlog, events = await logins_history(tmp_path, 8, 1500, 400, 0.5)
    assert len({e.report.login for e in events}) > 350

    def run(projection: WindowProjection, events: list[Event], window: float,
            login_of: Any) -> list[dict]:
        projection.recent.sweep_after = 20
        held = []
        for event in events:
            projection.begin(event)
            judge(projection, eventlog, event, [
                ("recentReports", parse_filter({"login": login_of(event), "window": window}.items()), 2),
                ("recentReports", parse_filter({"remote": "192.0.2.1"}.items()), BOUND)])
            projection.finish(event)
            held.append({s["window"]: s for s in projection.describe()["recent"]})
        projection.close()
        return held

    complete = WindowProjection(eventlog)
    complete.start_at(0)
    held = run(complete, events, HOUR, lambda event: event.report.login)
    assert max(h[HOUR]["key_tuples"] for h in held) < 100, "a few logins an hour are kept"
    assert held[-1][None] == {**held[-1][None], "key_tuples": 1, "rows": BOUND}
    # started late with no build: keys load on first use; a key swept before the shape is
    # complete (a day after it started) is known to have no row in the window, not reloaded
    late = WindowProjection(eventlog)
    late.start_at(700)
    late.recent.build_max = 0
    def someone(event: Event) -> str:  # 30 logins, asked over and over, often without a row
        return f"u{event.seq % 30}"

    run(late, events[700:], DAY, someone)
    asked = {someone(e) for e in events[700:]}
    assert len(asked) == 30
    assert late.calls["recentReports", "sql"] <= 30 + 1, "each key (and the address) loaded once"
    await eventlog.close()


async def test_wide_keys_answer_the_habit_sample_exactly(tmp_path: Path) -> None:
    """impossible_travel's 200-row habit sample from memory: keys with more than WIDE rows in
    a moving window, asked for WIDE, BOUND + 1 and 3 rows, in a complete shape and in one
    started late (keys loaded wide on first use); past max_wide keys or max_wide_rows rows, SQL
    answers the wide calls."""
    eventlog, events = await logins_history(tmp_path, 4, 1000, 2, 0.8)
    window = 10 * DAY
    assert events[-1].received - events[0].received > window, "the window moves"

    def calls(event: Event) -> list[Call]:
        flt = parse_filter({"login": event.report.login, "success": True, "window": window}.items())
        return [("recentReports", flt, WIDE), ("recentReports", flt, BOUND + 1),
                ("recentReports", flt, 3)]

    for start, max_wide, max_rows in ((0, 100, 10**6), (700, 100, 10**6), (0, 1, 10**6), (0, 100, 1)):
        projection = WindowProjection(eventlog)
        projection.start_at(start)
        projection.recent.build_max = 0
        projection.recent.max_wide = max_wide
        projection.recent.max_wide_rows = max_rows
        full = 0
        for event in events[start:]:
            projection.begin(event)
            judge(projection, eventlog, event, calls(event))
            full += len(eventlog.queries().recent_rows(calls(event)[0][1], WIDE + 1,
                                                       AsOf(before_seq=event.seq))) > WIDE
            projection.finish(event)
        projection.close()
        judged = len(events) - start
        assert full > judged / 4, "keys had more rows in the window than WIDE"
        sql, memory = (projection.calls["recentReports", path] for path in ("sql", "projection"))
        [shape] = projection.describe()["recent"]
        assert shape["rows"] <= WIDE * shape["key_tuples"]
        wide = projection.recent.shapes[shape_id(calls(events[-1])[0][1])]
        assert (wide.wide, wide.wide_rows) == (len(held := [e[0] for e in wide.keys.values()
                                                            if e[0].maxlen == WIDE]),
                                               sum(map(len, held))), "the bound counts exactly"
        if max_wide >= 2 and max_rows >= 2:
            assert sql <= 2 and memory == 3 * judged - sql, "each login loaded once, wide"
        else:
            assert 2 * judged / 3 < sql < 2 * judged, "u1's wide calls are SQL's (u0 is wide)"
    await eventlog.close()


# ------------------------------------------------------------------------ the real runner


RECORDING = """
RESULTS = {}
local function seqs(rows)
  local out = {}
  for i, r in ipairs(rows) do
    out[i] = table.concat({r.seq, r.remote, r.country, tostring(r.latitude), tostring(r.success),
                           r.attrs.site or "-", r.device_attrs["browser.family"] or "-"}, ",")
  end
  return table.concat(out, ";")
end
local function time(t) return t and string.format("%.3f", t) or "nil" end
function report(lt)
  RESULTS[#RESULTS + 1] = table.concat({
    lt.login,
    seqs(recentReports({login=lt.login, success=true, window="7d"}, 5)),
    seqs(recentReports({remote=lt.remote:tostring(), success=false, window="1h"}, 3)),
    time(lastSeen({login=lt.login, success=true})),
  }, "|")
end
setReport(report)
"""


def expected_line(log: SQLiteEventLog, event: Event) -> str:
    r = event.report
    sql = log.queries()
    as_of = AsOf(before_seq=event.seq)

    def seqs(flt: dict[str, Any], n: int) -> str:
        out = []
        for row in sql.recent_rows(parse_filter(flt.items()), n, as_of):
            record = dict(zip(REPORT_COLUMNS, row))
            site = json.loads(record["attrs"] or "{}").get("site", "-")
            browser = json.loads(record["device_attrs"] or "{}").get("browser.family", "-")
            latitude = record["latitude"]
            out.append(",".join([str(record["seq"]), record["remote"], record["country"] or "",
                                 "nil" if latitude is None else f"{latitude:.14g}",
                                 str(bool(record["success"])).lower(), site, browser]))
        return ";".join(out)

    last = sql.last_seen(parse_filter({"login": r.login, "success": True}.items()), as_of)
    return "|".join([r.login, seqs({"login": r.login, "success": True, "window": "7d"}, 5),
                     seqs({"remote": r.remote, "success": False, "window": "1h"}, 3),
                     "nil" if last is None else f"{last:.3f}"])


#: recentReports' `fields` as columns (lua/convert.FieldPlan): a place, and a whole trip.
PICKED_COLUMNS = [tuple(REPORT_COLUMNS.index(c) for c in names) for names in
                  (("country", "latitude", "longitude"),
                   ("seq", "received", "t", "remote", "country", "city", "latitude", "longitude"))]


@pytest.mark.parametrize("seed", [4, 5])
async def test_columns_of_the_recent_rows_equal_sqls_at_every_event(log, seed: int) -> None:
    """recent_columns (recentReports with fields) from the recent rows, and over BOUND from
    SQL's columns, equal the columns of SQL's whole rows as of every report judged."""
    eventlog, clock = log
    events = await fill(eventlog, clock, random.Random(seed), 800)
    projection = WindowProjection(eventlog)
    projection.start_at(0)
    sql = eventlog.queries()
    projected = projection.queries(sql)
    rows = 0
    for event in events:
        projection.begin(event)
        as_of = AsOf(before_seq=event.seq)
        for helper, flt, n in recent_calls(event):
            if helper != "recentReports":
                continue
            for columns in PICKED_COLUMNS:
                whole = [tuple(row[c] for c in columns) for row in sql.recent_rows(flt, n, as_of)]
                assert sql.recent_columns(flt, n, as_of, columns) == whole, (event.seq, flt, n)
                assert projected.recent_columns(flt, n, as_of, columns) == whole, (event.seq, flt, n)
                rows += len(whole)
        projection.finish(event)
    projection.close()
    assert rows > 10_000
    calls = projection.calls
    assert calls["recentReports", "projection"] > 6 * len(events), calls
    assert calls["recentReports", "sql"] >= 2 * len(events), "the 200-row asks go to SQL, counted"


async def test_the_runner_answers_from_the_projection_exactly_as_sql(log) -> None:
    """Through the real runner and Lua states, while events keep arriving."""
    eventlog, clock = log
    calls = await run_recording(eventlog, clock, RECORDING, 6, expected_line)
    assert calls["recentReports", "projection"] > 2 * 2400 * 0.9, calls
    assert calls["lastSeen", "projection"] > 2400 * 0.9, calls


# ------------------------------------------------------------------------ a real daemon


DAEMON_POLICY = listener_config() + """
setNumLuaStates(2)
function report(lt)
  local previous = recentReports({login=lt.login, success=true, window="7d"}, 5)
  local last = lastSeen({login=lt.login, success=true})
  if #previous > 0 and last ~= previous[1].received then error("lastSeen is not the newest") end
end
setReport(report)
"""


async def test_the_daemon_counts_projection_answers_in_its_metrics(tmp_path: Path) -> None:
    """trackalert_projection_answers_total: every report's two calls counted, by what answered."""
    import aiohttp

    rng = random.Random(2)
    sent = [{"login": f"user{rng.randrange(50)}", "remote": "192.0.2.9", "t": i,
             "success": rng.random() < 0.7} for i in range(600)]
    with DaemonProcess(tmp_path, DAEMON_POLICY) as process:
        assert (await post_all(process.url("/command/report"), sent, connections=16)).count(200) == 600

        async def scrape() -> str:
            async with aiohttp.ClientSession() as session:
                async with session.get(process.url("/metrics"), headers=basic_auth()) as resp:
                    return await resp.text()

        for _ in range(600):  # bounded: the runner has 600 reports to judge
            text = await scrape()
            if metric(text, "trackalert_projection_answers_total", 'helper="lastSeen",source="sql"') + \
                    metric(text, "trackalert_projection_answers_total",
                           'helper="lastSeen",source="projection"') >= 600:
                break
            await asyncio.sleep(0.1)
    name = "trackalert_projection_answers_total"
    recent = [metric(text, name, f'helper="recentReports",source="{s}"') for s in ("projection", "sql")]
    last = [metric(text, name, f'helper="lastSeen",source="{s}"') for s in ("projection", "sql")]
    assert sum(recent) == sum(last) == 600, text
    assert recent[0] >= 600 - 50 and last[0] >= 600 - 50, "SQL only loads each login once"
    assert metric(text, "trackalert_lua_errors_total") == 0
    assert metric(text, name, 'helper="countReports",source="projection"') == 0
