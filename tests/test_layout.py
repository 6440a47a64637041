"""The layers stay as docs/architecture.md draws them: what runs a pass (the code-first
pass, its steps and waits, the state-machine pass) talks to its host through
``workflow.host`` and never imports the engine (``host.EngineHost`` names it for the
type checker only); the import circle engine <-> run that the executor interface
broke must not come back."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parent.parent / "src" / "ledgerflow"

PASS_SIDE = [
    "workflow/run.py",
    "workflow/host.py",
    "workflow/steps.py",
    "workflow/saga.py",
    "workflow/waits.py",
    "workflow/replay.py",
    "statemachine/runtime.py",
]


def _run_time(tree: ast.AST) -> list[ast.AST]:
    """The nodes of ``tree`` that run (those under ``if TYPE_CHECKING:`` only name
    types for the checker: no import happens)."""
    nodes: list[ast.AST] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            stack.extend(node.orelse)
            continue
        nodes.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return nodes


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports when it runs, at any depth of its code, as
    absolute names."""
    package = ".".join(("ledgerflow", *path.relative_to(SRC).parent.parts))
    found: set[str] = set()
    for node in _run_time(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.add(name)
            found |= {f"{name}.{alias.name}" for alias in node.names}
    return found


@pytest.mark.parametrize("module", PASS_SIDE)
def test_a_pass_never_imports_the_engine(module: str) -> None:
    names = imported(SRC / module)
    assert "ledgerflow.workflow.engine" not in names, f"{module} imports the engine"
    assert "ledgerflow.workflow.engine.Engine" not in names


def test_the_check_sees_relative_imports() -> None:
    # The engine itself imports the pass: the scan must see that, or it proves nothing.
    assert "ledgerflow.workflow.run" in imported(SRC / "workflow/executors.py") | imported(
        SRC / "workflow/engine.py"
    )
