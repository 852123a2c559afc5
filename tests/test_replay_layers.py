"""trackalert.replay sits in the daemon's layer (pyproject.toml's import-linter contract), but it
lives in tools/replay/, outside the folder import-linter walks: its imports are checked here
against the same layers."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def layers() -> list[list[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    [contract] = [c for c in config["tool"]["importlinter"]["contracts"] if c["id"] == "layers"]
    return [[name.strip().strip("()") for name in layer.split(":")] for layer in contract["layers"]]


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {name for name in names if name == "trackalert" or name.startswith("trackalert.")}


def layer_of(module: str, stack: list[list[str]]) -> int | None:
    for index, layer in enumerate(stack):
        if any(module == name or module.startswith(name + ".") for name in layer):
            return index
    return None


def above_replay(module: str) -> bool:
    stack = layers()
    own = layer_of("trackalert.replay", stack)
    found = layer_of(module, stack)
    assert own is not None, "trackalert.replay must be in a layer"
    return found is not None and found < own


def test_the_replay_imports_only_its_own_layer_and_those_below() -> None:
    modules = sorted((ROOT / "tools" / "replay").glob("*.py"))
    assert len(modules) >= 5
    for path in modules:
        for module in imported(path):
            assert module == "trackalert" or layer_of(module, layers()) is not None, (path, module)
            assert not above_replay(module), f"{path.name} imports {module}, a layer above it"


def test_the_check_can_fail() -> None:
    assert above_replay("trackalert.cli") and not above_replay("trackalert.daemon")
