"""A worker process: an engine that runs until told to stop (``ledgerflow worker``).

Many workers share one store: each claims only the instances of the workflows it
registered and the tasks of the queues it serves whose steps it has, renews the
leases of what it runs and fences its appends with them (ADR 007). On SIGTERM or
SIGINT a worker stops claiming, lets running passes and tasks finish for a grace
period, cancels the rest (what they recorded stands; a step in flight runs again
elsewhere), gives its leases back, so another worker starts on them at once, and
returns.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from ..errors import ConfigurationError
from ..gauges import StoreGauges
from ..projections.definition import Projection
from ..registry import EventRegistry
from ..statemachine.definition import Machine
from .definition import _STEP_ATTR, StepOptions, WorkflowDefinition
from .engine import Engine
from .executors import Definition

__all__ = ["App", "load_app", "load_workflows", "run_worker"]

log = logging.getLogger("ledgerflow.worker")


@dataclass(frozen=True)
class App:
    """What a worker runs: workflows (and state machines), and steps for the task
    queues it serves; ``registry``: the event types of the app (every
    ``EventRegistry`` at the top level of its module, merged), None if it has none."""

    workflows: list[Definition]
    steps: list[Any]
    projections: list[Projection] = field(default_factory=list)
    registry: EventRegistry | None = None


def _is_step(value: Any) -> bool:
    return isinstance(getattr(value, _STEP_ATTR, None), StepOptions) or (
        hasattr(value, "execute") and hasattr(value, "compensate") and not isinstance(value, type)
    )


def load_app(target: str) -> App:
    """The workflows, state machines and steps named by ``module:attribute`` (one of
    them, or a sequence of them), or every workflow, state machine and
    ``@ledgerflow.step`` function defined at the top level of ``module``."""
    module_name, _, attribute = target.partition(":")
    if not module_name:
        raise ConfigurationError(f"--app {target!r}: expected module or module:attribute")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"--app {target!r}: cannot import {module_name!r}: {exc}") from exc
    except Exception as exc:  # the app's own code failed: said, not a traceback
        raise ConfigurationError(
            f"--app {target!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if attribute:
        try:
            found = getattr(module, attribute)
        except AttributeError:
            raise ConfigurationError(
                f"--app {target!r}: module {module_name!r} has no {attribute!r}"
            ) from None
        # Named explicitly, a plain function is a step too (its name: its qualified
        # name, as ctx.step gives it).
        single = (
            _is_definition(found)
            or isinstance(found, Projection)
            or _is_step(found)
            or callable(found)
        )
        candidates = [found] if single else found
        if not isinstance(candidates, Sequence) or not all(
            _is_definition(c) or isinstance(c, Projection) or _is_step(c) or callable(c)
            for c in candidates
        ):
            raise ConfigurationError(
                f"--app {target!r}: expected a workflow, a state machine, a step or a list "
                f"of them, not {type(found).__name__}"
            )
        values = list(candidates)
    else:
        values = []
        for v in vars(module).values():
            if (
                _is_definition(v)
                or isinstance(v, Projection)
                or (_is_step(v) and getattr(v, "__module__", None) == module.__name__)
            ):
                values.append(v)
            elif isinstance(v, list | tuple) and v and all(_is_definition(c) for c in v):
                # The versions of a definition kept registered together (the docs'
                # way for state machines, made by a function: no name of their own).
                values.extend(v)
        values = list({id(v): v for v in values}.values())
    workflows = [v for v in values if _is_definition(v)]
    projections = [v for v in values if isinstance(v, Projection)]
    steps = [v for v in values if not _is_definition(v) and not isinstance(v, Projection)]
    if not values:
        raise ConfigurationError(f"--app {target!r}: no workflows, projections or steps found")
    return App(workflows, steps, projections, _registry_of(module, target))


def _registry_of(module: Any, target: str) -> EventRegistry | None:
    """The module's event registries as one (its typed events then decode to their
    classes, as in the app's own process: projections keyed on them need that)."""
    found = {id(v): v for v in vars(module).values() if isinstance(v, EventRegistry)}
    if not found:
        return None
    if len(found) == 1:
        return next(iter(found.values()))
    merged = EventRegistry()
    try:
        for registry in found.values():
            merged.include(registry)
    except ConfigurationError as exc:
        raise ConfigurationError(f"--app {target!r}: its event registries clash: {exc}") from None
    return merged


def _is_definition(value: Any) -> bool:
    return isinstance(value, WorkflowDefinition | Machine)


def load_workflows(target: str) -> list[Definition]:
    """The workflows of ``load_app(target)``; raises if there are none."""
    workflows = load_app(target).workflows
    if not workflows:
        raise ConfigurationError(f"--app {target!r}: no workflows found")
    return workflows


async def run_worker(
    store: str,
    workflows: Sequence[Definition],
    *,
    steps: Sequence[Any] = (),
    projections: Sequence[Projection] = (),
    queues: Sequence[str] = (),
    task_concurrency: int = 16,
    concurrency: int = 200,
    lease: timedelta = timedelta(seconds=60),
    poll_interval: float = 1.0,
    grace: float = 10.0,
    stop: asyncio.Event | None = None,
    gauges_every: float | None = None,
    registry: EventRegistry | None = None,
) -> None:
    """Run an engine on ``store`` until ``stop`` is set (or SIGTERM/SIGINT arrive),
    then shut it down gracefully. ``gauges_every``: read the store's gauges (queue
    depth, breakers, lag; ``ledgerflow.gauges``) that often, for the metrics this
    process serves."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop.set)
            handled.append(signum)
        except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
            pass
    engine = Engine(
        store,
        workflows=workflows,
        concurrency=concurrency,
        lease=lease,
        poll_interval=poll_interval,
        queues=queues,
        steps=steps,
        task_concurrency=task_concurrency,
        projections=projections,
        registry=registry,
    )
    gauges: StoreGauges | None = None
    try:
        await engine.open()
        if gauges_every is not None:
            gauges = StoreGauges(engine.store, every=gauges_every)
            gauges.start()
        names = ", ".join(sorted({f"{w.name} v{w.version}" for w in workflows})) or "none"
        log.info(
            "worker %s started on %s: workflows %s (concurrency %d); task queues %s "
            "(concurrency %d)",
            engine.owner,
            engine.store.location,
            names,
            concurrency,
            ", ".join(queues) or "none",
            task_concurrency,
        )
        await stop.wait()
        log.info("worker %s stopping: finishing running passes (%.1fs)", engine.owner, grace)
    finally:
        if gauges is not None:
            await gauges.stop()
        await engine.close(grace=grace)
        for signum in handled:
            loop.remove_signal_handler(signum)
    if engine.step_threads.running:
        log.info("worker %s stopped; leases of step bodies still running expire", engine.owner)
    else:
        log.info("worker %s stopped; its leases are given back", engine.owner)
