"""The house rules of the code layout, checked on the source: small segcore modules, no private
name imported across modules (so flows and tasks use only public segcore names), thin tasks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 400
MAX_TASK_STATEMENTS = 15


def _modules(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def _private_imports(path: Path) -> list[str]:
    """``from X import _y`` of a project module (segcore, tasks, flows) in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("segcore", "tasks",
                                                                                          "flows"):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")
                      and not a.name.startswith("__")]
    return found


def _statements(fn: ast.FunctionDef) -> int:
    """Statements in a function's body, nested ones included, its docstring not."""
    body = fn.body[1:] if fn.body and isinstance(fn.body[0], ast.Expr) and isinstance(
        getattr(fn.body[0], "value", None), ast.Constant) else fn.body
    return sum(isinstance(n, ast.stmt) for s in body for n in ast.walk(s))


@pytest.mark.parametrize("path", _modules("segcore"), ids=lambda p: str(p.relative_to(REPO)))
def test_segcore_modules_stay_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(REPO)} has {lines} lines: split it by concept"


@pytest.mark.parametrize("path", _modules("segcore") + _modules("flows") + _modules("tasks"),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_no_private_name_is_imported_across_modules(path: Path) -> None:
    assert _private_imports(path) == []


@pytest.mark.parametrize("path", _modules("tasks"), ids=lambda p: str(p.relative_to(REPO)))
def test_tasks_stay_thin(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and any(
                "task" in ast.unparse(d).split("(")[0] for d in node.decorator_list):
            assert _statements(node) <= MAX_TASK_STATEMENTS, (
                f"task {node.name} in {path.name} has {_statements(node)} statements; move its logic into segcore")


def test_the_checks_see_what_they_look_for(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from segcore.run.units import _private\n\n"
                   "def f():\n    '''doc'''\n    a = 1\n    if a:\n        b = 2\n    return a\n")
    assert _private_imports(bad) == ["segcore.run.units._private"]
    fn = ast.parse(bad.read_text()).body[1]
    assert _statements(fn) == 4  # a = 1, if, b = 2, return
