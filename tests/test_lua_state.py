"""The sandboxed Lua state and the basic globals, run for real in LuaJIT."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from trackalert import log
from trackalert.lua.host import Host
from trackalert.lua.state import LuaError, LuaState, LuaSyntaxError, StateKind


@pytest.fixture
def host() -> Host:
    return Host()


@pytest.fixture
def config(host: Host) -> LuaState:
    return LuaState(StateKind.CONFIG, host)


@pytest.fixture
def worker(host: Host) -> LuaState:
    return LuaState(StateKind.WORKER, host, index=1)


@pytest.fixture
def logged():
    stream = io.StringIO()
    log.configure(level=7, verbose=False, console=True, facility=None, stream=stream)
    yield stream
    log.configure(level=6, verbose=False, console=True, facility=None)


def test_it_is_luajit_with_the_standard_libraries(config: LuaState) -> None:
    assert config.execute("return _VERSION, type(jit), type(io.open), type(os.time)") == (
        "Lua 5.1", "table", "function", "function",
    )


def test_lua_cannot_reach_python(config: LuaState) -> None:
    assert config.execute("return python") == ()
    with pytest.raises(LuaError, match="no accessible member"):
        config.execute('return newCA("192.0.2.1").__class__')
    with pytest.raises(LuaError, match="no accessible member"):
        config.execute('local ca = newCA("192.0.2.1"); ca.port = 5')


def test_errors_in_globals_carry_file_and_line(config: LuaState, tmp_path: Path) -> None:
    path = tmp_path / "my.conf"
    path.write_text('infoLog("fine", {})\naddACL("not-a-netmask")\n')
    with pytest.raises(LuaError) as raised:
        config.run_file(str(path), "my.conf")
    assert str(raised.value).startswith("my.conf:2: addACL(): ")


def test_syntax_errors_are_reported_as_such(config: LuaState) -> None:
    with pytest.raises(LuaSyntaxError, match=r"bad.conf:1:"):
        config.execute("x = = 1", "bad.conf")


def test_logging_functions_format(worker: LuaState, logged: io.StringIO) -> None:
    worker.execute('infoLog("Received report", {login="bob"}); warnLog("plain", {}); errorLog("n", {count=3})')
    assert logged.getvalue().splitlines() == ['Received report: login="bob" ', "plain", 'n: count="3" ']


def test_verbose_only_logging_is_gated(worker: LuaState, logged: io.StringIO) -> None:
    worker.execute('vinfoLog("hidden", {}); debugLog("hidden too", {})')
    assert logged.getvalue() == ""


def test_addresses(worker: LuaState) -> None:
    assert worker.execute(
        'local ca = newCA("[2001:db8::1]:53"); return ca:tostring(), ca:isIPv6(), ca:isIPv4()'
    ) == ("2001:db8::1", True, False)
    assert worker.execute('return newCA("::ffff:192.0.2.1"):isMappedIPv4()') == (True,)
    assert worker.execute('return newNetmaskFromCA(newCA("192.0.2.129"), 24):toStringNetwork()') == ("192.0.2.0/24",)
    assert worker.execute('return newNetmask("198.51.100.200/25"):toStringNetwork()') == ("198.51.100.128/25",)
    assert worker.execute(
        'local g = newNetmaskGroup(); g:addMask("10.0.0.0/8"); g:addMask("!10.1.0.0/16");'
        'return g:match(newCA("10.2.3.4")), g:match(newCA("10.1.2.3")), g:size()'
    ) == (True, False, 2)


def test_invalid_ca_gives_zero_address_and_console_note(config: LuaState, host: Host) -> None:
    assert config.execute('return newCA("mail.example.com"):tostring()') == ("0.0.0.0",)
    assert "newCA(): error parsing address/port" in host.take_console_output()


def test_acl_functions(config: LuaState, host: Host) -> None:
    config.execute('addACL("192.0.2.0/24"); addACL("!192.0.2.128/25")')
    config.execute("showACL()")
    assert host.take_console_output() == "192.0.2.0/24\n!192.0.2.128/25\n"
    config.execute('setACL({"198.51.100.0/24"})')
    assert host.settings.acl.entries() == ["198.51.100.0/24"]
    with pytest.raises(LuaError, match="setACL"):
        config.execute('setACL({"198.51.100.0/24", "bogus"})')
    assert host.settings.acl.entries() == ["198.51.100.0/24"], "a bad list changes nothing"


def test_settings_from_config(config: LuaState, host: Host) -> None:
    config.execute(
        'setNumLuaStates(3); setMaxWebserverConns(50); setMetricsNoPassword();'
        'setEventLog("sqlite:///x.db"); setEventLogRetention("400d")'
    )
    s = host.settings
    assert (s.num_lua_states, s.max_conns, s.metrics_no_password) == (3, 50, True)
    assert s.eventlog_url == "sqlite:///x.db" and s.retention_seconds == 400 * 86400
    with pytest.raises(LuaError, match="setNumLuaStates"):
        config.execute("setNumLuaStates(0)")
    with pytest.raises(LuaError, match="setEventLogRetention"):
        config.execute('setEventLogRetention("forever")')


def test_listeners(config: LuaState, host: Host, tmp_path: Path) -> None:
    config.execute('addListener("127.0.0.1:8085", false, "", "", {})')
    config.execute('addListener("[::1]:8086", false, "", "", {})')
    config.execute('addListener("localhost:8087", false, "", "", {})')  # a hostname: skipped
    config.execute(f'addListener("127.0.0.1:8088", true, "{tmp_path}/none.pem", "{tmp_path}/none.key", {{}})')
    assert [str(l.address) for l in host.settings.listeners] == ["127.0.0.1:8085", "[::1]:8086"]


def test_duration_to_seconds(worker: LuaState) -> None:
    assert worker.execute('return durationToSeconds("1:30"), durationToSeconds("00:00:10"), durationToSeconds("x")') == (5400, 10, 0)


def test_console_show_commands(config: LuaState, host: Host) -> None:
    config.execute('setCustomEndpoint("zeta", function() end); setCustomEndpoint("alpha", function() end)')
    config.execute("showCustomEndpoints()")
    assert host.take_console_output() == (
        f"{'Custom Endpoint':<30} \n{'alpha':<30} \n{'zeta':<30} \n"
    )
    config.execute("showVersion()")
    assert host.take_console_output().startswith("trackalert ")
    host.count_report()
    config.execute("stats()")
    assert host.take_console_output() == "1 reports\n"


def test_custom_stats(config: LuaState, worker: LuaState, host: Host) -> None:
    config.execute('addCustomStat("hits")')
    worker.execute('incCustomStat("hits"); incCustomStat("hits"); incCustomStat("undeclared")')
    config.execute("showCustomStats()")
    assert host.take_console_output() == "hits=2\n"


def test_set_report_needs_a_function(worker: LuaState) -> None:
    with pytest.raises(LuaError, match="setReport needs a function"):
        worker.execute("setReport(5)")
    worker.execute("setReport(function(lt) end)")
    assert worker.report_fn is not None


# ---------------------------------------------------------------------------- the sandbox

# Everything reachable from the globals and the registry: tables (keys, values, metatables),
# functions (upvalues, environments) and userdata (metatables, environments). Counts the tables
# that look like lupa's `python` module.
FIND_PYTHON_MODULE = """
local seen, queue, found = {}, {debug.getregistry(), _G}, 0
local function visit(value)
  local kind = type(value)
  if (kind == "table" or kind == "function" or kind == "userdata" or kind == "thread")
      and not seen[value] then
    seen[value] = true
    queue[#queue + 1] = value
  end
end
while #queue > 0 do
  local value = table.remove(queue)
  local kind = type(value)
  if kind == "table" then
    if rawget(value, "as_attrgetter") ~= nil or rawget(value, "as_itemgetter") ~= nil then
      found = found + 1
    end
    for k, v in next, value do visit(k); visit(v) end
    visit(debug.getmetatable(value))
  elseif kind == "function" then
    visit(getfenv(value))
    for i = 1, 255 do
      local name, up = debug.getupvalue(value, i)
      if name == nil then break end
      visit(up)
    end
  elseif kind == "userdata" then
    visit(debug.getmetatable(value))
    visit(debug.getfenv(value))
  end
end
return found
"""


def test_lua_has_no_way_to_lupa_s_python_module(config: LuaState, worker: LuaState) -> None:
    for state in (config, worker):
        assert state.execute("return python, package.loaded.python, package.preload.python") == ()
        with pytest.raises(LuaError, match="module 'python' not found"):
            state.execute('return require("python")')
        assert state.execute(FIND_PYTHON_MODULE) == (0,)


def test_ffi_stays_for_the_trusted_config(config: LuaState) -> None:
    """README (Sandbox): config and console are trusted, ffi and debug included."""
    assert config.execute('return type(require("ffi").cdef), type(debug.getregistry)') == (
        "function", "function",
    )


PAYLOADS = [
    '"); pwned = true; --', "]] pwned = true [[", 'require("python").eval("1")',
    'require("ffi").C.abort()', "os.exit(3)", "\\0\n\t'\"", "${pwned} %s %d", "\u00e9\u2603",
]

DATA_POLICY = """
dofile("{alert}")
SEEN = {{}}
function report(lt)
  local parts = {{lt.login, lt.pwhash, lt.session_id, lt.device_id, lt.attrs.payload,
                 lt.device_attrs.payload, lt.attrs_mv.payload[1], lt.attrs_mv.payload[2]}}
  SEEN[#SEEN + 1] = StarterAlert.encode(parts)
  SEEN[#SEEN + 1] = string.format("%s|%s", lt.login, lt.attrs.payload)
  infoLog("payload", {{login = lt.login, attr = lt.attrs.payload}})
end
setCustomEndpoint("echo", function(args)
  return true, {{payload = args.attrs.payload .. "|" .. args.attrs_mv.payload[1]}}
end)
"""


def test_report_data_is_only_ever_data(worker: LuaState, tmp_path: Path) -> None:
    """Fields full of Lua code, ffi calls and require strings reach the policy as strings."""
    import json

    from trackalert.eventlog.base import Event
    from trackalert.lua.convert import call_with_tuple, protected_call, tuple_runner
    from trackalert.report import Report

    alert = Path(__file__).resolve().parent.parent / "conf" / "policies" / "alert.lua"
    worker.execute(DATA_POLICY.format(alert=alert))
    runner = tuple_runner(worker)
    (fn,) = worker.execute("return report")
    for i, payload in enumerate(PAYLOADS):
        report = Report(
            t=1.0, remote="192.0.2.1", login=payload, pwhash=payload, success=False,
            session_id=payload, device_id=payload, attrs={"payload": payload},
            attrs_mv={"payload": (payload, payload + "2")}, device_attrs={"payload": payload},
        )
        assert call_with_tuple(worker, runner, fn, Event(i + 1, 1.0, report)) == (True, None)
        args = worker.table({"attrs": {"payload": payload}, "attrs_mv": {"payload": [payload]}})
        ok, _, answer = protected_call(worker, worker.endpoints["echo"], args)
        assert ok and answer["payload"] == payload + "|" + payload
    (seen,) = worker.execute("return SEEN")
    for i, payload in enumerate(PAYLOADS):
        assert json.loads(seen[2 * i + 1]) == [payload] * 7 + [payload + "2"]
        assert seen[2 * i + 2] == f"{payload}|{payload}"
    assert worker.execute("return pwned") == ()
