"""The package's structure: one-way layers (import-linter contracts in pyproject.toml), and sizes.

The layer contracts list every module (``exhaustive``), so a new module that is not placed, or an
import from a lower layer into a higher one (even inside a function), fails here.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ordercomp"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80

pytest.importorskip("importlinter", reason="the layering check needs import-linter (pip install ordercomp[test])")


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(cwd))
    script = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", script, "--no-cache"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _copy_package(tmp_path: Path) -> Path:
    shutil.copytree(PACKAGE, tmp_path / "ordercomp", ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_layer_contracts_hold():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_planted_upward_import_breaks_the_contract(tmp_path):
    """An import from a low layer into a high one, hidden inside a function, is caught."""
    copy = _copy_package(tmp_path)
    heads = copy / "ordercomp" / "nn" / "heads.py"
    heads.write_text(heads.read_text() + "\n\ndef _planted():\n    from ..search import search_order\n\n"
                     "    return search_order\n")
    proc = _lint(copy)
    assert proc.returncode != 0
    assert "ordercomp.nn.heads -> ordercomp.search" in proc.stdout


def test_unplaced_module_breaks_the_contract(tmp_path):
    copy = _copy_package(tmp_path)
    (copy / "ordercomp" / "extra.py").write_text('"""A module no layer lists."""\n')
    proc = _lint(copy)
    assert proc.returncode != 0
    assert "ordercomp.extra" in proc.stdout


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _is_submodule(name: str) -> bool:
    return (PACKAGE / f"{name}.py").exists() or (PACKAGE / name / "__init__.py").exists()


def test_no_module_imports_the_package_root():
    """``ordercomp/__init__.py`` re-exports every layer, so taking a name from it inside the package
    is an upward import the layer contracts cannot see; submodules are imported by their own name."""
    offenders = []
    for path in _modules():
        parts = path.relative_to(PACKAGE).parts
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                from_root = (node.level == 0 and node.module == "ordercomp") or (
                    node.level == len(parts) and node.module is None)
                if from_root and not all(_is_submodule(a.name) for a in node.names):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_module_and_function_sizes():
    too_long = []
    for path in _modules():
        text = path.read_text()
        lines = text.count("\n") + (not text.endswith("\n"))
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert too_long == []
