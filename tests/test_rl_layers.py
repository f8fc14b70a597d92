"""The RL side's layers: rl_workers needs the client and the generic helpers, never the server.

A trainer node runs the workers against a remote reward server; pulling in `server` would tie it to
the server's code (and its startup) for a few helpers. `foundation` sits below every package.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("foundation", "clients", "server", "rl_workers", "training", "deploy", "bench", "tests")


def imported_packages(package: str) -> dict[str, set[str]]:
    """Every top-level package of ours each module of `package` imports, lazy imports included."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names & set(OURS)
    return found


@pytest.mark.parametrize(
    ("package", "allowed"),
    [
        ("rl_workers", {"rl_workers", "clients", "foundation"}),
        ("clients", {"clients"}),
        ("foundation", {"foundation"}),
    ],
)
def test_each_package_imports_only_the_layers_below_it(package: str, allowed: set[str]) -> None:
    found = imported_packages(package)
    assert found, f"no modules found under {package}"
    wrong = {module: sorted(names - allowed) for module, names in found.items() if names - allowed}
    assert wrong == {}


REFUSE_SERVER = """
import importlib, pkgutil, sys

class RefuseServer:
    def find_spec(self, name, path=None, target=None):
        if name == "server" or name.startswith("server."):
            raise ImportError(f"rl_workers imported {name}")
        return None

sys.meta_path.insert(0, RefuseServer())
import rl_workers
for module in pkgutil.walk_packages(rl_workers.__path__, "rl_workers."):
    importlib.import_module(module.name)
from rl_workers.cli import build_parser
build_parser().format_help()
print("imported", len([m for m in sys.modules if m.startswith("rl_workers")]), "modules")
"""


def test_every_rl_workers_module_imports_without_the_server() -> None:
    """Imports as they run, transitive ones included: a `server` import anywhere below fails."""
    done = subprocess.run([sys.executable, "-c", REFUSE_SERVER], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "imported" in done.stdout
