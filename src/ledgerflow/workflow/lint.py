"""A determinism lint for workflow bodies: no sandbox, just a look at the code.

Workflow code is replayed, so it must take the same path every time. Reading the
wall clock, drawing random numbers or doing I/O directly would make replay diverge;
the context offers deterministic replacements. This flags the usual suspects by
their dotted names in the body's syntax tree.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["LintFinding", "lint_workflow"]

ALLOW = "# ledgerflow: allow"

_CALLS = {
    "datetime.now": "reads the wall clock: use ctx.now()",
    "datetime.utcnow": "reads the wall clock: use ctx.now()",
    "datetime.today": "reads the wall clock: use ctx.now()",
    "datetime.datetime.now": "reads the wall clock: use ctx.now()",
    "datetime.datetime.utcnow": "reads the wall clock: use ctx.now()",
    "date.today": "reads the wall clock: use ctx.now()",
    "time.time": "reads the wall clock: use ctx.now()",
    "time.time_ns": "reads the wall clock: use ctx.now()",
    "time.monotonic": "reads a clock: use ctx.now()",
    "time.perf_counter": "reads a clock: use ctx.now()",
    "time.sleep": "blocks the engine: use ctx.sleep()",
    "asyncio.sleep": "is not durable: use ctx.sleep()",
    "uuid.uuid1": "is random: use ctx.uuid()",
    "uuid.uuid4": "is random: use ctx.uuid()",
    "os.urandom": "is random: use ctx.random()",
    "os.getenv": "reads the environment: pass it in the input or read it in a step",
    "open": "does I/O: do it in a step",
    "input": "does I/O: do it in a step",
}
_MODULES = {
    "random": "is random: use ctx.random()",
    "secrets": "is random: use ctx.random()",
    "requests": "does I/O: do it in a step",
    "httpx": "does I/O: do it in a step",
    "urllib": "does I/O: do it in a step",
    "socket": "does I/O: do it in a step",
    "subprocess": "does I/O: do it in a step",
    "aiohttp": "does I/O: do it in a step",
}
_ATTRIBUTES = {"os.environ": "reads the environment: pass it in the input"}


@dataclass(frozen=True, slots=True)
class LintFinding:
    line: int
    what: str
    why: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.what} {self.why}"


def _dotted(node: ast.AST) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def lint_workflow(fn: Callable[..., Any]) -> list[LintFinding]:
    """Findings in ``fn``'s body; empty when the source is unavailable."""
    try:
        lines, first = inspect.getsourcelines(fn)
    except (OSError, TypeError):
        return []
    source = textwrap.dedent("".join(lines))
    tree = ast.parse(source)
    text = source.splitlines()
    findings: list[LintFinding] = []
    for node in ast.walk(tree):
        what: str | None = None
        why: str | None = None
        if isinstance(node, ast.Call):
            what = _dotted(node.func)
            if what is not None:
                why = _CALLS.get(what) or _MODULES.get(what.split(".", 1)[0])
        elif isinstance(node, ast.Attribute) and not isinstance(node.ctx, ast.Del):
            what = _dotted(node)
            why = _ATTRIBUTES.get(what or "")
        if what is None or why is None:
            continue
        lineno = getattr(node, "lineno", 1)
        if text[lineno - 1].rstrip().endswith(ALLOW):
            continue
        findings.append(
            LintFinding(
                first + lineno - 1, what + ("()" if isinstance(node, ast.Call) else ""), why
            )
        )
    findings.sort(key=lambda f: f.line)
    return findings
