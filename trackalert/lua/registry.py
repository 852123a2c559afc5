"""The one registry of every Lua global trackalert defines.

Each global is declared once with where it works, its signature and its documentation. The Lua
states are populated from here, `docs/lua-api.md` is generated from here and the console completes
from here, so a global cannot exist without documentation (a test enforces that).
"""

from __future__ import annotations

import enum
import importlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from trackalert.lua.state import LuaState


class Where(enum.Flag):
    """Where a global does something; elsewhere it is a silent no-op (as in the C++ daemon)."""

    CONFIG = enum.auto()  # the config state (and the console)
    WORKER = enum.auto()  # worker states (report, background and custom functions)
    CLIENT = enum.auto()  # the config as run by a console client (-c/-e)
    EVERYWHERE = CONFIG | WORKER | CLIENT


#: A factory receives the state it is installed in and returns the Python callable Lua will see.
Factory = Callable[["LuaState"], Callable[..., Any]]


@dataclass(frozen=True)
class LuaGlobal:
    name: str
    where: Where
    signature: str
    doc: str
    factory: Factory
    example: str = ""
    topic: str = "general"
    #: (arity, position) of a filter argument that crosses flat (values.V.wrap_flat): the
    #: factory's callable then has a `flat` attribute taking (other arguments..., flat pairs).
    filter_at: tuple[int, int] | None = None


REGISTRY: dict[str, LuaGlobal] = {}


def lua_global(
    name: str,
    where: Where,
    signature: str,
    doc: str,
    example: str = "",
    topic: str = "general",
    filter_at: tuple[int, int] | None = None,
) -> Callable[[Factory], Factory]:
    """Declare a Lua global; the decorated function builds its implementation for one state."""

    def register(factory: Factory) -> Factory:
        if name in REGISTRY:
            raise ValueError(f"Lua global {name} declared twice")
        REGISTRY[name] = LuaGlobal(name, where, signature, doc.strip(), factory, example, topic,
                                   filter_at)
        return factory

    return register


def load_all() -> dict[str, LuaGlobal]:
    """Import every `trackalert/lua/api_*.py` module, so the registry is complete.

    Discovered rather than listed: a new module of globals cannot be forgotten here.
    """
    import trackalert.lua as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name.startswith("api_"):
            importlib.import_module(f"trackalert.lua.{module.name}")
    return REGISTRY
