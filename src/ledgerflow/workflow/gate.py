"""The replay gate: before a deploy, replay live instances' histories against the
code about to run them, and name every instance it would break.

An instance breaks when the new code takes another path through its recorded
history (``NonDeterminismError``: the first command that differs, recorded against
attempted, and where in the code the attempt was made), when a recorded value no
longer fits the code's types (an input, a step's result), or when the new code has
no definition of the name and version the instance runs on (it would be stranded).
State machines are data, not code to replay: an instance of one breaks when the
new code's machine of its version no longer has a state it is in, its data fields
differ, or it could no longer complete from where it is (``deploy_problems``);
they are listed as checked by where they are, not replayed.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..errors import NonDeterminismError, WorkflowError
from ..statemachine import Machine
from ..statemachine.client import deploy_problems
from ..store import WorkflowStore
from ..store.runtime import InstanceQuery
from .definition import WorkflowDefinition
from .history import History, Started
from .journal import stream_of
from .replay import export_history, replay

__all__ = ["Breakage", "GateReport", "replay_check"]

Definition = WorkflowDefinition[Any, Any] | Machine

REPLAY_TIMEOUT = 30.0
"""Seconds one instance's replay may take: a replay does no I/O, so one that has
not ended by then is waiting on something it never gets."""
_HUNG_ENOUGH = 3
"""Replays of one workflow version that hung, after which its other instances are
reported without replaying them."""


@dataclass(frozen=True, slots=True)
class Breakage:
    workflow_id: str
    name: str
    version: int
    reason: str
    """What goes wrong, in a sentence."""
    recorded: str | None = None
    attempted: str | None = None
    seq: int | None = None
    location: str | None = None
    """``file:line`` of the new code where it took another path, when known."""


@dataclass(frozen=True, slots=True)
class GateReport:
    checked: int
    """Instances replayed (or found without a definition)."""
    breakages: list[Breakage] = field(default_factory=list)
    not_replayed: list[str] = field(default_factory=list)
    """Instances of state machines, checked by where they are (see the module
    docstring); among ``checked``."""

    @property
    def ok(self) -> bool:
        return not self.breakages


async def replay_check(
    store: WorkflowStore,
    definitions: Sequence[Definition],
    *,
    statuses: Sequence[str] = ("running", "needs_attention", "stuck"),
    sample: int | None = None,
    seed: int | None = None,
    names: Collection[str] | None = None,
    timeout: float = REPLAY_TIMEOUT,
) -> GateReport:
    """Replay the instances whose status is one of ``statuses`` (all of them, or a
    random ``sample``) against ``definitions``; the report names each that breaks.
    ``names``: only instances of these workflows (a service sharing its ledger with
    others checks its own). A replay that has not ended after ``timeout`` seconds
    (code awaiting something of its own that never completes) breaks its instance."""
    ids = await _instances(store, statuses, names)
    if sample is not None and sample < len(ids):
        ids = sorted(random.Random(seed).sample(ids, sample))
    by_kind = {(d.name, d.version): d for d in definitions}
    breakages: list[Breakage] = []
    not_replayed: list[str] = []
    hung: Counter[tuple[str, int]] = Counter()
    checked = 0
    for workflow_id in ids:
        try:
            events = await store.read_stream(stream_of(workflow_id))
        except WorkflowError:
            continue
        if not events or events[0].type != "wf.started":
            continue
        # Decoded by whatever registry the store has: as plain data, for replay's.
        history = export_history(events)
        started = msgspec.convert(history[0]["data"], Started)
        definition = by_kind.get((started.name, started.version))
        checked += 1
        if definition is None:
            known = sorted(v for n, v in by_kind if n == started.name)
            breakages.append(
                Breakage(
                    workflow_id,
                    started.name,
                    started.version,
                    f"the new code has no {started.name!r} version {started.version} "
                    f"(it has {known or 'none'}): the instance would be stranded",
                )
            )
            continue
        if isinstance(definition, Machine):
            not_replayed.append(workflow_id)
            problems = deploy_problems(definition, History.of(workflow_id, events))
            if problems:
                breakages.append(
                    Breakage(
                        workflow_id,
                        started.name,
                        started.version,
                        "; ".join(problems) + ": the instance would be stranded",
                    )
                )
            continue
        if hung[started.name, started.version] >= _HUNG_ENOUGH:
            # The code hangs, not the histories: the gate takes N x timeout at most.
            breakages.append(
                Breakage(
                    workflow_id,
                    started.name,
                    started.version,
                    f"not replayed: the replays of {_HUNG_ENOUGH} other instances of it "
                    f"did not end within {timeout:g} s",
                )
            )
            continue
        try:
            async with asyncio.timeout(timeout):
                await replay(definition, history)
        except TimeoutError:
            hung[started.name, started.version] += 1
            breakages.append(
                Breakage(
                    workflow_id,
                    started.name,
                    started.version,
                    f"replaying its history did not end within {timeout:g} s: the new "
                    "code awaits something that is not a workflow command (a future, "
                    "a lock, a socket) and would hang its passes too",
                )
            )
        except NonDeterminismError as diverged:
            breakages.append(
                Breakage(
                    workflow_id,
                    started.name,
                    started.version,
                    str(diverged),
                    diverged.recorded,
                    diverged.attempted,
                    diverged.seq,
                    diverged.location,
                )
            )
        except WorkflowError as broken:
            breakages.append(Breakage(workflow_id, started.name, started.version, str(broken)))
    return GateReport(checked, breakages, not_replayed)


async def _instances(
    store: WorkflowStore, statuses: Sequence[str], names: Collection[str] | None
) -> list[str]:
    ids: list[str] = []
    for status in statuses:
        after: str | None = None
        while True:
            rows = await store.list_instances(
                after=after, limit=500, query=InstanceQuery(status=status)
            )
            ids.extend(r.workflow_id for r in rows if names is None or r.name in names)
            if len(rows) < 500:
                break
            after = rows[-1].workflow_id
    return ids
