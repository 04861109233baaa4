"""One module per outside system: each third-party client library is imported by one module of the package.

Every module under monitor/ is parsed with ``ast`` and every import in it is checked (top-level ones and
the lazy ones inside functions, plus ``importlib.import_module("...")``/``__import__("...")`` with a
literal name), so a shortcut around the module that owns a system fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "monitor"

# (what is imported, the modules allowed to import it). A name matches its top-level package.
RULES: list[tuple[str, set[str]]] = [
    ("psycopg", {"monitor/database.py"}),
    ("hyperliquid", {"monitor/exchange.py"}),
    ("eth_*", {"monitor/exchange.py"}),  # eth_account, eth_utils, eth_keys, eth_abi, ...
    ("requests", {"monitor/exchange.py", "monitor/webhooks.py"}),
    ("filelock", {"monitor/lock.py"}),
    ("click", {"monitor/cli.py"}),
    ("dotenv", {"monitor/config.py"}),
]



def imported_names(source: str) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in ``source``, wherever it is."""
    names: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.extend((node.lineno, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                names.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__"):
                names.append((node.lineno, node.args[0].value.split(".")[0]))
    return names


def matches(pattern: str, package: str) -> bool:
    return package.startswith(pattern[:-1]) if pattern.endswith("*") else package == pattern


def violations(module: str, source: str) -> list[str]:
    found = []
    for line, package in imported_names(source):
        for pattern, allowed in RULES:
            if matches(pattern, package) and module not in allowed:
                found.append(f"{module}:{line}: imports {package} (only {', '.join(sorted(allowed))} may)")
    return found


def modules() -> list[str]:
    return sorted(str(path.relative_to(PACKAGE.parent).as_posix()) for path in PACKAGE.rglob("*.py"))


def test_the_walk_sees_the_package() -> None:
    found = modules()
    assert {"monitor/cli.py", "monitor/database.py", "monitor/exchange.py", "monitor/lock.py"} <= set(found)
    assert "monitor/migrations/__init__.py" in found  # subpackages too


@pytest.mark.parametrize("module", modules())
def test_each_outside_system_is_imported_by_its_own_module_only(module: str) -> None:
    source = (PACKAGE.parent / module).read_text(encoding="utf-8")
    assert violations(module, source) == []


@pytest.mark.parametrize("package, owner", [
    ("psycopg", "monitor/database.py"),
    ("hyperliquid", "monitor/exchange.py"),
    ("eth_account", "monitor/exchange.py"),
    ("requests", "monitor/exchange.py"),
    ("requests", "monitor/webhooks.py"),
    ("filelock", "monitor/lock.py"),
    ("click", "monitor/cli.py"),
])
def test_each_owner_really_imports_its_system(package: str, owner: str) -> None:
    """A rule whose owner no longer imports the package is stale (the system moved): say so here."""
    source = (PACKAGE.parent / owner).read_text(encoding="utf-8")
    assert package in {name for _, name in imported_names(source)}


@pytest.mark.parametrize("source, package", [
    ("import psycopg\n", "psycopg"),
    ("from psycopg.types.json import Jsonb\n", "psycopg"),
    ("def f():\n    import requests\n", "requests"),
    ("def f():\n    from eth_account import Account\n", "eth_account"),
    ("import eth_utils as u\n", "eth_utils"),
    ("class C:\n    def m(self):\n        from hyperliquid.info import Info\n", "hyperliquid"),
    ("import importlib\nimportlib.import_module('filelock')\n", "filelock"),
    ("__import__('click')\n", "click"),
])
def test_the_checker_sees_every_kind_of_import(source: str, package: str) -> None:
    found = violations("monitor/planner.py", source)
    assert len(found) == 1 and f"imports {package} " in found[0], found


def test_relative_and_own_imports_are_not_outside_systems() -> None:
    source = "from . import planner\nfrom monitor.database import Database\nimport json\nimport requestsx\n"
    assert violations("monitor/planner.py", source) == []
