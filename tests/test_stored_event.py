"""Events read back from the log for the policy runner (eventlog/rows.StoredEvent) judge exactly
as the decoded `Event`s did: the same lt in Lua, the same rows for the projections, the same
report, and still no Python object pushed into Lua per event (trackalert.lua.values).

Why: the policy process reads every event it judges from SQLite; it now keeps the stored values
and builds lt in Lua from them instead of decoding a Report first (lua/convert.py E.run_row).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import AsyncIterator

import pytest

from trackalert.clock import VirtualClock
from trackalert.eventlog.keys import event_fields, key_function
from trackalert.eventlog.recent import report_columns
from trackalert.eventlog.rows import StoredEvent
from trackalert.eventlog.sqlite import SQLiteEventLog
from trackalert.lua.convert import call_with_tuple, tuple_runner
from trackalert.lua.host import Host
from trackalert.lua.state import LuaState, StateKind
from trackalert.report import Enrichment, Report

START = 1_760_000_000.0

#: Every shape of value lt carries: both families, a mapped address, maps present and absent
#: (attrs_mv's lists), every enrichment column known, some or none, text that is not ASCII.
REPORTS = [
    Report(t=START, remote="192.0.2.7:4242", login="alice", pwhash="5f4dcc", success=True,
           protocol="imap", tls=True, device_id="d1", session_id="s1",
           attrs={"site": "web", "lang": "fr"}, attrs_mv={"groups": ("a", "b"), "none": ()},
           device_attrs={"browser.family": "Firefox", "os.family": "Linux"},
           extra={"type": "wforce_report"},
           geo=Enrichment("SE", "Linköping", 58.4167, 15.6167, 29518, "Bredband2")),
    Report(t=START + 1.5, remote="2001:db8::1", login="bob", pwhash="0a1b2c", success=False,
           policy_reject=True, fail_type="credentials"),
    Report(t=START + 2, remote="::ffff:198.51.100.9", login="carol", success=True,
           geo=Enrichment("US", "", None, None, None, "")),
    Report(t=START + 3, remote="203.0.113.1", login="dave ☃", success=False,
           device_attrs={"imapc.family": "Thunderbird"},
           geo=Enrichment("", "", 12.5, -3.25, 64500, "")),
    Report(t=START + 4, remote="[2001:db8::2]:993", login="erin", attrs={"x": "1"},
           geo=Enrichment("", "", None, None, 64501, "")),
]

#: lt as text: every field, nested tables by sorted key, with the class of a table that has one.
_DUMP = """
local function dump(v)
  if type(v) ~= "table" then return type(v) .. ":" .. tostring(v) end
  local keys = {}
  for k in next, v do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  local mt = getmetatable(v)
  local parts = { mt and mt.name or "" }
  for _, k in ipairs(keys) do parts[#parts + 1] = tostring(k) .. "=" .. dump(v[k]) end
  return "{" .. table.concat(parts, ",") .. "}"
end
return function(lt) DUMPED = dump(lt) end
"""


@pytest.fixture
async def stored(tmp_path: Path) -> AsyncIterator[tuple[SQLiteEventLog, LuaState]]:
    clock = VirtualClock(start=START)
    log = SQLiteEventLog(tmp_path / "events.db", clock)
    await log.open()
    for report in REPORTS:
        await log.append(report)
        await clock.advance(1.0)
    try:
        yield log, LuaState(StateKind.WORKER, Host(clock=clock, eventlog=log))
    finally:
        await log.close()


def _lt(state: LuaState, event: object) -> str:
    (fn,) = state.execute(_DUMP)
    ok, error = call_with_tuple(state, tuple_runner(state), fn, event)
    assert ok, error
    (text,) = state.execute("return DUMPED")
    return text


async def test_lt_of_a_stored_event_is_the_decoded_events(stored) -> None:
    log, state = stored
    decoded, kept = await log.read(0, 100), await log.read_stored(0, 100)
    assert [type(e) for e in kept] == [StoredEvent] * len(REPORTS)
    assert [e.seq for e in kept] == [e.seq for e in decoded]
    for event, row in zip(decoded, kept):
        assert _lt(state, row) == _lt(state, event)
    assert "Linköping" in _lt(state, kept[0]) and "groups={,1=string:a,2=string:b}" in _lt(state, kept[0])


async def test_a_policy_changing_its_lt_changes_no_other(stored) -> None:
    """lt's maps come from templates decoded once per text: each lt has its own copy."""
    log, state = stored
    (fn,) = state.execute("return function(lt) lt.attrs.site = 'changed'; lt.attrs_mv.groups[1] = 'z' end")
    row = (await log.read_stored(0, 1))[0]
    assert call_with_tuple(state, tuple_runner(state), fn, row) == (True, None)
    assert "site=string:web" in _lt(state, row) and "1=string:a" in _lt(state, row)


async def test_the_projections_rows_of_a_stored_event_are_the_decoded_events(stored) -> None:
    log, _ = stored
    decoded, kept = await log.read(0, 100), await log.read_stored(0, 100)
    specs = [("login",), ("remote",), ("net4/24",), ("net6/32",), ("pwhash", "country"),
             ("protocol", "asn"), ("d:browser.family",), ("d:imapc.family",), ("a:site",),
             ("login", "a:x")]
    for event, row in zip(decoded, kept):
        assert row.columns == report_columns(event)  # what recentReports keeps and answers
        fields = event_fields(row)
        assert fields[3] == event_fields(event)[3]  # success: the stored 0/1
        for spec in specs:
            key = key_function(spec)
            assert key(fields) == key(event_fields(event)), spec
        assert row.report == dataclasses.replace(event.report, extra={})


async def test_no_python_object_crosses_into_lua_per_stored_event(stored) -> None:
    """The maps' decoder is pushed once (with the chunk); each lt is built of Lua values."""
    log, state = stored
    kept = await log.read_stored(0, 100)
    (fn,) = state.execute("return function(lt) local _ = lt.remote:tostring() .. json end")
    state.execute("json = ''")
    runner = tuple_runner(state)
    call_with_tuple(state, runner, fn, kept[0])  # compiles the chunk, pushes the decoder
    state.execute('collectgarbage("stop")')
    (before,) = state.execute("local n = 0; for _ in pairs(debug.getregistry()."
                              "LUPA_PYTHON_REFERENCES_TABLE) do n = n + 1 end; return n")
    for _ in range(200):
        for row in kept:
            assert call_with_tuple(state, runner, fn, row) == (True, None)
    (after,) = state.execute("local n = 0; for _ in pairs(debug.getregistry()."
                             "LUPA_PYTHON_REFERENCES_TABLE) do n = n + 1 end; return n")
    state.execute('collectgarbage("restart")')
    assert after == before


def test_a_stored_event_keeps_the_maps_as_stored() -> None:
    """What the window projection's keys read: JSON text, parsed only by a shape that looks."""
    row = (7, START, START, "192.0.2.1", "x", "", 1, 0, "", 0, "", "", "", '{"a":"b"}', None,
           None, None, None, None, None, None, None, b"\x04\xc0\x00\x02\x01")
    event = StoredEvent(row)
    assert (event.seq, event.received, event.delivery_id) == (7, START, None)
    assert event.fields[9:] == (None, '{"a":"b"}') and event.fields[4] == row[22]
    assert json.loads(event.fields[10]) == event.report.attrs == {"a": "b"}
    assert event.report.geo is None
