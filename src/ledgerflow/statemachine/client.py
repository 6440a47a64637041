"""Sending events to state-machine instances, reading where they are, migrating them.
Mixed into ``WorkflowClient`` (so an ``Engine`` has it too).

``execute`` reads the instance, checks that its configuration accepts the event
(``InvalidTransition`` and nothing recorded if not), and appends the event at the
version it read, with a nudge: a concurrent sender's append fails that check, reads
again and decides anew, so events apply one at a time and none is lost or applied
to a configuration it was not checked against. An instance still processing an
event takes the next one only when it is done. The engine that runs the instance
then runs the transition (``runtime.MachineRun``); ``execute`` waits for its
outcome.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import msgspec
import msgspec.inspect

from ..errors import (
    ConcurrencyError,
    EventInputError,
    InstanceBusyError,
    InvalidTransition,
    MigrationError,
    TransitionFailedError,
    UnknownWorkflowError,
    WorkflowDefinitionError,
    WorkflowFailedError,
    WorkflowFinishedError,
    WorkflowInputError,
)
from ..events import Metadata
from ..hashing import from_micros
from ..resilience.book import default_actor
from ..store import WorkflowStore
from ..store.runtime import InstanceRow, Nudge, PutInstance
from ..workflow.codec import CodecError, to_builtins
from ..workflow.history import (
    TERMINAL,
    EventReceived,
    EventRefused,
    Finished,
    History,
    MachineMigrated,
    Stuck,
    Transitioned,
    TransitionFailed,
    WorkflowStatus,
)
from .definition import Machine
from .instance import Instance, MachineState, view
from .runtime import accepted, enabled, undoer
from .verify import can_complete, verify

__all__ = ["MachineClient", "check_machine", "machine_waits"]

log = logging.getLogger("ledgerflow.statemachine")

VERIFY_MODES = ("refuse", "warn", "off")
FIRST_LOOK_S = 0.002
"""The first wait for an instance to move on; doubled up to ``MAX_LOOK_S``."""
MAX_LOOK_S = 0.1
HISTORIES_KEPT = 1_024
"""State-machine histories a client keeps, the latest used: the next event to one of
them reads only what was appended since."""
MIGRATION_BOUND = 100_000
"""Configurations a migration explores to show the instance can still complete."""

_CHECKED: weakref.WeakKeyDictionary[Machine, int] = weakref.WeakKeyDictionary()


def check_machine(machine: Machine, mode: str) -> None:
    """What registering a machine checks: its runtime needs (``Machine.check``), then
    ``verify`` unless ``mode`` is ``off``. With ``refuse`` a definition with findings
    is refused (``WorkflowDefinitionError`` listing them); with ``warn`` they are
    logged. A bounded exploration is logged, never refused: it found nothing."""
    if mode not in VERIFY_MODES:
        raise WorkflowDefinitionError(
            f"verify_machines must be one of {', '.join(VERIFY_MODES)}, not {mode!r}"
        )
    machine.check()
    if mode == "off" or _CHECKED.get(machine) == len(machine.transitions):
        return
    report = verify(machine)
    if report.findings:
        listed = "\n".join(f"  {f}" for f in report.findings)
        said = f"machine {machine.name!r} v{machine.version} is not sound:\n{listed}"
        if mode == "refuse":
            raise WorkflowDefinitionError(
                said + "\n(Engine(verify_machines='warn') registers it anyway)"
            )
        log.warning("%s", said)
    elif report.bounded:
        log.warning("machine %r v%d: %s", machine.name, machine.version, "; ".join(report.notes))
    _CHECKED[machine] = len(machine.transitions)


class MachineClient(abc.ABC):
    """State-machine instances: see the module docstring."""

    store: WorkflowStore
    poll_interval: float
    _histories: OrderedDict[str, History]
    """Kept by ``_current``; the client creates it."""

    @property
    @abc.abstractmethod
    def _machines(self) -> Mapping[tuple[str, int], object]: ...

    @staticmethod
    @abc.abstractmethod
    def stream_id(workflow_id: str) -> str: ...

    @abc.abstractmethod
    async def _instance(self, workflow_id: str) -> InstanceRow: ...

    @abc.abstractmethod
    async def _load_history(self, workflow_id: str) -> History: ...

    @abc.abstractmethod
    def _now_us(self) -> int: ...

    @abc.abstractmethod
    def _poke(self) -> None: ...

    def _moved(self, workflow_id: str) -> asyncio.Event | None:
        """An event set when a pass of this process records on the instance (an
        engine's); None: poll."""
        return None

    async def execute(
        self,
        instance_id: str,
        event: str,
        payload: Mapping[str, Any] | msgspec.Struct | None = None,
        *,
        actor: str | None = None,
        reason: str | None = None,
        timeout: timedelta | float | None = None,
    ) -> MachineState:
        """Send ``event`` to a state-machine instance and wait until its transition
        has run; where the instance is then.

        Raises ``InvalidTransition`` (nothing recorded) if the instance's states do
        not accept the event or no guard holds; ``TransitionFailedError`` if an
        activity failed for good (the instance is in its failure states, or where it
        was); ``WorkflowFinishedError`` once it has ended; ``WorkflowFailedError``
        (status ``stuck``) if the instance was parked on the way (an activity's
        result that cannot be recorded: the event runs once fitting code is
        deployed); ``TimeoutError`` if ``timeout`` passes once the event is recorded
        (it stays accepted and will run: an activity parked for an operator waits for
        one); ``InstanceBusyError`` if it passes before, while the instance still
        runs its start or an earlier event (nothing recorded: send it again).
        """
        if not isinstance(event, str) or not event:
            raise EventInputError(repr(event), "the event name must be a non-empty string")
        given = _payload(event, payload)
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        stream = self.stream_id(instance_id)
        while True:
            row = await self._instance(instance_id)
            history = await self._current(instance_id)
            machine = self._machine_of(history)
            instance = view(history)
            if row.status in TERMINAL or history.finished is not None:
                raise WorkflowFinishedError(instance_id, row.status, f"send {event!r} to")
            if row.status == WorkflowStatus.STUCK:
                raise WorkflowFinishedError(instance_id, row.status, f"send {event!r} to")
            if history.cancel is not None:
                raise WorkflowFinishedError(instance_id, "cancelling", f"send {event!r} to")
            if not instance.begun or instance.pending is not None:
                # Another event's turn (or the start's): ours is decided after it.
                try:
                    await self._until_moved(instance_id, history.version, deadline)
                except TimeoutError:
                    # Not recorded yet: not a TimeoutError, which says it was.
                    raise InstanceBusyError(instance_id, event, seconds or 0.0) from None
                continue
            # From here to the append nothing awaits: what is checked is the instance
            # at ``version``, and the append is at ``version``.
            checked = _check_fields(machine, instance_id, event, given)
            try:
                self._check_accepts(machine, instance_id, instance, event, checked)
            except InvalidTransition:
                stranded = bool(machine.lacks(instance.marking))
                if stranded and instance.begun and row.status == WorkflowStatus.RUNNING:
                    # Stranded by a deploy: wake it, so that an engine parks it as
                    # stuck, saying why, rather than let it run on accepting nothing.
                    with contextlib.suppress(ConcurrencyError):
                        wake = [Nudge(instance_id, self._now_us())]
                        await self.store.append(stream, [], history.version, runtime=wake)
                        self._poke()
                raise
            version, base = history.version, instance.copy()
            received = EventReceived(
                seq=instance.last_seq + 1, name=event, payload=checked, by=actor or default_actor()
            )
            runtime = (
                [Nudge(instance_id, self._now_us())]
                if row.status in (WorkflowStatus.RUNNING, WorkflowStatus.NEEDS_ATTENTION)
                else []
            )
            try:
                await self.store.append(
                    stream,
                    [received],
                    version,
                    runtime=runtime,
                    metadata=Metadata(actor=received.by, reason=reason),
                )
            except ConcurrencyError:
                continue  # it moved (another event, a timeout): look again
            self._poke()
            base.apply(received)
            return await self._outcome_of(
                machine, instance_id, version + 1, base, received, deadline
            )

    async def _current(self, instance_id: str) -> History:
        """The instance's history, from this client's cache and the events after it
        (the whole history the first time): a long-lived instance is not read whole
        for each event. Histories only grow, so the cached part stays true."""
        known = self._histories.get(instance_id)
        if known is None:
            known = await self._load_history(instance_id)
            self._histories[instance_id] = known
            while len(self._histories) > HISTORIES_KEPT:
                self._histories.popitem(last=False)
        else:
            self._histories.move_to_end(instance_id)
            newer = await self.store.read_stream(
                self.stream_id(instance_id), from_version=known.version + 1
            )
            known.extend(newer)  # events it has already (a concurrent read) are skipped
        return known

    async def can_process(
        self,
        instance_id: str,
        event: str,
        payload: Mapping[str, Any] | msgspec.Struct | None = None,
    ) -> bool:
        """Whether the instance, where it is now, would accept ``event`` with this
        payload (its state takes the event and a guard holds; the payload fits). Reads
        only: ``execute`` checks again, at the version it appends at."""
        row = await self._instance(instance_id)
        history = await self._current(instance_id)
        machine = self._machine_of(history)
        if row.status in TERMINAL or history.cancel is not None:
            return False
        try:
            checked = _check_fields(machine, instance_id, event, _payload(event, payload))
            self._check_accepts(machine, instance_id, view(history), event, checked)
        except (InvalidTransition, WorkflowInputError):
            return False
        return True

    def _check_accepts(
        self,
        machine: Machine,
        instance_id: str,
        instance: Instance,
        event: str,
        payload: dict[str, Any],
    ) -> None:
        try:
            fired = enabled(machine, instance.marking, instance.data, event, payload)
        except Exception as exc:
            raise InvalidTransition(
                instance_id,
                "+".join(instance.marking),
                event,
                accepted(machine, instance.marking),
                f"a guard raised {type(exc).__name__}: {exc}",
            ) from exc
        if not fired:
            accepts = accepted(machine, instance.marking)
            why = "no guard holds" if event in accepts else ""
            gone = machine.lacks(instance.marking)
            if gone:
                why = (
                    f"this code's {machine.name!r} v{machine.version} has no state "
                    f"{', '.join(repr(s) for s in gone)}: a deploy renamed or removed it"
                )
            raise InvalidTransition(instance_id, "+".join(instance.marking), event, accepts, why)

    async def _outcome_of(
        self,
        machine: Machine,
        instance_id: str,
        version: int,
        mine: Instance,
        received: EventReceived,
        deadline: float | None,
    ) -> MachineState:
        """Wait for the outcome of ``received`` (appended as ``version``); where the
        instance is just after it (a later event may have moved it since): ``mine``,
        the instance as of ``version``, is folded on up to the outcome."""
        stream = self.stream_id(instance_id)
        while True:
            newer = await self.store.read_stream(stream, from_version=version + 1)
            for recorded in newer:
                version = recorded.version
                data = recorded.data
                mine.apply(data)
                if isinstance(data, Finished) and data.status != WorkflowStatus.COMPLETED:
                    raise WorkflowFinishedError(
                        instance_id, data.status, f"run {received.name!r} on"
                    )
                if isinstance(data, Stuck):
                    # Parked until code that can go on is deployed: the event stays
                    # accepted and runs then; the sender learns why now.
                    raise WorkflowFailedError(
                        instance_id, WorkflowStatus.STUCK, data.error_type, data.message
                    )
                if getattr(data, "seq", None) != received.seq:
                    continue
                if isinstance(data, EventRefused):
                    state = _state(machine, instance_id, mine, WorkflowStatus.RUNNING, version)
                    raise InvalidTransition(
                        instance_id, state.state, received.name, state.accepts, data.reason
                    )
                if isinstance(data, TransitionFailed):
                    raise TransitionFailedError(
                        instance_id,
                        received.name,
                        data.transition,
                        "+".join(data.marking),
                        data.error_type,
                        data.message,
                        data.compensated,
                    )
                if isinstance(data, Transitioned):
                    return _state(machine, instance_id, mine, WorkflowStatus.RUNNING, version)
            await self._until_moved(instance_id, version, deadline)

    async def _until_moved(self, instance_id: str, version: int, deadline: float | None) -> None:
        """Return once the instance's stream is past ``version`` (or soon after)."""
        loop = asyncio.get_running_loop()
        stream = self.stream_id(instance_id)
        wait = FIRST_LOOK_S
        moved = self._moved(instance_id)
        while True:
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise TimeoutError(f"instance {instance_id!r} has not moved on in time")
            pause = (
                min(wait, MAX_LOOK_S, self.poll_interval)
                if left is None
                else min(wait, MAX_LOOK_S, self.poll_interval, left)
            )
            if moved is not None:
                moved.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(moved.wait(), pause)
            else:
                await asyncio.sleep(pause)
            if await self.store.stream_version(stream) > version:
                return
            wait *= 2

    async def machine_state(self, instance_id: str) -> MachineState:
        """Where a state-machine instance is now (from its history)."""
        row = await self._instance(instance_id)
        history = await self._current(instance_id)
        machine = self._machine_of(history)
        return _state(machine, instance_id, view(history), str(row.status), history.version)

    async def migrate(
        self,
        instance_id: str,
        to_version: int,
        *,
        states: Mapping[str, str] | None = None,
        actor: str | None = None,
        reason: str,
    ) -> MachineState:
        """Move a running instance to version ``to_version`` of its definition
        (registered here), checked first: every state it is in exists there (or is
        renamed by ``states``), its data has the same fields, the compensations of
        its completed activities are still there, and it can still complete from
        where it is. ``MigrationError`` (nothing recorded) says what fails. The move
        is one append at the version checked, recorded with who and why."""
        if not isinstance(reason, str) or not reason.strip():
            raise WorkflowInputError("migrate", "a migration needs a reason")
        renames = dict(states or {})
        while True:
            row = await self._instance(instance_id)
            history = await self._current(instance_id)
            current = self._machine_of(history)
            target = self._machines.get((current.name, to_version))
            if not isinstance(target, Machine):
                raise UnknownWorkflowError(current.name, to_version)
            if row.status in TERMINAL:
                raise WorkflowFinishedError(instance_id, row.status, "migrate")
            instance = view(history)
            problems = _migration_problems(current, target, instance, renames)
            if problems:
                raise MigrationError(instance_id, to_version, problems)
            marking = tuple(sorted(renames.get(s, s) for s in instance.marking))
            now = self._now_us()
            moved = MachineMigrated(
                seq=instance.last_seq + 1,
                name=current.name,
                from_version=instance.version,
                to_version=to_version,
                marking=marking,
                by=actor or default_actor(),
                reason=reason,
                at_us=now,
            )
            listed = InstanceRow(
                instance_id,
                row.name,
                to_version,
                row.status,
                row.parent_id,
                row.created_at_us,
                now,
            )
            try:
                await self.store.append(
                    self.stream_id(instance_id),
                    [moved],
                    history.version,
                    runtime=[PutInstance(listed), Nudge(instance_id, now)],
                    metadata=Metadata(actor=moved.by, reason=reason),
                )
            except ConcurrencyError:
                continue
            self._poke()
            return await self.machine_state(instance_id)

    def _machine_of(self, history: History) -> Machine:
        started = history.started
        found = self._machines.get((started.name, history.definition_version))
        if found is None:
            raise UnknownWorkflowError(started.name, history.definition_version)
        # A machine registered here under the name and version of a code-first
        # workflow that another engine runs: the instance is the workflow's.
        if not isinstance(found, Machine) or history.instance_kind() == "workflow":
            raise WorkflowInputError(
                started.name,
                f"instance {history.workflow_id!r} runs code, not a state machine: "
                "send it signals, not events",
            )
        return found


def _state(
    machine: Machine, instance_id: str, instance: Instance, status: str, version: int
) -> MachineState:
    """Where the instance is, as a value of its own (nothing shared with ``instance``)."""
    marking, data = instance.marking, instance.data
    if not instance.begun:  # its first pass has yet to enter the initial state
        marking, data = (machine.initial().name,), dict(machine.initial_data)
    ended = status in TERMINAL
    return MachineState(
        instance_id=instance_id,
        machine=machine.name,
        version=instance.version,
        state="+".join(marking),
        marking=marking,
        data=dict(data),
        results=dict(instance.results),
        accepts=() if ended else accepted(machine, marking),
        pending=(
            instance.pending.name
            if instance.pending is not None
            else (None if instance.begun else "start")
        ),
        status=status,
        path=tuple(instance.path),
        visited=tuple(instance.visited),
        stream_version=version,
    )


def machine_waits(machine: Machine, history: History) -> str:
    """What a state-machine instance waits for, in words (``describe``)."""
    instance = view(history)
    state = _state(machine, history.workflow_id, instance, WorkflowStatus.RUNNING, history.version)
    if state.pending is not None:
        return f"its {state.pending!r} transition to run"
    said = f"an event in state {state.state!r}: {', '.join(state.accepts) or 'none'}"
    timeouts = [
        (s, machine.states[s])
        for s in instance.marking
        if s in machine.states and machine.states[s].timeout is not None
        if s not in instance.timed_out
    ]
    for name, spec in timeouts:
        assert spec.timeout is not None
        due = instance.entered.get(name, 0) + int(spec.timeout.total_seconds() * 1_000_000)
        said += f"; {spec.on_timeout!r} at {from_micros(due).isoformat()}"
    return said


def _payload(event: str, payload: Mapping[str, Any] | msgspec.Struct | None) -> dict[str, Any]:
    if payload is None:
        return {}
    try:
        encoded = to_builtins(payload)
    except CodecError as exc:
        raise EventInputError(event, str(exc)) from exc
    if not isinstance(encoded, dict):
        raise EventInputError(
            event, f"the payload must be a mapping of fields, not {type(payload).__name__}"
        )
    return encoded


def _check_fields(
    machine: Machine, instance_id: str, event: str, payload: dict[str, Any]
) -> dict[str, Any]:
    """The payload as the instance will record it: checked against the event's type
    if it declares one (defaults filled in), else holding exactly the fields the
    event declares (an undeclared event carries none). Values are not held to the
    declared domains: those are what verification explored."""
    declared = machine.events.get(event)
    if declared is not None and declared.type is not None:
        # Fields the type does not declare are refused, as for an untyped event (a
        # misspelt optional field was dropped without a word).
        unknown = sorted(set(payload) - _field_names(declared.type))
        if unknown:
            raise EventInputError(event, f"payload: unknown fields {unknown}", instance_id)
        try:
            typed = msgspec.convert(payload, declared.type)
        except msgspec.ValidationError as exc:
            raise EventInputError(event, f"payload: {exc}", instance_id) from None
        encoded: dict[str, Any] = to_builtins(typed)
        return encoded
    wanted = set(declared.payload) if declared is not None else set()
    given = set(payload)
    if given == wanted:
        return payload
    problems = []
    if wanted - given:
        problems.append(f"missing {sorted(wanted - given)}")
    if given - wanted:
        problems.append(f"unknown {sorted(given - wanted)}")
    raise EventInputError(event, f"payload fields: {', '.join(problems)}", instance_id)


def _field_names(cls: type) -> set[str]:
    """The names a payload of ``cls`` (a msgspec Struct or a dataclass) may hold."""
    info = msgspec.inspect.type_info(cls)
    fields = getattr(info, "fields", ())
    return {f.encode_name for f in fields}


def deploy_problems(machine: Machine, history: History) -> list[str]:
    """What would strand an instance (its history) if ``machine`` replaced the
    definition of its version in place: states it is in that are gone, data fields
    that differ, or no way left to complete from where it is. The replay gate's
    check of a state machine, which is data, not code to replay."""
    instance = view(history)
    if not instance.begun:
        return []  # it starts in the new code's initial state
    problems: list[str] = []
    missing = machine.lacks(instance.marking)
    if missing:
        problems.append(
            f"it is in {'+'.join(instance.marking)}, and the new code's {machine.name!r} "
            f"v{machine.version} has no state {', '.join(repr(s) for s in missing)}"
        )
    fields_differ = set(instance.data) != set(machine.domains)
    if fields_differ:
        problems.append(
            f"its data fields {sorted(instance.data)} differ from the new code's "
            f"{sorted(machine.domains)}"
        )
    if problems:
        # Migration moves states, never data: with other fields, the old version
        # stays registered until its instances are done.
        advice = (
            "deploy the change as a new version, keeping this one registered beside it "
            "until its instances end (`machines migrate` cannot change data fields)"
            if fields_differ
            else "change a running machine as a new version, then `ledgerflow machines migrate`"
        )
        return [*problems, advice]
    verdict, why = can_complete(
        machine, instance.marking, instance.data, max_configurations=MIGRATION_BOUND
    )
    if verdict is False:
        problems.append(f"on the new code {why}")
    return problems


def _migration_problems(
    current: Machine, target: Machine, instance: Instance, renames: Mapping[str, str]
) -> list[str]:
    problems: list[str] = []
    if instance.version == target.version:
        problems.append(f"it already runs v{target.version}")
    if not instance.begun or instance.pending is not None:
        problems.append("an event is being processed; migrate once it is done")
    if instance.cancelling is not None:
        problems.append("it is being cancelled")
    for old in renames:
        if old not in instance.marking:
            problems.append(f"states= renames {old!r}, which the instance is not in")
    marking = tuple(sorted(renames.get(s, s) for s in instance.marking))
    missing = target.lacks(marking)
    if missing:
        problems.append(
            f"states {missing} do not exist in v{target.version} (rename them with states=)"
        )
    if set(instance.data) != set(target.domains):
        problems.append(
            f"its data fields {sorted(instance.data)} differ from v{target.version}'s "
            f"{sorted(target.domains)}"
        )
    completed = {d.name for d in instance.outstanding(instance.last_seq + 1)}
    lost = sorted(
        name
        for name in completed
        if undoer(current, name) is not None and undoer(target, name) is None
    )
    if lost:
        problems.append(
            f"completed activities {lost} could no longer be compensated: "
            f"v{target.version} has no compensation for them"
        )
    if problems:
        return problems
    verdict, why = can_complete(target, marking, instance.data, max_configurations=MIGRATION_BOUND)
    if verdict is not True:
        problems.append(why)
    return problems
