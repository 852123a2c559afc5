"""DESIGN §10: dependencies point one way. The layers are written down once, in pyproject.toml
(`[tool.importlinter]`), and checked here with import-linter on every test run."""

from __future__ import annotations

import os
import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import trackalert

ROOT = Path(__file__).resolve().parent.parent
LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"


def layer_modules() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    [contract] = [c for c in config["tool"]["importlinter"]["contracts"] if c["id"] == "layers"]
    return [name.strip() for layer in contract["layers"] for name in layer.split(":")]


def lint(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-c", LINT], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_package_keeps_its_layers() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_a_back_import_breaks_the_contract(tmp_path: Path) -> None:
    """The check can fail: the report model (bottom layer) importing the daemon is caught."""
    shutil.copytree(ROOT / "trackalert", tmp_path / "trackalert",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    report = tmp_path / "trackalert" / "report.py"
    report.write_text(report.read_text() + "\nfrom trackalert import daemon  # a back-import\n")
    result = lint(tmp_path, pythonpath=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "trackalert.report is not allowed to import trackalert.daemon" in result.stdout


def test_every_module_belongs_to_a_layer() -> None:
    """A new module outside every layer would escape the check: name its layer in pyproject."""
    layers = layer_modules()
    modules = [m.name for m in pkgutil.walk_packages(trackalert.__path__, "trackalert.")]
    # trackalert.migrations lives in the top-level migrations/ folder (mapped into the package),
    # which import-linter's graph of the trackalert folder does not see.
    unplaced = [m for m in modules
                if not m.startswith("trackalert.migrations")
                and not any(m == layer or m.startswith(layer + ".") for layer in layers)]
    container_packages = {"trackalert.console"}  # its modules are placed one by one
    assert [m for m in unplaced if m not in container_packages] == []
