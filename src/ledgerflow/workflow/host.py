"""The contract between a pass and the engine that hosts it.

A pass (``run.py``) replays an instance's history through its code and acts; it
talks to its host only through ``RunHost``, and tells it how it ended with one of
the exceptions below or a ``PassResult``. Only returning or raising from the
workflow's code is the workflow's own outcome; the rest are ``BaseException``s, so
``except Exception`` in workflow code cannot swallow them (see
``docs/adr/005-engine-promises.md``). ``EngineHost`` is the engine's side of that
door; ``ReplayHost`` the one of passes that only replay.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from .. import personal
from ..errors import LedgerflowError, WorkflowError, WorkflowFinishedError, WorkflowNotFoundError
from ..events import AppendResult, Metadata, RecordedEvent
from .definition import WorkflowDefinition
from .history import Finished, History
from .step_threads import StepThreads

if TYPE_CHECKING:
    from ..resilience.book import PolicyVersion
    from ..resilience.guards import Guards
    from ..store.runtime import RuntimeWrite
    from .engine import Engine

__all__ = [
    "Abandon",
    "BodyEnded",
    "EngineHost",
    "Executor",
    "Park",
    "PassResult",
    "Relinquish",
    "ReplayHost",
    "Restart",
    "RunHost",
    "Suspend",
]

_ASKED_KEPT = 10_000
"""Children's cancels an engine remembers having sent (see EngineHost._asked)."""


class Suspend(BaseException):
    """The instance must wait: end this pass, record ``events``, wake at ``due_at_us``."""

    def __init__(
        self,
        events: list[Any] | None = None,
        due_at_us: int | None = None,
        child_id: str | None = None,
    ) -> None:
        super().__init__("suspended")
        self.events = events or []
        self.due_at_us = due_at_us
        self.child_id = child_id
        self.stale = False
        """News (a signal, a cancel, a child's end) reached the pass after a wait
        looked: record the waits, then run another pass to look again."""


class Restart(BaseException):
    """Another runner recorded commands under us: start the pass again from history."""


class Abandon(BaseException):
    """The store failed under the pass (unreachable, locked, closed): drop the pass
    and retry it from the last recorded event; never the workflow's outcome."""

    def __init__(self, cause: LedgerflowError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class Relinquish(BaseException):
    """The runner's lease on the instance passed to another runner (a fenced append
    failed): step back at once, with no further effect, and never retry."""

    def __init__(self, cause: LedgerflowError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class Park(BaseException):
    """The code cannot go on with this history: park the instance as ``stuck``."""

    def __init__(self, error: WorkflowError) -> None:
        super().__init__(str(error))
        self.error = error


class BodyEnded(BaseException):
    """A command issued after the body ended (a ``gather`` branch still running):
    it is not started; the next pass replays the branch."""


class RunHost(Protocol):
    """What a pass needs from the engine that hosts it."""

    @property
    def step_threads(self) -> StepThreads | None: ...

    @property
    def max_event_bytes(self) -> int | None:
        """Largest encoded event the store takes; None if the host records nothing."""
        ...

    def now_us(self) -> int: ...

    def encoded_size(self, event: Any) -> int: ...

    async def append(
        self, history: History, events: list[Any], runtime: tuple[RuntimeWrite, ...]
    ) -> AppendResult:
        """Append at ``history.version``; ConcurrencyError if the stream moved."""
        ...

    async def read_after(self, history: History) -> list[RecordedEvent]: ...

    async def appended(self, history: History, before: int) -> None:
        """Called after each append made by the pass (snapshots hook in here)."""
        ...

    async def start_child(
        self,
        workflow: WorkflowDefinition[Any, Any],
        given: Any,
        child_id: str,
        parent_id: str,
        tenant: str | None,
    ) -> None: ...

    async def cancel_child(self, child_id: str, reason: str) -> None:
        """Ask a child to stop (``reason`` recorded with it); nothing if it has ended.
        A parent waiting for its children to end asks again on every pass: a host
        may leave out asks it made already."""
        ...

    async def withdraw_task(self, task_id: str) -> bool:
        """Withdraw the queued step ``task_id`` if no worker ever claimed it; False
        if one did: it may have run (an attempt lost with its worker) or run now,
        and its outcome will come."""
        ...

    def claimed_before(self, workflow_id: str) -> bool:
        """Whether the instance was leased before the lease this pass runs under
        (its epoch is past the first): a pass before this one may have run, and may
        have been lost mid-step."""
        ...

    async def policy(self, name: str) -> PolicyVersion:
        """The version in force of a named policy (``PolicyNotFoundError``)."""
        ...

    def fresh_policy(self, name: str) -> PolicyVersion | None:
        """The cached version of a policy if it is fresh enough to use; else None
        (then ask ``policy``)."""
        ...

    @property
    def guards(self) -> Guards | None:
        """The guarded resources' shared state; None if the host makes no calls."""
        ...


class Executor(Protocol):
    """One pass over one instance, whatever kind of definition it runs: the history
    in; out, the events to record, its next wake-up (``PassResult.suspend``) or its
    end (``PassResult.finished``), or one of the exceptions above. The engine holds
    the lease, appends the conclusion with its runtime writes and schedules the
    wake-up; it knows no more of the definition than this. Code-first workflows
    (``run._Run``) and state machines (``statemachine.runtime.MachineRun``) are
    the two kinds; ``executors.executor`` picks one for a definition."""

    @property
    def exposed(self) -> Any:
        """What a query reads (``ctx.expose`` of a code-first workflow)."""
        ...

    async def execute(self) -> PassResult: ...

    def released(self) -> None:
        """The host is done with the pass's result: free what it held."""
        ...

    def unrecorded(self) -> list[Any]:
        """What the pass made and did not hand over because it parked (``Park``):
        results of steps that ran, to be recorded with the instance's parking so
        they never run again."""
        ...

    def kept(self) -> None:
        """The host recorded the waits of a pass that ended ``PassResult.kept`` and
        keeps the run for the next pass."""
        ...

    def resumable(self, history: History) -> bool:
        """Whether a kept run may go on over ``history`` (the instance's history
        now) rather than a new pass replay it."""
        ...

    def resume(self) -> None:
        """Make a kept run, ``resumable``, the next pass: its waits look again."""
        ...

    def drop(self) -> None:
        """End a run the host does not keep (or no longer): nothing more recorded."""
        ...


@dataclass
class PassResult:
    """How a pass ended: suspended (``suspend``) or finished (``finished``)."""

    suspend: Suspend | None = None
    finished: Finished | None = None
    exposed: Any = None
    buffered: list[Any] = field(default_factory=list)
    kept: bool = False
    """Suspended with its body alive (``run._Run`` kept): once the suspension is
    recorded, the host may resume the same run for the next pass instead of
    replaying the history (``Engine``'s kept runs)."""


class ReplayHost:
    """A host for passes that only replay (queries, golden-history checks): it has a
    clock and nothing else, since a replaying pass never acts."""

    step_threads: StepThreads | None = None
    max_event_bytes: int | None = None

    def __init__(self, now_us: int) -> None:
        self._now_us = now_us

    def now_us(self) -> int:
        return self._now_us

    def encoded_size(self, event: Any) -> int:
        return 0

    async def append(
        self, history: History, events: list[Any], runtime: tuple[RuntimeWrite, ...]
    ) -> AppendResult:
        raise AssertionError("a replaying pass never records")

    async def read_after(self, history: History) -> list[RecordedEvent]:
        raise AssertionError("a replaying pass never records")

    async def appended(self, history: History, before: int) -> None:
        raise AssertionError("a replaying pass never records")

    async def start_child(
        self,
        workflow: WorkflowDefinition[Any, Any],
        given: Any,
        child_id: str,
        parent_id: str,
        tenant: str | None,
    ) -> None:
        raise AssertionError("a replaying pass never acts")

    async def cancel_child(self, child_id: str, reason: str) -> None:
        raise AssertionError("a replaying pass never acts")

    async def withdraw_task(self, task_id: str) -> bool:
        return True  # a replaying pass changes nothing: it stops where the record does

    def claimed_before(self, workflow_id: str) -> bool:
        return False

    async def policy(self, name: str) -> PolicyVersion:
        raise AssertionError("a replaying pass never acts")

    def fresh_policy(self, name: str) -> PolicyVersion | None:
        raise AssertionError("a replaying pass never acts")

    guards: Guards | None = None


class EngineHost:
    """The engine as a pass sees it (``run.RunHost``): a narrow door, so the pass
    never reaches into the engine's other rooms."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._metadata_bytes = len(msgspec.json.encode(Metadata()))
        self._asked: OrderedDict[tuple[str, str], None] = OrderedDict()
        """Children this engine asked to stop: a parent waiting for them to end asks
        once, not on each pass (another engine, after a takeover, asks once more;
        an instance takes the first cancel it is sent)."""

    @property
    def step_threads(self) -> StepThreads:
        return self._engine.step_threads

    @property
    def max_event_bytes(self) -> int:
        return self._engine.store.max_event_bytes

    def now_us(self) -> int:
        return self._engine._now_us()

    def encoded_size(self, event: Any) -> int:
        encoded = self._engine.store.registry.encode(event, sealer=personal.SIZING)
        return len(encoded.data) + self._metadata_bytes

    def append(
        self, history: History, events: list[Any], runtime: tuple[RuntimeWrite, ...]
    ) -> Coroutine[Any, Any, AppendResult]:
        # The store's coroutine itself, not one around it: this is every append's path.
        engine = self._engine
        stream = engine.stream_id(history.workflow_id)
        return engine.store.append(
            stream,
            events,
            history.version,
            runtime=runtime,
            fence=engine._fence(history.workflow_id),
        )

    def claimed_before(self, workflow_id: str) -> bool:
        fence = self._engine._fence(workflow_id)
        return fence is not None and fence.epoch > 1

    async def read_after(self, history: History) -> list[RecordedEvent]:
        stream = self._engine.stream_id(history.workflow_id)
        return await self._engine.store.read_stream(stream, from_version=history.version + 1)

    async def appended(self, history: History, before: int) -> None:
        self._engine._appended(history.workflow_id)
        await self._engine._journal.snapshot_if_due(history, before)

    async def start_child(
        self,
        workflow: WorkflowDefinition[Any, Any],
        given: Any,
        child_id: str,
        parent_id: str,
        tenant: str | None,
    ) -> None:
        engine = self._engine
        await engine._start(engine._definition(workflow), given, child_id, parent_id, tenant=tenant)

    async def cancel_child(self, child_id: str, reason: str) -> None:
        asked = (child_id, reason)
        if asked in self._asked:
            return
        with contextlib.suppress(WorkflowFinishedError, WorkflowNotFoundError):
            engine = self._engine
            await engine.cancel(child_id, reason, actor=engine.owner)
        self._asked[asked] = None
        while len(self._asked) > _ASKED_KEPT:
            self._asked.popitem(last=False)

    def withdraw_task(self, task_id: str) -> Coroutine[Any, Any, bool]:
        return self._engine.store.withdraw_task(task_id)

    def policy(self, name: str) -> Coroutine[Any, Any, PolicyVersion]:
        return self._engine.policies.current(name)

    def fresh_policy(self, name: str) -> PolicyVersion | None:
        return self._engine.policies.fresh(name)

    @property
    def guards(self) -> Guards:
        return self._engine.guards
