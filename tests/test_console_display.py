"""How our console shows values the C++ console could not print: real Lua values from a real state."""

from __future__ import annotations

import pytest

from trackalert.console.display import WIDTH, show
from trackalert.lua.host import Host
from trackalert.lua.state import LuaState, StateKind


@pytest.fixture(scope="module")
def lua() -> LuaState:
    return LuaState(StateKind.CONFIG, Host())


def value(lua: LuaState, expression: str):
    (result,) = lua.execute(f"return {expression}")
    return result


def test_records_are_aligned_columns_numbers_to_the_right(lua: LuaState) -> None:
    rows = value(lua, '{{value="GB", count=12}, {value="FR", count=3}, {value="DE", count=100}}')
    assert show(rows) == "count  value\n   12  GB\n    3  FR\n  100  DE"


def test_columns_empty_in_every_row_are_left_out_and_missing_cells_are_blank(lua: LuaState) -> None:
    rows = value(lua, '{{login="alice", city="", attrs={}, asn=64500}, {login="bob", attrs={}}}')
    assert show(rows) == "  asn  login\n64500  alice\n       bob"


def test_records_too_wide_for_columns_are_one_a_line(lua: LuaState) -> None:
    long = "x" * WIDTH
    rows = value(lua, f'{{{{login="alice", note="{long}", city=""}}, {{login="bob", seq=2}}}}')
    assert show(rows) == f"login=alice note={long}\nlogin=bob seq=2"


def test_nested_tables_in_a_row_are_inline(lua: LuaState) -> None:
    rows = value(lua, '{{login="alice", device_attrs={os="Linux", browser="Firefox"}, tags={"a", "b"}}}')
    assert show(rows) == (
        "device_attrs                 login  tags\n"
        "{browser=Firefox, os=Linux}  alice  {a, b}"
    )


def test_arrays_are_one_element_a_line(lua: LuaState) -> None:
    assert show(value(lua, '{"first", 2, true, {3, 4}}')) == "first\n2\ntrue\n{3, 4}"


def test_maps_are_sorted_aligned_key_value_lines(lua: LuaState) -> None:
    assert show(value(lua, '{zeta=1, alpha="a", [10]="ten", [2]="two", mid={k="v"}}')) == (
        "2      two\n10     ten\nalpha  a\nmid    {k=v}\nzeta   1"
    )


def test_a_table_that_contains_itself_is_shown_to_a_bounded_depth(lua: LuaState) -> None:
    lua.execute("loop = {name='loop'} loop.self = loop")
    text = show(value(lua, "loop"))
    assert text.splitlines()[0] == "name  loop"
    assert text.splitlines()[1].startswith("self  {name=loop, self={name=loop, self={") and "{...}" in text
    assert len(show(value(lua, "_G"))) < 1_000_000  # the globals, including _G itself


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("{}", "{}"),
        ("true", "true"),
        ("false", "false"),
        ("print", "<function>"),
        ("newCA('2001:db8::1')", "2001:db8::1"),
        ("newNetmask('192.0.2.0/24')", "192.0.2.0/24"),
        ("1.5", "1.5"),
        ("1e300", "1e+300"),
    ],
)
def test_single_values(lua: LuaState, expression: str, expected: str) -> None:
    assert show(value(lua, expression), lua.values.text_of) == expected


def test_addresses_inside_records_show_as_their_text(lua: LuaState) -> None:
    rows = value(lua, '{{login="alice", remote=newCA("192.0.2.1")}, {login="bob", remote=newCA("::1")}}')
    assert show(rows, lua.values.text_of) == "login  remote\nalice  192.0.2.1\nbob    ::1"


def test_an_operator_table_with_its_own_tostring_is_not_run(lua: LuaState) -> None:
    disguised = value(lua, 'setmetatable({a=1}, {__tostring=function() error("ran") end})')
    assert show(disguised, lua.values.text_of) == "a  1"
