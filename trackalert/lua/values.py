"""Addresses, netmasks, netmask groups and GeoIP objects as Lua values, and the one crossing rule.

Why no Python object is handed to Lua per call: lupa (2.4-2.8 at least) keeps the Python objects
it pushes into Lua in a weak-valued table of the Lua registry, filled with `luaL_ref`. When Lua's
collector clears a weak entry before the userdata's `__gc` has run, `luaL_ref` can give that slot to
a new object, and the late `__gc` then frees the slot the new object owns; the next object pushed
takes it over, and re-pushing the second object from Python yields the third one. Under load a
policy saw another report's `lt.remote`, a bound method or an exception instead of the address
(scoder/lupa#293 and #294; the fix proposed in scoder/lupa#296 is not released). Any temporary
Python object pushed into Lua is a hazard: addresses, netmasks, bound methods, GeoIP records,
exceptions, lists and dicts (which lupa pushes as userdata, not tables).

So nothing Python crosses into Lua per call. Every value a policy sees is a Lua value: strings,
numbers, booleans and Lua tables, and the documented objects are Lua tables whose methods live in
Lua metatables built here, once per state. Where a method needs Python (parsing an address,
looking up a GeoIP database) it calls a Python function installed once per state, with plain
strings and numbers, and that function never raises into Lua: it answers (true, values...) or
(false, message), and the Lua side raises the error at the caller's line. The only Python
userdata left in a state are those long-lived functions, pushed once when the state is built and
never pushed again (and recentReports' JSON decoder, pushed once on first use: lua.convert).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable

import lupa.luajit21 as luajit

from trackalert.geoip import GeoIPDB, GeoIPRecord
from trackalert.netaddr import ComboAddress, Netmask, NetmaskGroup, parse_combo

if TYPE_CHECKING:
    from trackalert.lua.state import LuaState

lua_type = luajit.lua_type

#: The chunk name of the library below in error messages and tracebacks.
CHUNK_NAME = "=[trackalert]"

#: Lua classes and their methods: the same names the Python classes declare in LUA_METHODS.
LUA_CLASSES: dict[str, type] = {
    "ComboAddress": ComboAddress,
    "Netmask": Netmask,
    "NetmaskGroup": NetmaskGroup,
    "GeoIPDB": GeoIPDB,
}

_LIBRARY = r"""
local bridge, CHUNK = ...
local type, tostring, error, pcall, xpcall = type, tostring, error, pcall, xpcall
local setmetatable, getmetatable, pairs, ipairs = setmetatable, getmetatable, pairs, ipairs
local sub, find, floor, tonumber, sort, remove, concat =
  string.sub, string.find, math.floor, tonumber, table.sort, table.remove, table.concat
local getinfo, traceback = debug.getinfo, debug.traceback
local V = {}

-- Raise `message` at the first line of the operator's code on the stack, skipping this library's
-- own frames, so an error in a global or a method names the line that called it.
local function fail(message)
  for level = 3, 40 do
    local info = getinfo(level, "Sl")
    if info == nil then break end
    if info.source ~= CHUNK and info.currentline > 0 then
      error(info.short_src .. ":" .. info.currentline .. ": " .. message, 0)
    end
  end
  error(message, 0)
end

-- A global: its Python side answers (true, values...) or (false, message) (values.guarded).
-- The pcall is for what lupa itself may raise before our code runs (a non-UTF-8 string).
local function finish(name, called, ok, ...)
  if called and ok then return ... end
  fail(name .. "(): " .. tostring(called and (...) or ok))
end
local function noop() end
function V.wrap(impl, name)
  if impl == nil then return noop end
  return function(...) return finish(name, pcall(impl, ...)) end
end

-- A filter table's pairs, flat, in next() order, addresses and netmasks as their text (what the
-- filter takes): (true, key1, value1, ...), so that a helper crosses into Python once, with
-- plain values. (false, t) for anything else (not a table, a key that is not a string, a value
-- that is neither a string, a number, a boolean nor one of those objects, more than FLAT_MAX
-- pairs): Python then reads it item by item, which raises the errors it always did.
local FLAT_MAX, flat_pairs, unpack, next, select = 16, {}, unpack, next, select
local CA, NM  -- the address and netmask classes, below
local function flat(t)
  if type(t) ~= "table" then return false, t end
  local n = 0
  for k, v in next, t do
    if n >= 2 * FLAT_MAX or type(k) ~= "string" then return false, t end
    local kind = type(v)
    if kind == "table" then
      local mt = getmetatable(v)
      if mt == CA then v = v._ip elseif mt == NM then v = v._net else return false, t end
    elseif kind ~= "string" and kind ~= "number" and kind ~= "boolean" then
      return false, t
    end
    flat_pairs[n + 1], flat_pairs[n + 2] = k, v
    n = n + 2
  end
  return true, unpack(flat_pairs, 1, n)
end
V.flat = flat

-- A helper taking a filter: called with exactly `arity` arguments, the filter (argument `at`)
-- crosses flat, after the other arguments: fast(others..., flat(filter)); any other call goes
-- to `impl` as it was made (its own errors, word for word). Arities 3 and 6 with the filter
-- first also take one argument less (the last, optional, crosses as nil).
function V.wrap_flat(impl, fast, name, arity, at)
  local slow = V.wrap(impl, name)
  if arity == 1 then
    return function(...)
      if select("#", ...) ~= 1 then return slow(...) end
      return finish(name, pcall(fast, flat((...))))
    end
  elseif arity == 2 and at == 1 then
    return function(...)
      if select("#", ...) ~= 2 then return slow(...) end
      local f, b = ...
      return finish(name, pcall(fast, b, flat(f)))
    end
  elseif arity == 3 and at == 1 then  -- (filter, b [, c]): the last argument may be left out
    return function(...)
      local count = select("#", ...)
      if count ~= 2 and count ~= 3 then return slow(...) end
      local f, b, c = ...
      return finish(name, pcall(fast, b, c, flat(f)))
    end
  elseif arity == 6 and at == 1 then  -- (filter, b, c, d, e [, g]): the last may be left out
    return function(...)
      local count = select("#", ...)
      if count ~= 5 and count ~= 6 then return slow(...) end
      local f, b, c, d, e, g = ...
      return finish(name, pcall(fast, b, c, d, e, g, flat(f)))
    end
  elseif arity == 2 then
    return function(...)
      if select("#", ...) ~= 2 then return slow(...) end
      local a, f = ...
      return finish(name, pcall(fast, a, flat(f)))
    end
  end
  return function(...)
    if select("#", ...) ~= 3 then return slow(...) end
    local a, f, b = ...
    return finish(name, pcall(fast, a, b, flat(f)))
  end
end

-- Run fn(...) for Python: (true, results...) or (false, message with traceback). A message
-- without a line of its own (a tail call, an error value that is not a string) is given the
-- function that was run.
local current
local function handler(e)
  local message = type(e) == "string" and e or tostring(e)
  if type(current) == "function" and not find(message, "^[^\n:]-:%d+: ") then
    local info = getinfo(current, "S")
    if info.linedefined > 0 then
      message = "in function <" .. info.short_src .. ":" .. info.linedefined .. ">: " .. message
    else
      message = info.short_src .. ": " .. message
    end
  end
  return traceback(message, 2)
end
local function restore(outer, ...)
  current = outer
  return ...
end
function V.call(fn, ...)
  local outer = current
  current = fn
  return restore(outer, xpcall(fn, handler, ...))
end

-- A class whose objects refuse unknown members, as the Python objects' attribute filter did:
-- a typo (`lt.remote:toString()`) is an error naming the class, not a silent nil.
local function class(name)
  local function refuse(_, key)
    fail("'" .. name .. "' has no accessible member '" .. tostring(key) .. "'")
  end
  local methods = setmetatable({}, { __index = refuse })
  return { __index = methods, __newindex = refuse, name = name }, methods
end

local function describe(value)
  local mt = getmetatable(value)
  if type(mt) == "table" and V.classes[mt.name] == mt then return mt.name end
  return type(value)
end
V.describe = describe

-- The text of one of the classes below (its tostring method, else its __tostring), nil for any other value: lets
-- the console show an address inside a table without running an operator's metamethods.
function V.text(value)
  local mt = getmetatable(value)
  if type(mt) ~= "table" or V.classes[mt.name] ~= mt then return nil end
  local plain = rawget(mt.__index, "tostring")  -- an address without its port
  if plain then return plain(value) end
  if mt.__tostring then return mt.__tostring(value) end
end

-- A method called with `.` instead of `:` gets no object; say so instead of failing inside.
local function need(mt, self, method)
  if getmetatable(self) ~= mt then
    fail(mt.name .. ":" .. method .. "() must be called on a " .. mt.name ..
         " (write obj:" .. method .. "(...)), got " .. describe(self))
  end
end

-- The Python side of a method answers (true, values...) or (false, message).
local function answer(label, ok, ...)
  if ok then return ... end
  fail(label .. "(): " .. tostring((...)))
end

-- The key of the first `bits` bits of an address given as hex digits (prefix_key in Python
-- computes the same for netmasks).
local function prefix(hex, bits)
  local n = floor(bits / 4)
  local r = bits - n * 4
  if r == 0 then return sub(hex, 1, n) end
  return sub(hex, 1, n) .. floor(tonumber(sub(hex, n + 1, n + 1), 16) / 2 ^ (4 - r))
end

----------------------------------------------------------------------------- ComboAddress
local CA_M
CA, CA_M = class("ComboAddress")

function V.ca(ip, port, hex, version, mapped)
  return setmetatable({ _ip = ip, _port = port, _hex = hex, _v = version, _mapped = mapped }, CA)
end

function CA_M.tostring(self) need(CA, self, "tostring"); return self._ip end
function CA_M.isIPv4(self) need(CA, self, "isIPv4"); return self._v == 4 end
function CA_M.isIPv6(self) need(CA, self, "isIPv6"); return self._v == 6 end
function CA_M.isMappedIPv4(self) need(CA, self, "isMappedIPv4"); return self._mapped end
function CA.__tostring(self)
  if self._v == 6 then return "[" .. self._ip .. "]:" .. self._port end
  return self._ip .. ":" .. self._port
end

-- The hex digits and family of a ComboAddress argument of `method`.
local function address_digits(method, ca)
  if getmetatable(ca) ~= CA then
    fail(method .. " expects a ComboAddress, got " .. describe(ca))
  end
  return ca._hex, ca._v
end

-- The address text of a ComboAddress, nil for anything else (used from Python).
function V.ca_text(value)
  if getmetatable(value) == CA then return value._ip, value._port end
end

-------------------------------------------------------------------------------- Netmask
local NM_M
NM, NM_M = class("Netmask")

function V.netmask(version, bits, key, network, text)
  return setmetatable({ _v = version, _bits = bits, _key = key, _net = network, _text = text }, NM)
end

function NM_M.toStringNetwork(self) need(NM, self, "toStringNetwork"); return self._net end

-- An IPv4 netmask also matches the IPv4-mapped form of its addresses (as trackalert.netaddr).
function NM_M.match(self, ca)
  need(NM, self, "match")
  local hex, version = address_digits("Netmask:match", ca)
  if version == 6 and self._v == 4 and ca._mapped then hex, version = sub(hex, 25), 4 end
  return version == self._v and prefix(hex, self._bits) == self._key
end
function NM.__tostring(self) return self._text end

-- The network text of a Netmask, nil for anything else (used from Python).
function V.netmask_text(value)
  if getmetatable(value) == NM then return value._net end
end

--------------------------------------------------------------------------- NetmaskGroup
local NG, NG_M = class("NetmaskGroup")

function V.group()
  return setmetatable({ _nets = { [4] = {}, [6] = {} }, _order = { [4] = {}, [6] = {} },
                        _entries = {} }, NG)
end

local function descending(a, b) return a > b end

function NG_M.addMask(self, text)
  need(NG, self, "addMask")
  if type(text) ~= "string" then
    fail("NetmaskGroup:addMask(): addMask expects a string, got " .. describe(text))
  end
  local allow = sub(text, 1, 1) ~= "!"
  local version, bits, key, shown = answer("NetmaskGroup:addMask", bridge.mask(allow and text or sub(text, 2)))
  local by_bits = self._nets[version]
  local nets = by_bits[bits]
  if nets == nil then
    nets = {}
    by_bits[bits] = nets
    local order = self._order[version]
    order[#order + 1] = bits
    sort(order, descending)
  end
  nets[key] = allow
  -- re-adding a network replaces it and moves it last, as in trackalert.netaddr
  local id = version .. "/" .. bits .. "/" .. key
  local entries = self._entries
  for i = 1, #entries do
    if entries[i].id == id then remove(entries, i); break end
  end
  entries[#entries + 1] = { id = id, text = allow and shown or "!" .. shown }
end

local function lookup(self, version, hex)
  local nets = self._nets[version]
  local order = self._order[version]
  for i = 1, #order do
    local bits = order[i]
    local allow = nets[bits][prefix(hex, bits)]
    if allow ~= nil then return allow end
  end
end

-- Longest prefix wins; an IPv4-mapped address is matched against the IPv4 entries first.
function NG_M.match(self, ca)
  need(NG, self, "match")
  local hex, version = address_digits("NetmaskGroup:match", ca)
  if version == 6 and ca._mapped then
    local allow = lookup(self, 4, sub(hex, 25))
    if allow ~= nil then return allow end
  end
  return lookup(self, version, hex) or false
end

function NG_M.size(self) need(NG, self, "size"); return #self._entries end

function NG_M.clear(self)
  need(NG, self, "clear")
  self._nets, self._order, self._entries = { [4] = {}, [6] = {} }, { [4] = {}, [6] = {} }, {}
end

function NG.__tostring(self)
  local texts = {}
  for i, entry in ipairs(self._entries) do texts[i] = "'" .. entry.text .. "'" end
  return "NetmaskGroup([" .. concat(texts, ", ") .. "])"
end

------------------------------------------------------------------------------- GeoIP2 DB
local DB, DB_M = class("GeoIPDB")
local REC = class("GeoIPRecord")

function V.geoip_db(name) return setmetatable({ _name = name }, DB) end

function V.geoip_record(country_code, country_name, region, city, postal_code, continent_code,
                        latitude, longitude)
  return setmetatable({ country_code = country_code, country_name = country_name,
                        region = region, city = city, postal_code = postal_code,
                        continent_code = continent_code, latitude = latitude,
                        longitude = longitude }, REC)
end
function REC.__tostring(self) return "GeoIPRecord(" .. self.country_code .. ", " .. self.city .. ")" end

local function address_text(ca)
  if getmetatable(ca) == CA then return ca._ip end
  return ca  -- a plain address string is accepted too; anything else is refused in Python
end

for _, method in ipairs({ "lookupCountry", "lookupISP", "lookupCity", "lookupStringValue",
                          "lookupUIntValue", "lookupBoolValue", "lookupDoubleValue" }) do
  local label = "GeoIPDB:" .. method
  DB_M[method] = function(self, ca, path)
    need(DB, self, method)
    return answer(label, bridge.geoip(self._name, method, address_text(ca), path))
  end
end
function DB.__tostring(self) return "GeoIPDB(" .. tostring(self._name or "") .. ")" end

V.classes = { ComboAddress = CA, Netmask = NM, NetmaskGroup = NG, GeoIPDB = DB,
              GeoIPRecord = REC }

-- The methods of each class, for the test that compares them with LUA_METHODS.
function V.methods(name)
  local names = {}
  for method in pairs(V.classes[name].__index) do names[#names + 1] = method end
  sort(names)
  return concat(names, " ")
end

return V
"""


def guarded(fn: Callable[..., Any], state: "LuaState") -> Callable[..., tuple[Any, ...]]:
    """`fn` as Lua may call it: (True, values...) on success, (False, message) on an error.

    A Python exception must never cross into Lua: lupa would push it as a userdata (see the
    module docstring). The Lua side raises the message itself, at the caller's line."""

    def call(*args: Any) -> tuple[Any, ...]:
        try:
            result = fn(*args)
            if type(result) is tuple:
                return (True, *[state.values.to_lua(value) for value in result])
            return True, state.values.to_lua(result)
        except Exception as exc:  # the crash boundary of every Python function Lua calls
            return False, str(exc) or type(exc).__name__

    return call


@functools.lru_cache(maxsize=65536)
def address_fields(text: str) -> tuple[str, int, str, int, bool]:
    """The Lua ComboAddress of a report's `remote`, parsed once per distinct address."""
    return combo_fields(parse_combo(text))


def combo_fields(ca: ComboAddress) -> tuple[str, int, str, int, bool]:
    """What the Lua ComboAddress holds: its text, port, hex digits, family and mapped flag."""
    return ca.tostring(), ca.port, ca.ip.packed.hex(), ca.ip.version, ca.isMappedIPv4()


@functools.lru_cache(maxsize=65536)
def _netmask_around(ip: str, port: int, bits: int) -> tuple[int, int, str, str, str]:
    """`netmask_fields` of newNetmaskFromCA(ca, bits) for the address `ip`:`port`: policies ask
    the same few networks of every report's address (password_spray's /24), and parsing the
    address, masking it and printing the network cost more than the policy's own work."""
    address = parse_combo(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
    return netmask_fields(Netmask.from_address(address, bits))


def prefix_key(hex_digits: str, bits: int) -> str:
    """The key of the first `bits` bits of an address; the same function as `prefix` in Lua."""
    full, rest = divmod(bits, 4)
    if rest == 0:
        return hex_digits[:full]
    return hex_digits[:full] + str(int(hex_digits[full], 16) >> (4 - rest))


def netmask_fields(mask: Netmask) -> tuple[int, int, str, str, str]:
    """What the Lua Netmask holds: family (0: the empty netmask), bits, key and its two texts."""
    if mask.address is None:
        return 0, 0, "", "", ""
    key = prefix_key(mask.address.ip.packed.hex(), mask.bits)
    return mask.version, mask.bits, key, mask.toStringNetwork(), str(mask)


class LuaValues:
    """The Lua library of one state and the conversions of Python values into Lua values."""

    def __init__(self, state: "LuaState") -> None:
        self._state = state
        bridge = state.lua.table_from({
            "mask": guarded(self._mask, state),
            "geoip": guarded(self._geoip, state),
        })
        self.lib = state.lua.execute(_LIBRARY, bridge, CHUNK_NAME, name=CHUNK_NAME)
        self._new_ca = self.lib.ca
        self.call = self.lib.call
        self._new_netmask = self.lib.netmask
        self._ca_text = self.lib.ca_text
        self._netmask_text = self.lib.netmask_text
        self.describe = self.lib.describe
        self.text_of: Callable[[Any], str | None] = self.lib.text
        self._converters: dict[type, Callable[[Any], Any]] = {
            ComboAddress: self.combo,
            Netmask: self.netmask,
            NetmaskGroup: self._group,
            GeoIPRecord: self._record,
            GeoIPDB: self._db,
        }

    # -- Python -> Lua ---------------------------------------------------------------------

    def to_lua(self, value: Any) -> Any:
        """`value` as a Lua value; a type that has none is a TypeError, never a userdata."""
        kind = type(value)
        if value is None or kind is bool or kind is str or kind is float or kind is bytes:
            return value
        if kind is int:
            return value if -(2**63) <= value < 2**63 else float(value)
        if lua_type(value) is not None:  # already a Lua object (table, function)
            return value
        if kind is list or kind is dict or kind is tuple:
            return self._state.lua.table_from(self._plain(value), recursive=True)
        convert = self._converters.get(kind)
        if convert is None:
            raise TypeError(f"a Python {kind.__name__} cannot be passed to Lua")
        return convert(value)

    def _plain(self, value: Any) -> Any:
        """Nested lists/dicts with every leaf a Lua value, for one recursive `table_from`."""
        kind = type(value)
        if kind is dict:
            return {key: self._plain(item) for key, item in value.items()}
        if kind is list or kind is tuple:
            return [self._plain(item) for item in value]
        return self.to_lua(value)

    def combo(self, ca: ComboAddress) -> Any:
        return self._new_ca(*combo_fields(ca))

    def netmask(self, mask: Netmask) -> Any:
        return self._new_netmask(*netmask_fields(mask))

    def _group(self, group: NetmaskGroup) -> Any:
        lua_group = self.lib.group()
        add = lua_group.addMask
        for text in group.entries():
            add(lua_group, text)
        return lua_group

    def _record(self, record: GeoIPRecord) -> Any:
        return self.lib.geoip_record(
            record.country_code, record.country_name, record.region, record.city,
            record.postal_code, record.continent_code, record.latitude, record.longitude,
        )

    def _db(self, db: GeoIPDB) -> Any:
        return self.lib.geoip_db(db.name or False)

    # -- Lua -> Python ---------------------------------------------------------------------

    def address(self, value: Any) -> ComboAddress | None:
        """The ComboAddress a Lua ComboAddress stands for; None for any other value."""
        if lua_type(value) != "table":
            return None
        found = self._ca_text(value)
        if not isinstance(found, tuple):
            return None
        ip, port = found
        return parse_combo(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")

    def netmask_around(self, value: Any, bits: Any) -> Any:
        """newNetmaskFromCA: the Lua Netmask of the `bits`-bit network around a Lua
        ComboAddress (memoized per address and bits: `_netmask_around`)."""
        found = self._ca_text(value) if lua_type(value) == "table" else None
        if not isinstance(found, tuple):
            raise TypeError("first argument must be a ComboAddress")
        return self._new_netmask(*_netmask_around(found[0], found[1], int(bits)))

    def plain(self, value: Any) -> Any:
        """A Lua ComboAddress or Netmask as its text (filters take text); anything else as is."""
        if lua_type(value) != "table":
            return value
        found = self._ca_text(value)
        if isinstance(found, tuple):
            return found[0]
        network = self._netmask_text(value)
        return value if network is None else network

    # -- the bridge: called from the Lua methods, with plain values ------------------------

    def _mask(self, text: Any) -> tuple[int, int, str, str]:
        version, bits, key, _network, shown = netmask_fields(Netmask.parse(text))
        return version, bits, key, shown

    def _geoip(self, name: Any, method: str, address: Any, path: Any = None) -> Any:
        if method not in GeoIPDB.LUA_METHODS:
            raise ValueError(f"unknown GeoIPDB method {method!r}")
        db = (self._state.host.geoip.get(name) if name else None) or GeoIPDB()
        lookup = getattr(db, method)
        if method in ("lookupCountry", "lookupISP", "lookupCity"):
            return lookup(address)
        from trackalert.lua.convert import string_list  # convert imports this module

        return lookup(address, string_list(path, "path") if lua_type(path) == "table" else path)
