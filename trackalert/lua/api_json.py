"""Lua globals jsonEncode, jsonDecode and jsonArray: JSON written and read by Python's `json`.

Policies build JSON alert bodies; a hand-written encoder in Lua got numbers, some escapes and
empty arrays subtly wrong, so the text is produced and parsed by the standard library instead.
Not orjson: for a starter alert jsonEncode takes ~33 us, of which `json.dumps` is ~11 us; the
rest is the walk and the crossing, which a faster encoder would not shorten, and alerts are rare.

The work is split along what each side can see. Only Lua can tell a table's identity (a cycle),
its metatable (the array mark), a function from a userdata, so Lua walks the value, checks it and
names the path of what JSON cannot hold; it hands Python a flat list of tokens, which Python turns
into dicts and lists for `json.dumps`. Decoding is the mirror: `json.loads`, a flat list of tokens,
and Lua builds the tables (arrays marked, so an empty one encodes back as `[]`). Nothing Python
crosses into Lua but strings, numbers and booleans (trackalert.lua.values says why).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Callable, Iterator

from trackalert.lua.convert import describe, is_table
from trackalert.lua.registry import Where, lua_global
from trackalert.lua.values import CHUNK_NAME

if TYPE_CHECKING:
    from trackalert.lua.state import LuaState

#: Deeper nesting than this is refused (by both sides), well inside Python's recursion limit.
MAX_DEPTH = 400

_LIBRARY = r"""
local V, MAX_DEPTH = ...
local type, next, rawget, getmetatable, setmetatable, tostring = type, next, rawget, getmetatable, setmetatable, tostring
local floor, huge, find, byte, format = math.floor, math.huge, string.find, string.byte, string.format
local concat, unpack = table.concat, unpack
local J = {}
local ARRAY = { __name = "jsonArray" }  -- the mark of a table that is an array, even empty

-- UTF-8 as Python's strict decoder takes it: no overlong forms, no surrogates, nothing past U+10FFFF.
local function utf8(s)
  local i, n = 1, #s
  while true do
    i = find(s, "[\128-\255]", i)
    if i == nil then return true end
    local c, len, min = byte(s, i)
    if c >= 0xC2 and c <= 0xDF then len, min = 2, 0x80
    elseif c >= 0xE0 and c <= 0xEF then len, min = 3, 0x800
    elseif c >= 0xF0 and c <= 0xF4 then len, min = 4, 0x10000
    else return false end
    local cp = c % 2 ^ (7 - len)
    for j = i + 1, i + len - 1 do
      local cc = byte(s, j)
      if cc == nil or cc < 0x80 or cc > 0xBF then return false end
      cp = cp * 64 + cc - 0x80
    end
    if cp < min or cp > 0x10FFFF or (cp >= 0xD800 and cp <= 0xDFFF) then return false end
    i = i + len
  end
end

-- The path of the value being walked: `.evidence[2].f`, from the keys leading to it.
local function path_of(keys, depth)
  local parts = {}
  for i = 1, depth do
    local key = keys[i]
    if type(key) == "number" then parts[i] = "[" .. key .. "]"
    elseif find(key, "^[%a_][%w_]*$") then parts[i] = "." .. key
    else parts[i] = "[" .. format("%q", key) .. "]" end
  end
  return concat(parts)
end

-- Raise "value at <path> is <what>"; the path is only built when something is wrong.
local function fail(keys, depth, what)
  if depth == 0 then error("value is " .. what, 0) end
  error("value at " .. path_of(keys, depth) .. " is " .. what, 0)
end

local function push(out, kind, payload)
  local n = out.n
  out[n + 1], out[n + 2], out.n = kind, payload, n + 2
end

-- The array length of `t`, or nil when it is an object; anything JSON cannot say is an error.
local function shape(t, keys, depth)
  local count, top, named = 0, 0, nil
  for k in next, t do
    count = count + 1
    local kind = type(k)
    if kind == "string" then
      if not utf8(k) then fail(keys, depth, "a table with a key that is not valid UTF-8") end
      named = named or k
    elseif kind == "number" and k >= 1 and k < huge and k == floor(k) then
      if k > top then top = k end
    else
      fail(keys, depth, "a table with the " .. kind .. " key " .. tostring(k) ..
                 " (JSON keys are strings; arrays are indexed 1, 2, ...)")
    end
  end
  local marked = getmetatable(t) == ARRAY
  if named then
    if top > 0 or marked then
      fail(keys, depth, "a table that mixes array items and string keys (" .. format("%q", named) .. ")")
    end
    return nil
  end
  if top ~= count then
    fail(keys, depth, format("a sparse array (%d items, highest index %d)", count, top))
  end
  if count > 0 or marked then return count end
  return nil
end

-- An address is written as its text without the port, a netmask as its network.
local TEXT = { ComboAddress = V.ca_text, Netmask = V.netmask_text }

local walk
-- `keys[1..depth]` lead from the value given to jsonEncode to `t`.
local function walk_table(t, out, active, keys, depth)
  local class = V.describe(t)
  if TEXT[class] then return push(out, "s", (TEXT[class](t))) end
  if class ~= "table" and class ~= "GeoIPRecord" then fail(keys, depth, "a " .. class) end
  if active[t] then fail(keys, depth, "a cycle (a table inside itself)") end
  if depth >= MAX_DEPTH then fail(keys, 0, "nested deeper than " .. MAX_DEPTH .. " levels") end
  active[t] = true
  local length = shape(t, keys, depth)
  if length then
    push(out, "a", length)
    for i = 1, length do
      keys[depth + 1] = i
      walk(rawget(t, i), out, active, keys, depth + 1)
    end
  else
    local count = 0
    for _ in next, t do count = count + 1 end
    push(out, "o", count)
    for k, v in next, t do
      out.n = out.n + 1
      out[out.n] = k
      keys[depth + 1] = k
      walk(v, out, active, keys, depth + 1)
    end
  end
  active[t] = nil
end

function walk(value, out, active, keys, depth)
  local kind = type(value)
  if kind == "string" then
    if not utf8(value) then fail(keys, depth, "a string that is not valid UTF-8") end
    push(out, "s", value)
  elseif kind == "number" then
    if value ~= value then fail(keys, depth, "NaN") end
    if value == huge or value == -huge then fail(keys, depth, "infinite") end
    push(out, "n", value)
  elseif kind == "boolean" then
    push(out, "b", value)
  elseif kind == "table" then
    walk_table(value, out, active, keys, depth)
  elseif kind == "nil" then
    push(out, "z", 0)
  else
    fail(keys, depth, "a " .. kind)
  end
end

-- Up to this many tokens go back to Python as one list of results (one crossing); more, as a
-- table Python reads item by item (Lua's C stack takes ~8000 values at most).
local UNPACKED = 6000

-- For Python: (true, tokens...) or (false, table of tokens, count), or (nil, message).
function J.flatten(value)
  local out = { n = 0 }
  local ok, message = pcall(walk, value, out, {}, {}, 0)
  if not ok then return nil, message end
  local n = out.n
  out.n = nil
  if n <= UNPACKED then return true, unpack(out, 1, n) end
  return false, out, n
end

-- The value of the tokens from position i, and the position after them.
local function build(tokens, i, null)
  local kind, payload = tokens[i], tokens[i + 1]
  i = i + 2
  if kind == "a" then
    local t = setmetatable({}, ARRAY)
    for j = 1, payload do t[j], i = build(tokens, i, null) end
    return t, i
  elseif kind == "o" then
    local t = {}
    for _ = 1, payload do
      local key = tokens[i]
      t[key], i = build(tokens, i + 1, null)
    end
    return t, i
  elseif kind == "z" then
    return null, i
  end
  return payload, i
end

function J.build(tokens, null)
  return (build(tokens, 1, null))
end

function J.mark(t)
  if t == nil then t = {} end
  if type(t) ~= "table" then return nil, "expects a table, got " .. V.describe(t) end
  local mt = getmetatable(t)
  if mt ~= nil and mt ~= ARRAY then return nil, "the table already has a metatable" end
  return setmetatable(t, ARRAY), nil
end

return J
"""


def _library(state: "LuaState") -> Any:
    """The Lua half of this module, compiled once per state."""
    lib = state.cache.get("json")
    if lib is None:
        lib = state.cache["json"] = state.lua.execute(
            _LIBRARY, state.values.lib, MAX_DEPTH, name=CHUNK_NAME
        )
    return lib


def _number(value: int | float) -> int | float:
    """Integral Lua numbers (all Lua 5.1 numbers are doubles) are written as integers."""
    if type(value) is float and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


def _from_tokens(read: Callable[[], Any]) -> Any:
    """The Python value of the next tokens of a flattened Lua value."""
    kind, payload = read(), read()
    if kind == "a":
        return [_from_tokens(read) for _ in range(payload)]
    if kind == "o":
        obj = {}
        for _ in range(payload):
            key = read()
            obj[key] = _from_tokens(read)
        return obj
    if kind == "n":
        return _number(payload)
    if kind == "z":
        return None
    return payload


def _to_tokens(value: Any, out: list[Any]) -> None:
    """Append the tokens of a decoded JSON value (the inverse of _from_tokens)."""
    if isinstance(value, dict):
        out += ("o", len(value))
        for key, item in value.items():
            out.append(key)
            _to_tokens(item, out)
    elif isinstance(value, list):
        out += ("a", len(value))
        for item in value:
            _to_tokens(item, out)
    elif value is None:
        out += ("z", 0)
    elif isinstance(value, str):
        out += ("s", value)
    elif isinstance(value, bool):
        out += ("b", value)
    elif isinstance(value, int) and not -(2**63) <= value < 2**63:
        out += ("n", float(value))  # a Lua number is a double
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"a number is too large for a Lua number ({value})")
    else:
        out += ("n", value)


def _reader(flattened: tuple[Any, ...]) -> Callable[[], Any]:
    """Reads the tokens J.flatten gave, whichever way it gave them."""
    if flattened[0] is None:
        raise ValueError(flattened[1])
    if flattened[0] is True:
        return iter(flattened[1:]).__next__
    table, count = flattened[1], flattened[2]
    positions: Iterator[int] = iter(range(1, count + 1))
    return lambda: table[next(positions)]


def encode(lib: Any, value: Any) -> str:
    """The JSON text of a Lua value: sorted keys, no spaces, UTF-8 (not \\u-escaped)."""
    plain = _from_tokens(_reader(lib.flatten(value)))
    return json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _decode_options(options: Any) -> Any:
    """The value that stands for null (nil unless `{null = value}` says otherwise)."""
    if options is None:
        return None
    if not is_table(options):
        raise TypeError(f"options must be a table, got {describe(options)}")
    null = None
    for key, value in options.items():
        if key != "null":
            raise ValueError(f"unknown option {key!r} (known: null)")
        null = value
    return null


def decode(state: "LuaState", lib: Any, text: Any, options: Any = None) -> Any:
    """The Lua value of a JSON text; bad text is an error with its line, column and offset."""
    if not isinstance(text, str):
        raise TypeError(f"expects a string, got {describe(text)}")
    null = _decode_options(options)
    tokens: list[Any] = []
    try:
        _to_tokens(json.loads(text, parse_constant=_refuse_constant), tokens)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON at line {exc.lineno} column {exc.colno} "
                         f"(character {exc.pos + 1}): {exc.msg}") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if len(tokens) == 2 and tokens[0] != "a" and tokens[0] != "o":
        return null if tokens[0] == "z" else tokens[1]  # a scalar needs no table
    return lib.build(state.lua.table_from(tokens), null)  # one crossing for the whole value


@lua_global(
    "jsonEncode", Where.EVERYWHERE, "jsonEncode(value) -> string",
    """The JSON text of `value`, written by Python's `json` module: object keys sorted (the
    same value always gives the same text), no spaces (`{"a":[1,2.5]}`), UTF-8 characters as
    they are (control characters, `"` and `\\` escaped). A table whose keys are exactly
    1..n is an array; any other table is an object with string keys; an empty table is `{}`
    unless marked with `jsonArray`. Integral numbers are written as integers (`3`, not
    `3.0`), others in the shortest form that reads back the same number. A ComboAddress or a
    Netmask is written as its text (`"192.0.2.1"`, `"192.0.2.0/24"`). What JSON cannot hold
    is an error naming where it is: a function, userdata, thread or cdata, NaN or an
    infinity, a table inside itself, a key that is neither a string nor an array index, a
    table mixing both, an array with holes, a string that is not valid UTF-8
    (`jsonEncode(): value at .evidence[2].f is a function`).""",
    example='jsonEncode({login = lt.login, tries = jsonArray({})}) -- {"login":"alice","tries":[]}',
    topic="json",
)
def _json_encode(state: "LuaState") -> Callable[[Any], str]:
    lib = _library(state)
    return lambda value=None: encode(lib, value)


@lua_global(
    "jsonDecode", Where.EVERYWHERE, "jsonDecode(text, {null=value}) -> value",
    """The Lua value of a JSON text, read by Python's `json` module: objects become tables
    with string keys, arrays become tables indexed from 1 and marked with `jsonArray` (so
    `jsonEncode(jsonDecode("[]"))` is `[]` again), numbers, strings and booleans as they are.
    `null` becomes nil (a key that is absent, a hole in an array) unless the option `null`
    gives a value to use instead, e.g. `jsonDecode(text, {null = false})`. `NaN` and
    `Infinity` are refused. Text that is not JSON is an error with its position:
    `jsonDecode(): invalid JSON at line 1 column 9 (character 9): Expecting value`.""",
    example='local alert = jsonDecode(body); infoLog("got", {policy = alert.policy})',
    topic="json",
)
def _json_decode(state: "LuaState") -> Callable[..., Any]:
    lib = _library(state)
    return lambda text=None, options=None: decode(state, lib, text, options)


@lua_global(
    "jsonArray", Where.EVERYWHERE, "jsonArray(table) -> table",
    """Mark `table` (a new empty one when omitted) as a JSON array and return it, so that
    `jsonEncode` writes `[]` when it is empty, and refuses it if it gets string keys. The
    mark is a metatable; a table that already has another metatable is refused.""",
    example='{previous = jsonArray(topValues("country", {login = lt.login}, 5))}',
    topic="json",
)
def _json_array(state: "LuaState") -> Callable[[Any], Any]:
    lib = _library(state)

    def json_array(table: Any = None) -> Any:
        marked, problem = lib.mark(table)
        if marked is None:
            raise ValueError(problem)
        return marked

    return json_array
