"""A determinism lint for workflow bodies: no sandbox, just a look at the code.

Workflow code is replayed, so it must take the same path every time. Reading the
wall clock, drawing random numbers, racing commands against real time or doing I/O
directly would make replay diverge; the context offers deterministic replacements.

The lint reads the body's syntax tree and resolves each name the way Python will at
run time: names bound in the body (parameters, assignments, imports inside the
function) first, then the closure, the module's globals and the builtins. So
``import random as r; r.random()``, ``from asyncio import wait`` and
``from datetime import datetime; datetime.now()`` are caught under their real
names, while a local variable that happens to be called ``random`` is not. Only the
body is checked, not the functions it calls: helpers are trusted.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

__all__ = ["LintFinding", "lint_workflow"]

ALLOW = "# ledgerflow: allow"

_CLOCK = "reads the wall clock: use ctx.now()"
_TICK = "reads a clock, which moves on between replays: use ctx.now()"
_SLEEP = "is not durable: use ctx.sleep()"
_RACE = (
    "races commands against real time, which replay cannot repeat: use "
    "ctx.wait_for_signal(..., timeout=...) or ctx.sleep(), and asyncio.gather to run "
    "commands together"
)
_TASK = (
    "starts a task the engine does not order: await ctx commands directly, or together "
    "with asyncio.gather"
)
_THREAD = "runs code outside the replayed body: do the work in ctx.step (sync steps run in threads)"
_LOOP = "reaches into the event loop: use ctx.sleep() for time and ctx.step for work"
_RANDOM = "is random: use ctx.random()"
_UUID = "is random: use ctx.uuid()"
_IO = "does I/O: do it in ctx.step"
_ENV = "reads the environment: pass it in the input or read it in ctx.step"

# Calls flagged by their resolved dotted name. A few short spellings ("date.today")
# stay for names the lint cannot resolve, such as a module imported further down the
# file than the workflow: the decorator runs before that import does.
_CALLS = {
    "datetime.datetime.now": _CLOCK,
    "datetime.datetime.utcnow": _CLOCK,
    "datetime.datetime.today": _CLOCK,
    "datetime.date.today": _CLOCK,
    "datetime.now": _CLOCK,
    "datetime.utcnow": _CLOCK,
    "datetime.today": _CLOCK,
    "date.today": _CLOCK,
    "time.time": _CLOCK,
    "time.time_ns": _CLOCK,
    "time.monotonic": _TICK,
    "time.monotonic_ns": _TICK,
    "time.perf_counter": _TICK,
    "time.perf_counter_ns": _TICK,
    "time.process_time": _TICK,
    "time.sleep": "blocks the engine and is not durable: use ctx.sleep()",
    "asyncio.sleep": _SLEEP,
    "asyncio.wait": _RACE,
    "asyncio.wait_for": _RACE,
    "asyncio.as_completed": _RACE,
    "asyncio.timeout": _RACE,
    "asyncio.timeout_at": _RACE,
    "asyncio.create_task": _TASK,
    "asyncio.ensure_future": _TASK,
    "asyncio.to_thread": _THREAD,
    "asyncio.get_running_loop": _LOOP,
    "asyncio.get_event_loop": _LOOP,
    "uuid.uuid1": _UUID,
    "uuid.uuid4": _UUID,
    "os.urandom": _RANDOM,
    "os.getrandom": _RANDOM,
    "os.getenv": _ENV,
    "os.system": _IO,
    "os.popen": _IO,
    "open": _IO,
    "input": _IO,
}
# These read the clock only when not given a time: time.strftime(fmt) reads it,
# time.strftime(fmt, t) does not. The number is how many arguments still read it.
_CALLS_WITHOUT_TIME = {
    "time.localtime": 0,
    "time.gmtime": 0,
    "time.ctime": 0,
    "time.asctime": 0,
    "time.strftime": 1,
}
# Any call into these modules (a dotted prefix, matched on whole segments).
_MODULES = {
    "random": _RANDOM,
    "secrets": _RANDOM,
    "threading": _THREAD,
    "concurrent.futures": _THREAD,
    "multiprocessing": _THREAD,
    "requests": _IO,
    "httpx": _IO,
    "aiohttp": _IO,
    "urllib.request": _IO,
    "http.client": _IO,
    "socket": _IO,
    "subprocess": _IO,
    "sqlite3": _IO,
    "smtplib": _IO,
}
_ATTRIBUTES = {"os.environ": _ENV}
# Methods flagged whatever they are called on: the receiver (a loop from
# get_running_loop, say) is a local value the lint cannot follow, and the name says
# enough.
_METHODS = {"run_in_executor": _THREAD}


@dataclass(frozen=True, slots=True)
class LintFinding:
    line: int
    what: str
    why: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.what} {self.why}"


def lint_workflow(fn: Callable[..., Any]) -> list[LintFinding]:
    """Findings in ``fn``'s body; empty when the source is unavailable."""
    try:
        lines, first = inspect.getsourcelines(fn)
    except (OSError, TypeError):
        return []
    source = textwrap.dedent("".join(lines))
    try:
        tree = ast.parse(source)
    except SyntaxError:  # source that is not a whole statement on its own
        return []
    target = inspect.unwrap(fn)
    linter = _Linter(_outer_names(target), source.splitlines(), first)
    body = next((n for n in tree.body if isinstance(n, _FUNCTIONS)), None)
    if body is None:
        linter.visit_all(tree.body, [])
    else:
        # Only the body: decorators and defaults run once, at definition, not on replay.
        linter.visit_all(body.body, [_Scope(_function_bindings(body))])
    return sorted(linter.findings, key=lambda f: f.line)


# -- names ----------------------------------------------------------------------------

_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)

_Binding = str | None
"""What a name bound in a scope is: the dotted name an import gave it, or None for
any other value (a parameter, an assignment), which the lint does not follow."""


@dataclass(slots=True)
class _Scope:
    bindings: dict[str, _Binding]
    is_class: bool = False


@dataclass(slots=True)
class _Known:
    """The objects behind the rules, by identity: ``from asyncio import wait`` binds
    a function whose ``__module__`` is ``asyncio.tasks``, and only identity says it is
    ``asyncio.wait``."""

    by_id: dict[int, tuple[object, str]] = field(default_factory=dict)

    @classmethod
    def collect(cls) -> _Known:
        known = cls()
        for name in [*_CALLS, *_CALLS_WITHOUT_TIME, *_ATTRIBUTES]:
            head, *parts = name.split(".")
            # Only modules loaded already: a global cannot hold what was never imported.
            obj: object = sys.modules.get(head) if parts else getattr(builtins, head, None)
            path = head
            for part in parts:
                obj = getattr(obj, part, None)
                path = f"{path}.{part}"
                if obj is None:
                    break
                # Classes on the way are named too: `from datetime import date` binds
                # the class that date.today() is called on.
                if not isinstance(obj, ModuleType):
                    known.by_id.setdefault(id(obj), (obj, path))
            if not parts and obj is not None:
                known.by_id.setdefault(id(obj), (obj, name))
        return known

    def get(self, obj: object) -> str | None:
        found = self.by_id.get(id(obj))
        return found[1] if found is not None and found[0] is obj else None


def _qualified(obj: object) -> str | None:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        return f"{module}.{qualname}"
    return None


def _name_of(obj: object, known: _Known) -> str | None:
    """The dotted name of a runtime value, as far as it tells."""
    try:
        if isinstance(obj, ModuleType):
            return obj.__name__
        found = known.get(obj)
        if found is not None:
            return found
        owner = getattr(obj, "__self__", None)
        name = getattr(obj, "__name__", None)
        if owner is not None and isinstance(name, str):
            # A builtin function (owner: its module) or a bound method (owner: a class
            # such as datetime for datetime.now, or an instance such as the Random
            # behind random.choice).
            if isinstance(owner, ModuleType):
                return f"{owner.__name__}.{name}"
            base = known.get(owner) or (
                _qualified(owner) if isinstance(owner, type) else _qualified(type(owner))
            )
            return None if base is None else f"{base}.{name}"
        if isinstance(obj, type) or callable(obj):
            return _qualified(obj) or _qualified(type(obj))
        # An instance held in a global (a module-level Random or HTTP client, say) is
        # named by its class, so calls on it fall under its module's rule.
        return _qualified(type(obj))
    except Exception:  # noqa: BLE001 - a value with odd attributes is simply not named
        return None


def _outer_names(fn: Callable[..., Any]) -> dict[str, object]:
    """What names outside the body refer to: builtins, then globals, then the closure."""
    names: dict[str, object] = dict(vars(builtins))
    names.update(getattr(fn, "__globals__", {}))
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    for name, cell in zip(getattr(code, "co_freevars", ()), cells, strict=False):
        try:
            names[name] = cell.cell_contents
        except ValueError:  # a cell not filled yet: the enclosing code assigns it later
            names.pop(name, None)
    return names


def _function_bindings(
    node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda,
) -> dict[str, _Binding]:
    args = node.args
    params = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
    bindings: dict[str, _Binding] = {a.arg: None for a in params if a is not None}
    body: list[ast.AST] = [node.body] if isinstance(node, ast.Lambda) else list(node.body)
    bindings.update(_block_bindings(body))
    return bindings


def _block_bindings(nodes: Iterable[ast.AST]) -> dict[str, _Binding]:
    """Names a scope binds, without entering the scopes nested in it.

    Python decides scope statically: a name assigned anywhere in a function is local
    everywhere in it. A name both imported and assigned is taken as an unknown value,
    since which one a line sees depends on the path taken.
    """
    imported: dict[str, _Binding] = {}
    assigned: set[str] = set()
    declared_outside: set[str] = set()
    todo = list(nodes)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del):
            assigned.add(node.id)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    imported[alias.asname] = alias.name
                else:
                    root = alias.name.partition(".")[0]
                    imported[root] = root
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name != "*":
                    # A relative import names a module of the user's package: not followed.
                    target = f"{node.module}.{alias.name}" if node.level == 0 else None
                    imported[alias.asname or alias.name] = target
        elif isinstance(node, ast.Global | ast.Nonlocal):
            declared_outside.update(node.names)
        elif isinstance(node, ast.ExceptHandler | ast.MatchAs | ast.MatchStar) and node.name:
            assigned.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            assigned.add(node.rest)
        if isinstance(node, (*_FUNCTIONS, ast.ClassDef)):
            assigned.add(node.name)
            continue  # its body is its own scope
        if isinstance(node, (ast.Lambda, *_COMPREHENSIONS)):
            continue
        todo.extend(ast.iter_child_nodes(node))
    bindings: dict[str, _Binding] = dict(imported)
    bindings.update(dict.fromkeys(assigned))
    for name in declared_outside:
        bindings.pop(name, None)
    return bindings


def _comprehension_bindings(node: ast.AST) -> dict[str, _Binding]:
    generators: list[ast.comprehension] = getattr(node, "generators", [])
    names = [n.id for gen in generators for n in ast.walk(gen.target) if isinstance(n, ast.Name)]
    return dict.fromkeys(names)


def _spelled(node: ast.AST) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _under(name: str, rules: Mapping[str, str]) -> str | None:
    """The rule of the module ``name`` lives in, matched on whole dotted segments."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        why = rules.get(".".join(parts[:end]))
        if why is not None:
            return why
    return None


# -- the walk -------------------------------------------------------------------------


class _Linter:
    def __init__(self, outer: Mapping[str, object], text: list[str], first: int) -> None:
        self.outer = outer
        self.known = _Known.collect()
        self.text = text
        self.first = first
        self.findings: list[LintFinding] = []
        self.called: set[int] = set()
        """The nodes called (a call's function), checked as calls, not as values."""

    def visit_all(self, nodes: Iterable[ast.AST], scopes: list[_Scope]) -> None:
        for node in nodes:
            self.visit(node, scopes)

    def visit(self, node: ast.AST, scopes: list[_Scope]) -> None:
        if isinstance(node, (*_FUNCTIONS, ast.Lambda)):
            # Decorators and defaults are evaluated in the enclosing scope.
            outside: list[ast.AST] = [*node.args.defaults]
            outside += [d for d in node.args.kw_defaults if d is not None]
            if not isinstance(node, ast.Lambda):
                outside += node.decorator_list
            self.visit_all(outside, scopes)
            inner = [*scopes, _Scope(_function_bindings(node))]
            body = [node.body] if isinstance(node, ast.Lambda) else node.body
            self.visit_all(body, inner)
            return
        if isinstance(node, ast.ClassDef):
            self.visit_all([*node.decorator_list, *node.bases, *node.keywords], scopes)
            self.visit_all(node.body, [*scopes, _Scope(_block_bindings(node.body), True)])
            return
        if isinstance(node, _COMPREHENSIONS):
            # The first iterable is evaluated outside; the rest sees the loop names.
            generators = node.generators
            self.visit(generators[0].iter, scopes)
            inner = [*scopes, _Scope(_comprehension_bindings(node))]
            rest: list[ast.AST] = [generators[0].target, *generators[0].ifs, *generators[1:]]
            if isinstance(node, ast.DictComp):
                rest += [node.key, node.value]
            else:
                rest.append(node.elt)
            self.visit_all(rest, inner)
            return
        self.check(node, scopes)
        self.visit_all(ast.iter_child_nodes(node), scopes)

    def check(self, node: ast.AST, scopes: list[_Scope]) -> None:
        if isinstance(node, ast.Call):
            self.called.add(id(node.func))
            spelled = _spelled(node.func)
            resolved = self.resolve(node.func, scopes)
            why = None if resolved is None else self.call_rule(resolved, node)
            if why is None and isinstance(node.func, ast.Attribute):
                why = _METHODS.get(node.func.attr)
                resolved = spelled
            if why is not None:
                self.report(node, f"{spelled or ast.unparse(node.func)}()", resolved, why)
        elif isinstance(node, ast.Attribute | ast.Name) and isinstance(node.ctx, ast.Load):
            resolved = self.resolve(node, scopes)
            why = _ATTRIBUTES.get(resolved or "")
            if why is None and id(node) not in self.called:
                # Taken as a value and called later under another name
                # (``now = datetime.now; now()``): what it does when called is
                # what it is.
                why = _CALLS.get(resolved or "")
            if why is not None:
                self.report(node, _spelled(node) or "", resolved, why)

    @staticmethod
    def call_rule(resolved: str, node: ast.Call) -> str | None:
        why = _CALLS.get(resolved)
        if why is not None:
            return why
        reading = _CALLS_WITHOUT_TIME.get(resolved)
        if reading is not None:
            return _CLOCK if len(node.args) <= reading and not node.keywords else None
        return _under(resolved, _MODULES)

    def resolve(self, node: ast.AST, scopes: list[_Scope]) -> str | None:
        """``node``'s dotted name with its first part resolved; None if that part is
        a local value (a parameter such as ``ctx``, a variable) or not a name."""
        spelled = _spelled(node)
        if spelled is None:
            return None
        head, _, rest = spelled.partition(".")
        root = self.lookup(head, scopes)
        if root is None:
            return None
        return f"{root}.{rest}" if rest else root

    def lookup(self, name: str, scopes: list[_Scope]) -> str | None:
        for depth, scope in enumerate(reversed(scopes)):
            if scope.is_class and depth > 0:
                continue  # a class body's names are not visible in its methods
            if name in scope.bindings:
                bound = scope.bindings[name]
                return None if bound is None else self.imported(bound)
        if name in self.outer:
            return _name_of(self.outer[name], self.known)
        # Not bound anywhere yet (an import below the workflow): take it as spelled.
        return name

    def imported(self, dotted: str) -> str:
        """The canonical name of what an import inside the body will bind, if its
        module is loaded already: ``from asyncio.tasks import wait`` is asyncio.wait."""
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            module = sys.modules.get(".".join(parts[:end]))
            if module is None:
                continue
            obj: object = module
            for part in parts[end:]:
                obj = getattr(obj, part, None)
                if obj is None:
                    return dotted
            return _name_of(obj, self.known) or dotted
        return dotted

    def report(self, node: ast.AST, spelled: str, resolved: str | None, why: str) -> None:
        lineno: int = getattr(node, "lineno", 1)
        last: int = getattr(node, "end_lineno", None) or lineno
        # The exemption may sit on the first line of a call or, once a formatter has
        # wrapped it, on its last.
        if any(self.text[n - 1].rstrip().endswith(ALLOW) for n in {lineno, last}):
            return
        plain = spelled.removesuffix("()")
        what = spelled if resolved in (None, plain) else f"{spelled} ({resolved})"
        self.findings.append(LintFinding(self.first + lineno - 1, what, why))
