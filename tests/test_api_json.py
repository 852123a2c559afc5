"""jsonEncode, jsonDecode and jsonArray in a real Lua state: the text is what Python's json
writes (sorted, compact, UTF-8), what JSON cannot hold is an error naming where it is, and
decoding gives back tables that encode to the same text."""

from __future__ import annotations

import json

import pytest

from trackalert.lua.host import Host
from trackalert.lua.state import LuaError, LuaState, StateKind


@pytest.fixture(scope="module")
def state() -> LuaState:
    return LuaState(StateKind.WORKER, Host())


def encode(state: LuaState, lua_value: str) -> str:
    (text,) = state.execute(f"return jsonEncode({lua_value})")
    return text


def error_of(state: LuaState, code: str) -> str:
    """The first line of the error `code` raises (not a tail call, so it names its line)."""
    with pytest.raises(LuaError) as caught:
        state.execute(code)
    return str(caught.value).splitlines()[0]


def test_objects_have_sorted_keys_and_no_spaces(state: LuaState) -> None:
    text = encode(state, '{zeta = 1, alpha = {b = true, a = false}, ["with space"] = "x", M = {}}')
    assert text == '{"M":{},"alpha":{"a":false,"b":true},"with space":"x","zeta":1}'


def test_numbers_integral_ones_as_integers_others_exactly(state: LuaState) -> None:
    assert encode(state, "{3, 3.0, -0.0, 2^53, 2.5, 0.1 + 0.2, 1e300, -7}") == (
        "[3,3,0,9007199254740992,2.5,0.30000000000000004,1e+300,-7]")
    (back,) = state.execute("return jsonDecode(jsonEncode(0.1 + 0.2)) == 0.1 + 0.2")
    assert back is True


def test_strings_escape_only_what_json_needs(state: LuaState) -> None:
    text = encode(state, r'"q\"b\\s/\n\t\1\127é€😀"')
    assert text == '"q\\"b\\\\s/\\n\\t\\u0001\x7fé€😀"'
    assert json.loads(text) == 'q"b\\s/\n\t\x01\x7fé€😀'


def test_addresses_and_netmasks_are_their_text(state: LuaState) -> None:
    text = encode(state, '{remote = newCA("[2001:db8::1]:443"), net = newNetmask("192.0.2.77/24")}')
    assert text == '{"net":"192.0.2.0/24","remote":"2001:db8::1"}'


def test_an_empty_table_is_an_object_unless_marked_as_an_array(state: LuaState) -> None:
    assert encode(state, "{}") == "{}"
    assert encode(state, "jsonArray()") == "[]"
    assert encode(state, "{list = jsonArray({}), full = jsonArray({1, 2})}") == '{"full":[1,2],"list":[]}'
    (same,) = state.execute("local t = {} return jsonArray(t) == t")
    assert same is True


@pytest.mark.parametrize(("value", "message"), [
    ("{evidence = {1, {f = print}}}", "value at .evidence[2].f is a function"),
    ("{x = {newproxy()}}", "value at .x[1] is a userdata"),
    ("{co = coroutine.create(print)}", "value at .co is a thread"),
    ("{n = 0/0}", "value at .n is NaN"),
    ("{speed = -math.huge}", "value at .speed is infinite"),
    ("{1, 2, name = 'x'}", 'value is a table that mixes array items and string keys ("name")'),
    ("jsonArray({a = 1})", 'value is a table that mixes array items and string keys ("a")'),
    ("{a = {1, nil, 3}}", "value at .a is a sparse array (2 items, highest index 3)"),
    ("{[true] = 1}", "value is a table with the boolean key true"),
    ("{t = {[0] = 'zero'}}", "value at .t is a table with the number key 0"),
    ("{[1.5] = 1}", "value is a table with the number key 1.5"),
    ("{[{}] = 1}", "value is a table with the table key"),
    ('{["a b"] = {s = "\\255"}}', 'value at ["a b"].s is a string that is not valid UTF-8'),
    ('{s = "\\237\\160\\128"}', "value at .s is a string that is not valid UTF-8"),  # a surrogate
    ('{s = "\\192\\128"}', "value at .s is a string that is not valid UTF-8"),  # overlong
    ('{["\\255"] = 1}', "value is a table with a key that is not valid UTF-8"),
    ("newNetmaskGroup()", "value is a NetmaskGroup"),
])
def test_what_json_cannot_hold_is_an_error_naming_its_path(state: LuaState, value: str,
                                                           message: str) -> None:
    assert error_of(state, f"local v = {value}\nlocal text = jsonEncode(v)").startswith(
        f"console:2: jsonEncode(): {message}")


def test_a_cycle_is_an_error_but_a_shared_table_is_not(state: LuaState) -> None:
    assert error_of(state, "local t = {} t.child = {t} return jsonEncode(t)").endswith(
        "value at .child[1] is a cycle (a table inside itself)")
    assert encode(state, "(function() local s = {1} return {a = s, b = s} end)()") == (
        '{"a":[1],"b":[1]}')


def test_deep_nesting_is_refused_not_a_crash(state: LuaState) -> None:
    assert error_of(state, "local t = {} for i = 1, 1000 do t = {t} end return jsonEncode(t)").endswith(
        "value is nested deeper than 400 levels")
    assert error_of(state, "local v = jsonDecode(string.rep('[', 50000) .. string.rep(']', 50000))"
                    ) == "console:1: jsonDecode(): JSON nested too deeply"


def test_decode_gives_tables_indexed_from_one(state: LuaState) -> None:
    login, second, count, flag = state.execute(
        'local v = jsonDecode(\'{"login": "alice", "tries": [10, 20, 30], "ok": true}\')\n'
        "return v.login, v.tries[2], #v.tries, v.ok")
    assert (login, second, count, flag) == ("alice", 20, 3, True)


def test_decode_null_is_nil_or_the_value_asked_for(state: LuaState) -> None:
    absent, hole = state.execute('local v = jsonDecode(\'{"a": null, "b": [1, null]}\')\n'
                                 "return v.a == nil, v.b[2] == nil")
    assert (absent, hole) == (True, True)
    marker, length = state.execute('local NULL = {}\n'
                                   'local v = jsonDecode(\'[1, null, 3]\', {null = NULL})\n'
                                   "return v[2] == NULL, #v")
    assert (marker, length) == (True, 3)


@pytest.mark.parametrize("text", [
    '{"b":[],"a":{"x":[{}],"y":null}}', "[]", "{}", '"\\u00e9\\ud83d\\ude00"', "12", "true",
    '{"t":1763628800,"f":-2.5e-7,"big":123456789012}',
])
def test_decode_then_encode_gives_the_same_json(state: LuaState, text: str) -> None:
    (again,) = state.execute(f"return jsonEncode(jsonDecode({text!r}))")
    expected = json.loads(text)
    if isinstance(expected, dict) and "a" in expected:
        del expected["a"]["y"]  # null became nil: the key is gone
    assert json.loads(again) == expected
    assert again == json.dumps(expected, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@pytest.mark.parametrize(("text", "message"), [
    ('{"a": }', "invalid JSON at line 1 column 7 (character 7): Expecting value"),
    ('[1,\n 2,,]', "invalid JSON at line 2 column 4 (character 8): Expecting value"),
    ('{"a": 1} x', "invalid JSON at line 1 column 10 (character 10): Extra data"),
    ("NaN", "NaN is not JSON"),
    ("[Infinity]", "Infinity is not JSON"),
    ("1e400", "a number is too large for a Lua number"),
])
def test_bad_text_is_an_error_with_its_position(state: LuaState, text: str, message: str) -> None:
    assert error_of(state, f"local v = jsonDecode({text!r})").startswith(
        f"console:1: jsonDecode(): {message}")


def test_wrong_arguments_are_errors(state: LuaState) -> None:
    assert error_of(state, "return jsonDecode(5)").endswith("jsonDecode(): expects a string, got number")
    assert error_of(state, "return jsonDecode('1', {nul = 1})").endswith(
        "jsonDecode(): unknown option 'nul' (known: null)")
    assert error_of(state, "return jsonArray(5)").endswith("jsonArray(): expects a table, got number")
    assert error_of(state, "return jsonArray(setmetatable({}, {}))").endswith(
        "jsonArray(): the table already has a metatable")


def test_many_values_under_load_stay_themselves(state: LuaState) -> None:
    """Thousands of encodes and decodes in one state (the lupa mix-ups of values.py showed
    only under load): every text decodes back to the value it came from."""
    (bad,) = state.execute("""
        local bad = 0
        for i = 1, 3000 do
          local v = {i = i, name = "n" .. i, list = jsonArray({i, i + 0.5}), nested = {deep = {i}}}
          local back = jsonDecode(jsonEncode(v))
          if back.i ~= i or back.name ~= "n" .. i or back.list[2] ~= i + 0.5
             or back.nested.deep[1] ~= i then bad = bad + 1 end
        end
        return bad""")
    assert bad == 0


def test_a_large_value_is_encoded_like_a_small_one(state: LuaState) -> None:
    """Past a few thousand tokens the value crosses as a table instead of a list of results
    (Lua's C stack limit); the text must not change with the route."""
    (text,) = state.execute("""
        local rows = {}
        for i = 1, 5000 do rows[i] = {value = "v" .. i, count = i % 7} end
        return jsonEncode({rows = rows, n = #rows})""")
    expected = {"n": 5000, "rows": [{"value": f"v{i}", "count": i % 7} for i in range(1, 5001)]}
    assert text == json.dumps(expected, sort_keys=True, separators=(",", ":"))
