"""Values in Lua (trackalert.lua.values): nothing Python crosses per call, so nothing is mixed up.

lupa hands a policy the wrong Python object under GC pressure (scoder/lupa#293/#294); these tests
document that bug on the installed lupa, prove that no Python object crosses into Lua per report,
and drive the real daemon under load with every idiom of conf/ and the starter policies.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import lupa
import lupa.luajit21 as luajit
import pytest

from trackalert.clock import VirtualClock
from trackalert.eventlog.base import Event
from trackalert.eventlog.sqlite import SQLiteEventLog
from trackalert.geoip import GeoIPDB, GeoIPRecord, GeoIPRegistry
from trackalert.lua.convert import call_with_tuple, tuple_runner
from trackalert.lua.host import Host
from trackalert.lua.state import LuaError, LuaState, StateKind
from trackalert.lua.values import LUA_CLASSES, guarded
from trackalert.netaddr import ComboAddress, Netmask, NetmaskGroup, parse_combo
from trackalert.report import report_from_dict
from trackalert.testing import DaemonProcess, basic_auth, listener_config

DATA = Path(__file__).parent / "data"
CITY = DATA / "geoip" / "GeoIP2-City-Test.mmdb"
IDIOMS = DATA / "lua_idioms.lua"
POLICIES = Path(__file__).resolve().parent.parent / "conf" / "policies"
REMOTES = ["81.2.69.142", "81.2.69.165", "89.160.20.112", "2.125.160.216", "175.16.199.5",
           "67.43.156.10", "216.160.83.56", "2001:218::1", "2001:480::1", "214.0.1.5"]
MASKS = ["81.2.69.0/24", "!81.2.69.160/28", "2001:218::/32", "175.16.199.0/24", "0.0.0.0/0",
         "!216.160.0.0/16"]
START = 1_760_000_000.0


def idioms_config(starter_policies: bool = False) -> str:
    """The idioms policy; with `starter_policies`, every starter policy runs after it too."""
    masks = ", ".join(f'"{mask}"' for mask in MASKS)
    config = f'IDIOM_MASKS = {{{masks}}}\ndofile("{IDIOMS}")\nlocal policies = {{Idioms}}\n'
    if starter_policies:
        config += f'dofile("{POLICIES}/alert.lua")\n' + "".join(
            f'policies[#policies + 1] = dofile("{POLICIES}/{name}.lua")\n'
            for name in ("new_country", "new_device", "impossible_travel", "password_spray",
                         "account_attack", "pwhash_spray"))
    return config + "setReport(function(lt) for _, p in ipairs(policies) do p.report(lt) end end)\n"


def idiom_report(i: int, remote: str, db: GeoIPDB, group: NetmaskGroup) -> dict[str, Any]:
    """Report `i`: its own login and address, and what the policy must find in it (in attrs)."""
    ca = parse_combo(remote)
    record = db.lookupCity(remote)
    return {
        "login": f"user{i}|{remote}", "remote": remote, "t": START + i, "success": i % 3 != 0,
        "pwhash": f"{i % 97:04x}", "protocol": "imap",
        "device_attrs": {"browser.family": f"B{i % 7}", "os.family": "Linux"},
        "attrs": {
            "remote": remote, "user": f"user{i}", "family": str(ca.ip.version),
            "browser": f"B{i % 7}", "success": "true" if i % 3 != 0 else "false",
            "net": Netmask.from_address(ca, 24 if ca.ip.version == 4 else 64).toStringNetwork(),
            "in_group": "true" if group.match(ca) else "false",
            "country": record.country_code, "city": record.city,
        },
    }


def idiom_reports(count: int, seed: int) -> list[dict[str, Any]]:
    registry = GeoIPRegistry()
    registry.open("City", str(CITY))
    db = registry.get("City")
    assert db is not None
    group = NetmaskGroup(MASKS)
    rng = random.Random(seed)
    return [idiom_report(i, rng.choice(REMOTES), db, group) for i in range(count)]


def python_references(state: LuaState) -> int:
    """Live entries of lupa's table of Python objects referenced from Lua."""
    (count,) = state.execute(
        "local n = 0; for _ in pairs(debug.getregistry().LUPA_PYTHON_REFERENCES_TABLE) do "
        "n = n + 1 end; return n"
    )
    return count


# ------------------------------------------------------------------------ the upstream bug


def test_lupa_itself_mixes_up_the_python_objects_it_pushes() -> None:
    """scoder/lupa#293/#294: Python objects pushed per call come back as other objects.

    The releases known to carry the bug (up to 2.8) must show it, which proves this check can see
    it; a later release is only reported on, so a fixed lupa does not turn CI red (the design of
    trackalert.lua.values stays either way)."""
    runtime = luajit.LuaRuntime()
    identity = runtime.eval("function(e, t) return e end")
    objects = [object(), object(), object()]
    wrong = sum(identity(objects[i % 3], runtime.table()) is not objects[i % 3] for i in range(200_000))
    print(f"lupa {lupa.__version__}: {wrong} of 200000 calls returned another object")
    release = tuple(int(part) for part in lupa.__version__.split(".")[:2] if part.isdigit())
    if release <= (2, 8):
        assert wrong > 0


def test_lua_addresses_are_never_mixed_up() -> None:
    """The same check with what newCA gives a policy: every call sees its own address."""
    state = LuaState(StateKind.WORKER, Host())
    texts = ["192.0.2.1", "2001:db8::7", "198.51.100.9"]
    addresses = [state.execute(f'return newCA("{text}")')[0] for text in texts]
    (text_of,) = state.execute("return function(e, t) return e:tostring() end")
    wrong = sum(text_of(addresses[i % 3], state.table()) != texts[i % 3] for i in range(200_000))
    assert wrong == 0


# ------------------------------------------------------------------------- the invariant


@pytest.fixture
async def logged(tmp_path: Path) -> AsyncIterator[tuple[SQLiteEventLog, LuaState]]:
    """A worker state over a real (empty) SQLite log, with the GeoIP test database."""
    clock = VirtualClock(start=START)
    log = SQLiteEventLog(tmp_path / "events.db", clock)
    await log.open()
    host = Host(clock=clock, eventlog=log)
    host.geoip.open("City", str(CITY))
    for name in ("idiom_calls", "idiom_mismatch"):
        host.declare_custom_stat(name)
    try:
        yield log, LuaState(StateKind.WORKER, host)
    finally:
        await log.close()


@pytest.fixture
async def idiom_state(logged) -> tuple[LuaState, list[Event]]:
    log, state = logged
    for doc in idiom_reports(3000, seed=11):
        await log.append(report_from_dict(doc, state.host.clock.time()))
        await state.host.clock.advance(1.0)
    state.execute(idioms_config())
    return state, await log.read(0, 10_000)


async def test_no_python_object_crosses_into_lua_per_report(idiom_state) -> None:
    """With Lua's collector stopped, every Python object pushed into Lua stays in lupa's table:
    after thousands of reports through every idiom, that table has not grown by one."""
    state, events = idiom_state
    runner = tuple_runner(state)
    state.execute('collectgarbage("stop")')
    before = python_references(state)
    errors = []
    for event in events:
        state.as_of_seq = event.seq
        ok, error = call_with_tuple(state, runner, state.report_fn, event)
        if not ok:
            errors.append(error)
    state.as_of_seq = None
    after = python_references(state)
    state.execute('collectgarbage("restart")')
    calls, mismatches = state.execute("return Idioms.calls, Idioms.mismatches")
    assert errors == []
    assert (mismatches, calls) == (0, 15 * len(events))
    assert after == before, f"{after - before} Python objects were pushed into Lua"


# ------------------------------------------------------------------- the Lua-side classes


def test_lua_methods_are_the_documented_ones() -> None:
    state = LuaState(StateKind.WORKER, Host())
    lib = state.values.lib
    for name, cls in LUA_CLASSES.items():
        assert lib.methods(name).split() == sorted(cls.LUA_METHODS), name
    (fields,) = state.execute(
        'local r = getGeoIP2DB("none"):lookupCity(newCA("192.0.2.1")); local k = {}; '
        "for key in pairs(r) do k[#k + 1] = key end; table.sort(k); return table.concat(k, ' ')"
    )
    assert fields.split() == sorted(GeoIPRecord.LUA_METHODS)


def random_address(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return ".".join(str(rng.randrange(256)) for _ in range(4))
    if kind == 1:  # IPv4-mapped
        return "::ffff:" + ".".join(str(rng.randrange(256)) for _ in range(4))
    if kind == 2:  # near a few prefixes, so that matches happen
        return f"10.{rng.choice([0, 1, 128])}.{rng.randrange(4)}.{rng.randrange(256)}"
    return f"2001:db8:{rng.randrange(4):x}::{rng.randrange(65536):x}"


def random_mask(rng: random.Random) -> str:
    address = random_address(rng)
    width = 128 if ":" in address else 32
    return f"{address}/{rng.randrange(width + 1)}"


def test_matching_agrees_with_the_python_implementation() -> None:
    """The Lua methods compare hex prefixes; trackalert.netaddr compares integers."""
    rng = random.Random(5)
    state = LuaState(StateKind.WORKER, Host())
    (check,) = state.execute("""
      return function(masks, addresses, bits)
        local group, out = newNetmaskGroup(), {}
        for i = 1, #masks do group:addMask(masks[i]) end
        for i = 1, #addresses do
          local ca = newCA(addresses[i])
          out[#out + 1] = tostring(newNetmask((masks[i]:gsub("^!", ""))):match(ca)) .. " " ..
            tostring(group:match(ca)) .. " " .. newNetmaskFromCA(ca, bits[i]):toStringNetwork()
        end
        return table.concat(out, "\\n"), group:size()
      end""")
    for _ in range(40):
        masks = [("!" if rng.random() < 0.3 else "") + random_mask(rng) for _ in range(12)]
        addresses = [random_address(rng) for _ in range(12)]
        bits = [rng.randrange(130) for _ in range(12)]
        group = NetmaskGroup(masks)
        expected = "\n".join(
            f"{str(Netmask.parse(m.lstrip('!')).match(parse_combo(a))).lower()} "
            f"{str(group.match(parse_combo(a))).lower()} "
            f"{Netmask.from_address(parse_combo(a), b).toStringNetwork()}"
            for m, a, b in zip(masks, addresses, bits)
        )
        assert check(state.table(masks), state.table(addresses), state.table(bits)) == (expected, len(group))


def test_python_results_become_lua_values(tmp_path: Path) -> None:
    state = LuaState(StateKind.WORKER, Host())
    wrap = state.values.lib.wrap
    state.lua.globals().nested = wrap(guarded(
        lambda: [1, {"ca": parse_combo("192.0.2.1"), "list": ["a", "b"]}, Netmask.parse("10.0.0.0/8")],
        state), "nested")
    state.lua.globals().opaque = wrap(guarded(lambda: object(), state), "opaque")
    before = python_references(state)
    assert state.execute(
        "local r = nested(); return type(r), r[1], r[2].ca:tostring(), r[2].list[2], "
        "r[3]:toStringNetwork()"
    ) == ("table", 1, "192.0.2.1", "b", "10.0.0.0/8")
    with pytest.raises(LuaError, match=r"^console:1: opaque\(\): a Python object cannot be passed to Lua"):
        state.execute("local x = opaque()")
    assert python_references(state) == before


# ------------------------------------------------------------- errors name where they happened


POLICY = """\
local group = newNetmaskGroup()
function by_global(lt) countReports({ no_such_key = 1 }) end
function by_method(lt) group:addMask("not a netmask") end
function by_member(lt) return lt.remote:toString() end
function by_dot_call(lt) local text = lt.remote.tostring() end
function by_geoip(lt) getGeoIP2DB("City"):lookupCountry({}) end
function by_lua(lt) local x = nil; return x.field end
function in_tail_call(lt)
  return newNetmask("10.0.0.0/99")
end
function by_table_error(lt) error({}) end
"""


@pytest.mark.parametrize(("function", "where", "message"), [
    ("by_global", "policy.lua:2: ", "countReports(): unknown filter key 'no_such_key'"),
    ("by_method", "policy.lua:3: ", "NetmaskGroup:addMask(): Unable to convert 'not a netmask'"),
    ("by_member", "policy.lua:4: ", "'ComboAddress' has no accessible member 'toString'"),
    ("by_dot_call", "policy.lua:5: ", "ComboAddress:tostring() must be called on a ComboAddress"),
    ("by_geoip", "policy.lua:6: ", "GeoIPDB:lookupCountry(): expected a ComboAddress"),
    ("by_lua", "policy.lua:7: ", "attempt to index local 'x'"),
    ("in_tail_call", "in function <policy.lua:8>: ", "newNetmask(): Invalid netmask bits '99'"),
    ("by_table_error", "in function <policy.lua:11>: ", "table: "),
])
async def test_errors_name_the_line_that_raised_them(
    logged, tmp_path: Path, function: str, where: str, message: str
) -> None:
    _, state = logged
    path = tmp_path / "policy.lua"
    path.write_text(POLICY)
    state.run_file(str(path), "policy.lua")
    (fn,) = state.execute(f"return {function}")
    event = Event(1, START, report_from_dict(idiom_reports(1, seed=1)[0], START))
    ok, error = call_with_tuple(state, tuple_runner(state), fn, event)
    assert not ok
    assert error.startswith(where + message), error
    assert "\nstack traceback:\n" in error


# ------------------------------------------------------------------- the real daemon, loaded


async def post_all(url: str, reports: list[dict[str, Any]], connections: int) -> list[int]:
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for report in reports:
        queue.put_nowait(report)
    statuses: list[int] = []

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            async with session.post(url, json=body, headers=basic_auth()) as resp:
                statuses.append(resp.status)

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(connections)))
    return statuses


def metric(text: str, name: str, labels: str = "") -> float:
    """The sum of a Prometheus sample over all its label sets, or over the one given."""
    label_part = r"\{" + re.escape(labels) + r"\}" if labels else r"(?:\{[^}]*\})?"
    pattern = "^" + re.escape(name) + label_part + r" (\S+)$"
    return sum(float(value) for value in re.findall(pattern, text, re.MULTILINE))


async def test_the_real_daemon_under_load_never_mixes_up_values(tmp_path: Path) -> None:
    """64 connections, 4 Lua states, 8,000 reports from ten addresses, each checked 15 ways and
    then run through every starter policy: zero wrong values and zero Lua errors over 120,000
    checked calls."""
    reports = idiom_reports(8000, seed=3)
    config = listener_config() + (
        f'setNumLuaStates(4)\nnewGeoIP2DB("City", "{CITY}")\n'
        'addCustomStat("idiom_calls")\naddCustomStat("idiom_mismatch")\n'
    ) + idioms_config(starter_policies=True)
    started = time.monotonic()
    with DaemonProcess(tmp_path, config) as daemon:
        statuses = await post_all(daemon.url("/command/report"), reports, connections=64)
        assert statuses.count(200) == len(reports)
        text = ""

        async def all_ran() -> bool:
            nonlocal text
            async with aiohttp.ClientSession() as session:
                async with session.get(daemon.url("/metrics"), headers=basic_auth()) as resp:
                    text = await resp.text()
            return metric(text, "trackalert_lua_calls_total", 'kind="report"') >= len(reports)

        for _ in range(600):  # bounded: until every report has been through the policy
            if await all_ran():
                break
            await asyncio.sleep(0.1)
        output = daemon.output()
    calls = metric(text, "trackalert_custom_stats_total", 'metric="idiom_calls"')
    wrong = metric(text, "trackalert_custom_stats_total", 'metric="idiom_mismatch"')
    errors = metric(text, "trackalert_lua_errors_total")
    print(f"{len(reports)} reports, {calls:.0f} checked Lua calls, {wrong:.0f} wrong values, "
          f"{errors:.0f} Lua errors in {time.monotonic() - started:.1f} s")
    assert metric(text, "trackalert_lua_calls_total", 'kind="report"') == len(reports), output[-3000:]
    assert (wrong, errors) == (0, 0), "\n".join(
        line for line in output.splitlines() if "mismatch" in line or "exception" in line)[:3000]
    assert calls == 15 * len(reports) >= 100_000
    assert "Policy alert" in output  # the starter policies ran too (the sprays among the reports)
