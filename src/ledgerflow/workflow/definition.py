"""Declaring workflows and steps: ``@ledgerflow.workflow`` and ``@ledgerflow.step``."""

from __future__ import annotations

import inspect
import math
import typing
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, ParamSpec, TypeVar

from ..errors import LedgerflowError, WorkflowDefinitionError
from ..resilience.policy import check_policy_name
from ..retry import RetryPolicy, as_seconds
from .lint import lint_workflow

__all__ = ["StepOptions", "WorkflowDefinition", "step", "step_options", "workflow"]

I = TypeVar("I")  # noqa: E741 - the input type, as in the Temporal/DBOS idiom
O = TypeVar("O")  # noqa: E741
P = ParamSpec("P")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])

_STEP_ATTR = "__ledgerflow_step__"


@dataclass(frozen=True, slots=True)
class WorkflowDefinition(Generic[I, O]):
    """A registered workflow function with its name, version and types.

    Calling the definition is not how it runs: pass it to ``Engine.start``.
    """

    name: str
    version: int
    fn: Callable[[Any, I], Awaitable[O]]
    input_type: Any
    output_type: Any

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)


def workflow(
    *, name: str | None = None, version: int = 1, lint: bool = True
) -> Callable[[Callable[[Any, I], Awaitable[O]]], WorkflowDefinition[I, O]]:
    """Declare an ``async def fn(ctx, input)`` as a durable workflow.

    ``version`` pins running instances: an instance always continues on the version
    it started with, so register old versions alongside new ones until their
    instances finish. With ``lint`` (the default) the body is checked for calls that
    would break replay (wall clock, randomness, I/O); a line ending in
    ``# ledgerflow: allow`` is exempt.
    """

    def declare(fn: Callable[[Any, I], Awaitable[O]]) -> WorkflowDefinition[I, O]:
        if not inspect.iscoroutinefunction(fn):
            raise WorkflowDefinitionError(f"workflow {fn.__qualname__} must be an async def")
        if version < 1:
            raise WorkflowDefinitionError(f"workflow {fn.__qualname__}: version must be >= 1")
        params = list(inspect.signature(fn).parameters.values())
        if len(params) != 2:
            raise WorkflowDefinitionError(
                f"workflow {fn.__qualname__} must take exactly (ctx, input)"
            )
        hints = _hints(fn)
        if lint:
            findings = lint_workflow(fn)
            if findings:
                listed = "\n".join(f"  {f}" for f in findings)
                raise WorkflowDefinitionError(
                    f"workflow {fn.__qualname__} is not deterministic under replay:\n{listed}\n"
                    "use ctx.now(), ctx.random(), ctx.uuid(), ctx.sleep() and ctx.step() "
                    "instead, or end the line with '# ledgerflow: allow'"
                )
        return WorkflowDefinition(
            name=name or fn.__name__,
            version=version,
            fn=fn,
            input_type=hints.get(params[1].name, Any),
            output_type=hints.get("return", Any),
        )

    return declare


@dataclass(frozen=True, slots=True)
class StepOptions:
    name: str
    retry: RetryPolicy | None = None
    timeout: timedelta | float | None = None
    compensate: Callable[..., Any] | None = None
    queue: str | None = None
    policy: str | None = None


def step(
    *,
    name: str | None = None,
    retry: RetryPolicy | None = None,
    timeout: timedelta | float | None = None,
    compensate: Callable[..., Any] | None = None,
    queue: str | None = None,
    policy: str | None = None,
) -> Callable[[F], F]:
    """Give a step function defaults that ``ctx.step`` uses unless told otherwise.

    The name is what history records, and what a worker of a task queue looks the
    function up by; keep it stable across deploys (the default is the function's
    qualified name, which a rename changes). ``queue``: the step runs on a worker
    serving that task queue (``ledgerflow worker --queue``), perhaps in another
    service, instead of in the engine that runs the workflow. ``policy``: the named
    resilience policy its attempts run under (retry, timeouts...; see
    ``Engine.policies``); ``retry`` and ``timeout`` given here win over its sections.
    """
    if queue is not None and (not isinstance(queue, str) or not queue):
        raise WorkflowDefinitionError(f"step queue must be a non-empty str, not {queue!r}")
    if policy is not None:
        try:
            check_policy_name(policy)
        except LedgerflowError as exc:
            raise WorkflowDefinitionError(f"step policy: {exc}") from None

    if timeout is not None:
        check_step_timeout(timeout)

    def mark(fn: F) -> F:
        options = StepOptions(name or fn.__qualname__, retry, timeout, compensate, queue, policy)
        setattr(fn, _STEP_ATTR, options)
        return fn

    return mark


def step_options(fn: Callable[..., Any]) -> StepOptions:
    found = getattr(fn, _STEP_ATTR, None)
    if isinstance(found, StepOptions):
        return found
    return StepOptions(getattr(fn, "__qualname__", type(fn).__name__))


def return_type(fn: Callable[..., Any]) -> Any:
    """``fn``'s return annotation (Any if none); resolved once per function, since
    resolving string annotations costs more than a replayed step."""
    try:
        return _RETURN_TYPES[fn]
    except KeyError:
        found = _RETURN_TYPES[fn] = _hints(fn).get("return", Any)
        return found
    except TypeError:  # unhashable callable
        return _hints(fn).get("return", Any)


_RETURN_TYPES: weakref.WeakKeyDictionary[Callable[..., Any], Any] = weakref.WeakKeyDictionary()


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except (NameError, TypeError):
        # Annotations naming types that are not importable at run time: treat as Any.
        return {}


def check_step_timeout(timeout: timedelta | float) -> None:
    """A step's attempt timeout must be a positive, finite number of seconds: NaN
    bounded nothing, and 0 or less timed every attempt out before it began."""
    try:
        seconds = as_seconds(timeout)
    except (TypeError, ValueError):
        seconds = None
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise WorkflowDefinitionError(
            f"step timeout must be a positive, finite number of seconds, not {timeout!r}"
        )
