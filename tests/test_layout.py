"""The product package stays free of test support: the simulator and the scratch PostgreSQL live in testkit/."""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ROOT / "monitor"
TEST_SUPPORT = ("hlsim", "pm_testkit", "tests")


def product_modules() -> list[Path]:
    modules = sorted(PRODUCT.rglob("*.py"))
    assert modules, f"no modules under {PRODUCT}"
    return modules


def imported_names(tree: ast.AST) -> list[str]:
    """Every module an import statement names (``import a.b`` -> a.b; ``from a import b`` -> a, a.b)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute))
              and getattr(node.func, "id", getattr(node.func, "attr", None)) in ("import_module", "__import__")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.append(node.args[0].value)
    return names


@pytest.mark.parametrize("path", product_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_product_module_imports_no_test_support(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = [name for name in imported_names(tree) if name.split(".")[0] in TEST_SUPPORT]
    assert not bad, f"{path.relative_to(ROOT)} imports test support: {bad}"


@pytest.mark.parametrize("path", product_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_product_module_mentions_no_tests_path(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    bad = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
           if "tests/" in line or "tests\\" in line or "monitor.simulator" in line]
    assert not bad, f"{path.relative_to(ROOT)} mentions test paths: {bad}"


def test_product_package_has_no_simulator() -> None:
    assert not (PRODUCT / "simulator.py").exists()
    found = []
    for path in product_modules():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found += [f"{path.relative_to(ROOT)}:{node.lineno} {node.name}" for node in ast.walk(tree)
                  if isinstance(node, ast.ClassDef) and ("Simulator" in node.name or node.name == "ScratchServer")]
    assert not found, f"test support classes in monitor/: {found}"


def test_product_wheel_holds_only_monitor() -> None:
    """setup.cfg finds monitor and its subpackages only: hlsim and pm_testkit stay out of the product wheel."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    include = [p.strip() for p in cfg["options.packages.find"]["include"].replace("\n", ",").split(",") if p.strip()]
    assert include == ["monitor", "monitor.*"]
    assert "position-monitor-testkit" in cfg["options.extras_require"]["test"].split()


def test_simulator_fixtures_are_package_data() -> None:
    from hlsim import fixtures

    assert not (ROOT / "tests" / "fixtures").exists(), "the recorded answers have one home: testkit/hlsim/fixtures"
    for name in fixtures.NAMES:
        assert "response" in fixtures.load(name), name
