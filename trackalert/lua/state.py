"""One Lua interpreter (LuaJIT, Lua 5.1 semantics, as the C++ packages use).

The operator's config and the console are trusted: they keep Lua's standard libraries (existing
configs write files with `io.open`), `ffi` and `debug` included, so they can do anything the daemon's
user can. What must never happen is report data becoming code, or Lua reaching the daemon's Python
internals by the front door: the runtime is built without `python.eval`/builtins, lupa's `python`
module is removed from the globals and from `package.loaded` (so `require("python")` finds
nothing), and no Python object crosses into Lua per call (trackalert.lua.values explains why):
the only Python objects a state holds are the global functions, installed once.
"""

from __future__ import annotations

import enum
import threading
from typing import TYPE_CHECKING, Any, Callable

import lupa.luajit21 as luajit

from trackalert.lua.registry import Where, load_all
from trackalert.lua.values import LuaValues, guarded

if TYPE_CHECKING:
    from trackalert.lua.host import Host

LuaError = luajit.LuaError
LuaSyntaxError = luajit.LuaSyntaxError


class StateKind(enum.Enum):
    CONFIG = Where.CONFIG
    WORKER = Where.WORKER
    CLIENT = Where.CLIENT


def _attribute_filter(obj: Any, name: str, is_setting: bool) -> str:
    if is_setting or name not in getattr(type(obj), "LUA_METHODS", ()):
        raise AttributeError(f"'{type(obj).__name__}' has no accessible member '{name}'")
    return name


# lupa registers its `python` module as a global and in package.loaded; neither may stay.
_REMOVE_PYTHON = """
python = nil
package.loaded.python = nil
package.preload.python = nil
"""


class LuaState:
    """A Lua runtime plus what the config stored in it (report function, endpoints, ...).

    Globals are per state, exactly as in the original: the config file runs once in the config
    state and once in each worker state.
    """

    def __init__(self, kind: StateKind, host: "Host", index: int = 0) -> None:
        self.kind = kind
        self.host = host
        self.index = index
        self.lua = luajit.LuaRuntime(
            register_eval=False,
            register_builtins=False,
            attribute_filter=_attribute_filter,
            unpack_returned_tuples=True,
        )
        self.report_fn: Any = None
        self.endpoints: dict[str, Any] = {}
        self.backgrounds: dict[str, Any] = {}
        #: While report(lt) runs: the seq of lt, so long-term helpers see only earlier events.
        self.as_of_seq: int | None = None
        #: While a background function runs: its schedule name and due time (alert delivery ids).
        self.background_run: tuple[str, float] | None = None
        #: Lua helper functions compiled once per state (see lua.convert).
        self.cache: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.lua.execute(_REMOVE_PYTHON)
        self.values = LuaValues(self)
        self._install_globals()

    def _install_globals(self) -> None:
        g = self.lua.globals()
        # A Lua function around each Python one, raising its errors at the caller's line.
        wrap, wrap_flat = self.values.lib.wrap, self.values.lib.wrap_flat
        for spec in load_all().values():
            if self.kind.value in spec.where:
                impl = spec.factory(self)
                if spec.filter_at is None:
                    g[spec.name] = wrap(guarded(impl, self), spec.name)
                else:
                    g[spec.name] = wrap_flat(guarded(impl, self), guarded(impl.flat, self),  # type: ignore[attr-defined]
                                             spec.name, *spec.filter_at)
            else:
                g[spec.name] = wrap(None, spec.name)  # a silent no-op here, as in the C++ daemon

    @property
    def is_config(self) -> bool:
        return self.kind is StateKind.CONFIG

    def run_file(self, path: str, display_name: str | None = None) -> None:
        """Run a config file; errors carry `file:line` because the chunk is named after it."""
        with open(path, encoding="utf-8") as handle:
            code = handle.read()
        self.execute(code, display_name or path)

    def execute(self, code: str, chunk_name: str = "console") -> tuple[Any, ...]:
        """Run a chunk and return its results as a tuple (empty when it returns nothing)."""
        from trackalert.lua.convert import protected_call

        with self.lock:
            fn = self._load(code, chunk_name)
            result = protected_call(self, fn)
        if not result[0]:
            raise LuaError(str(result[1]))
        values = list(result[1:])
        while values and values[-1] is None:  # `return nil` and no return read the same
            values.pop()
        return tuple(values)

    def _load(self, code: str, chunk_name: str) -> Callable[..., Any]:
        loaded = self.lua.globals().loadstring(code, "@" + chunk_name)
        if isinstance(loaded, tuple):
            raise LuaSyntaxError(loaded[1])
        return loaded

    def table(self, mapping: dict | list | None = None) -> Any:
        """A fresh Lua table (nested dicts/lists/tuples become nested tables)."""
        if mapping is None:
            return self.lua.table()
        return self.lua.table_from(mapping, recursive=True)
