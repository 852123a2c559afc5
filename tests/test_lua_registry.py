"""Every Lua global is declared once, documented, and the generated reference is current."""

from __future__ import annotations

from pathlib import Path

import pytest

from trackalert.lua import docs
from trackalert.lua.host import Host
from trackalert.lua.registry import Where, load_all
from trackalert.lua.state import LuaState, StateKind

REGISTRY = load_all()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_global_is_documented(name: str) -> None:
    spec = REGISTRY[name]
    assert spec.signature.startswith(name), "the signature must name the global"
    assert len(spec.doc) >= 30, f"{name} needs a real docstring"
    assert spec.topic in docs.TOPICS, f"{name} has an unknown topic {spec.topic!r}"


def test_generated_reference_is_up_to_date() -> None:
    path = Path(__file__).parent.parent / "docs" / "lua-api.md"
    assert path.read_text() == docs.render(), "docs/lua-api.md is stale: run `make docs`"


@pytest.mark.parametrize("kind", list(StateKind))
def test_every_global_exists_in_every_kind_of_state(kind: StateKind) -> None:
    state = LuaState(kind, Host())
    g = state.lua.globals()
    for name, spec in REGISTRY.items():
        assert g[name] is not None, f"{name} missing in the {kind.name} state"
        works = kind.value in spec.where
        # a no-op elsewhere: it takes any arguments and returns nothing
        if not works:
            assert state.execute(f"return {name}(1, 2, 3)") == ()


def test_config_only_functions_do_nothing_in_workers() -> None:
    host = Host()
    worker = LuaState(StateKind.WORKER, host)
    worker.execute('addACL("192.0.2.0/24"); setWebserverPassword("x")')
    assert host.settings.acl.entries() == [] and host.settings.password == ""
    config = LuaState(StateKind.CONFIG, host)
    config.execute('addACL("192.0.2.0/24"); setWebserverPassword("x")')
    assert host.settings.acl.entries() == ["192.0.2.0/24"] and host.settings.password == "x"
    assert Where.WORKER in REGISTRY["setReport"].where and Where.CONFIG not in REGISTRY["setReport"].where
