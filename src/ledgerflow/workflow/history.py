"""The events of a workflow instance's stream, and the index replay reads them from.

Commands issued by workflow code (a step, a timer, a signal wait, a child, a clock
reading, a compensation) are numbered in the order the code issues them: ``seq``.
Every event about a command carries its ``seq``, its ``kind`` and ``name``; replay
checks that the code issues the same command at the same ``seq``, and returns the
recorded outcome instead of acting again. Signals and cancellation come from
outside and carry no ``seq``.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Literal

import msgspec

from .. import personal
from ..events import RecordedEvent
from ..hashing import to_micros
from ..registry import EventRegistry

__all__ = [
    "MAX_MESSAGE_CHARS",
    "TERMINAL",
    "CancelRequested",
    "ChildDone",
    "ChildFinished",
    "ChildStarted",
    "ChildrenCancelled",
    "ClockRead",
    "CompensationAttemptFailed",
    "CompensationDone",
    "CompensationFailed",
    "CompensationScheduled",
    "EventReceived",
    "EventRefused",
    "Finished",
    "History",
    "MachineCancelling",
    "MachineMigrated",
    "Patched",
    "Resumed",
    "SignalRejected",
    "SignalSent",
    "SignalTaken",
    "SignalTimedOut",
    "SignalWaiting",
    "Started",
    "StepAttemptFailed",
    "StepDone",
    "StepFailed",
    "StepParked",
    "StepRetried",
    "StepScheduled",
    "Stuck",
    "TimerFired",
    "TimerStarted",
    "TransitionFailed",
    "Transitioned",
    "WorkflowStatus",
    "history_registry",
]


class Started(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    name: str
    version: int
    input: Any
    parent_id: str | None = None
    tenant: str | None = None
    """The tenant whose namespace (``<tenant>/`` before the id) the instance is in;
    its children are started there too."""
    kind: Literal["machine", "workflow"] | None = None
    """``machine`` for a state-machine instance, ``workflow`` for a code-first one;
    None if started by a release that did not record it (``History.instance_kind``
    then tells by what it recorded). Names and versions are not unique across kinds
    between processes: an engine that registers the other kind under this name must
    leave the instance alone."""


class _Command(msgspec.Struct, frozen=True, kw_only=True):
    kind: ClassVar[str]
    seq: int
    name: str


class StepDone(_Command, frozen=True, kw_only=True, omit_defaults=True):
    """The step's result. ``policy``/``policy_version``: the named policy its last
    attempt ran under, if any."""

    kind = "step"
    result: Any
    policy: str | None = None
    policy_version: int | None = None


class StepFailed(_Command, frozen=True, kw_only=True, omit_defaults=True):
    kind = "step"
    error_type: str
    message: str
    policy: str | None = None
    policy_version: int | None = None


class StepScheduled(_Command, frozen=True, kw_only=True):
    """The step was sent to a task queue: a worker of ``queue`` runs it and records
    its attempts and outcome here (``StepAttemptFailed``, ``StepDone``,
    ``StepFailed``), fenced by its lease on the task."""

    kind = "step"
    queue: str


class StepAttemptFailed(_Command, frozen=True, kw_only=True, omit_defaults=True):
    """An attempt failed and another will follow: attempts survive a restart.

    ``retry_at_us``: when the next attempt may start (the backoff, durable: a restart
    waits out the rest of it); ``first_at_us``: when the step's first attempt
    started (its deadlines count from there); ``policy``/``policy_version``: the named
    policy the attempt ran under; ``refused``: the call was never made (its resource's
    breaker was open, its bulkhead full), which uses up no attempt. All absent in
    histories recorded before them."""

    kind = "step"
    attempt: int
    error_type: str
    message: str
    retry_at_us: int | None = None
    first_at_us: int | None = None
    policy: str | None = None
    policy_version: int | None = None
    refused: bool = False


class StepParked(_Command, frozen=True, kw_only=True, omit_defaults=True):
    """The step used up its attempts under a policy that parks (``on_exhausted=
    "park"``): the instance waits as ``needs_attention`` until an operator retries
    the step (``StepRetried``), skips it with a result (``StepDone``) or gives it up
    (``StepFailed``), each recorded with who and why."""

    kind = "step"
    attempts: int
    error_type: str
    message: str
    policy: str | None = None
    policy_version: int | None = None
    result_schema: dict[str, Any] | None = None
    """JSON Schema of the step's return type: a result given by an operator (skip)
    is checked against it before it is recorded."""


class StepRetried(_Command, frozen=True, kw_only=True):
    """An operator asked for a parked (or backing-off) step to be tried again now,
    with a fresh set of attempts."""

    kind = "step"
    by: str
    reason: str


class TimerStarted(_Command, frozen=True, kw_only=True):
    kind = "timer"
    fire_at_us: int


class TimerFired(_Command, frozen=True, kw_only=True):
    kind = "timer"


class SignalWaiting(_Command, frozen=True, kw_only=True):
    kind = "signal"
    deadline_us: int | None
    schema: dict[str, Any] | None = None
    """JSON Schema of the waited-for type: senders check payloads against it."""


class SignalTaken(_Command, frozen=True, kw_only=True):
    kind = "signal"
    signal_version: int
    """Stream version of the SignalSent event consumed."""


class SignalTimedOut(_Command, frozen=True, kw_only=True):
    kind = "signal"


class SignalRejected(_Command, frozen=True, kw_only=True):
    """A signal whose payload does not fit the waited-for type: set aside, never
    taken, and the wait goes on."""

    kind = "signal"
    signal_version: int
    reason: str


class ChildStarted(_Command, frozen=True, kw_only=True):
    kind = "child"
    child_id: str
    version: int


class ChildDone(_Command, frozen=True, kw_only=True):
    kind = "child"
    child_id: str
    status: str
    result: Any = None
    error_type: str | None = None
    message: str | None = None


class ClockRead(_Command, frozen=True, kw_only=True):
    kind = "now"
    at_us: int


class Patched(_Command, frozen=True, kw_only=True):
    """The code took the new path of change ``name`` here (``ctx.patched``): a
    replay of this history takes it again; one of an older history does not."""

    kind = "patch"


class CompensationDone(_Command, frozen=True, kw_only=True):
    kind = "compensation"
    step_seq: int


class CompensationFailed(_Command, frozen=True, kw_only=True):
    kind = "compensation"
    step_seq: int
    error_type: str
    message: str


class CompensationScheduled(_Command, frozen=True, kw_only=True):
    """The compensation was sent to a task queue (that of its step, or its own)."""

    kind = "compensation"
    step_seq: int
    queue: str


class CompensationAttemptFailed(_Command, frozen=True, kw_only=True):
    kind = "compensation"
    step_seq: int
    attempt: int
    error_type: str
    message: str


class EventReceived(_Command, frozen=True, kw_only=True, omit_defaults=True):
    """An event sent to a state-machine instance, accepted in the configuration it
    was in (appended at the version that configuration was read at). Its outcome
    follows under the same ``seq``: ``Transitioned``, ``TransitionFailed`` or
    ``EventRefused``; the steps it runs take the ``seq`` numbers after it."""

    kind = "machine"
    payload: dict[str, Any] = {}
    by: str = ""
    """Who sent it: an actor, or ``timeout`` for a state's timeout."""
    timeout_of: str | None = None
    """The state whose timeout sent it."""


class Transitioned(_Command, frozen=True, kw_only=True):
    """The machine moved: from ``source`` to ``marking`` (the states it is in now),
    with ``data`` after the transition's update. Seq 1 holds the instance's entry
    into its initial state (``name`` empty, ``transition`` ``start``)."""

    kind = "machine"
    transition: str
    source: tuple[str, ...]
    marking: tuple[str, ...]
    targets: tuple[str, ...]
    """The states it entered (anew, even those it was in: their timeouts restart)."""
    data: dict[str, Any]
    at_us: int


class TransitionFailed(_Command, frozen=True, kw_only=True):
    """An activity of the transition failed for good: the machine is in ``marking``
    now (its failure states once ``compensated``, else where it was)."""

    kind = "machine"
    transition: str
    error_type: str
    message: str
    marking: tuple[str, ...]
    targets: tuple[str, ...]
    """The failure states it entered (none if it stayed)."""
    compensated: bool
    at_us: int


class EventRefused(_Command, frozen=True, kw_only=True):
    """The event could not fire once its turn came (a guard that changed its mind):
    nothing ran, nothing moved."""

    kind = "machine"
    reason: str


class MachineCancelling(_Command, frozen=True, kw_only=True):
    """A cancelled state-machine instance starts undoing its completed activities;
    its compensations take the ``seq`` numbers after this one."""

    kind = "machine"


class MachineMigrated(_Command, frozen=True, kw_only=True):
    """A running state-machine instance moved to another version of its definition
    (``name``), checked first; ``marking`` is where it is in that version."""

    kind = "machine"
    from_version: int
    to_version: int
    marking: tuple[str, ...]
    by: str
    reason: str
    at_us: int


class SignalSent(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    payload: Any = None


class CancelRequested(msgspec.Struct, frozen=True, kw_only=True):
    reason: str | None = None


class ChildrenCancelled(msgspec.Struct, frozen=True, kw_only=True):
    """The instance, failing, asked its running children to cancel: their ends told
    after this are not the outcomes its ``ctx.child`` waits for (see waits.child), so
    every later pass fails as the first did, not with a sibling's cancellation."""

    reason: str


class ChildFinished(msgspec.Struct, frozen=True, kw_only=True):
    """Delivered to the parent's stream by a child that ended, with a nudge, so a
    parent waiting on it can never miss the end (an index row could be overwritten;
    a version check cannot)."""

    child_id: str
    status: str
    result: Any = None
    error_type: str | None = None
    message: str | None = None


class Finished(msgspec.Struct, frozen=True, kw_only=True):
    """The instance ended. ``status``: completed, failed, compensated,
    compensation_failed or cancelled; ``result`` only when completed."""

    status: str
    result: Any = None
    error_type: str | None = None
    message: str | None = None


class Stuck(msgspec.Struct, frozen=True, kw_only=True):
    """Replay could not go on (non-determinism, unknown version); nothing else is
    recorded until an engine with fitting code resumes it."""

    error_type: str
    message: str


class Resumed(msgspec.Struct, frozen=True, kw_only=True):
    """An engine took a stuck instance up again."""

    by: str


class WorkflowStatus(StrEnum):
    """Where an instance is: running (or waiting), parked as stuck, or ended. The
    values are what the ``workflows`` table and ``Finished.status`` hold."""

    RUNNING = "running"
    NEEDS_ATTENTION = "needs_attention"
    """A step used up its attempts under a policy that parks: an operator decides."""
    STUCK = "stuck"
    COMPLETED = "completed"
    FAILED = "failed"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"
    CANCELLED = "cancelled"


MAX_MESSAGE_CHARS = 8_192
"""Longest error message recorded (in a failure, a failed attempt, a park): an
exception's text is the user's, and one over the event size limit would leave its
instance unable to record that it failed."""


def error_message(exc: BaseException) -> str:
    """``str(exc)``, cut to ``MAX_MESSAGE_CHARS`` saying how much was left out."""
    text = str(exc)
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return f"{text[:MAX_MESSAGE_CHARS]}… ({len(text) - MAX_MESSAGE_CHARS} more characters)"


TERMINAL = frozenset(
    {
        WorkflowStatus.COMPLETED,
        WorkflowStatus.FAILED,
        WorkflowStatus.COMPENSATED,
        WorkflowStatus.COMPENSATION_FAILED,
        WorkflowStatus.CANCELLED,
    }
)
"""The statuses of an instance that has ended."""

_TYPES: tuple[tuple[type, str], ...] = (
    (Started, "wf.started"),
    (StepDone, "wf.step_done"),
    (StepFailed, "wf.step_failed"),
    (TimerStarted, "wf.timer_started"),
    (TimerFired, "wf.timer_fired"),
    (SignalWaiting, "wf.signal_waiting"),
    (SignalTaken, "wf.signal_taken"),
    (SignalTimedOut, "wf.signal_timed_out"),
    (ChildStarted, "wf.child_started"),
    (ChildDone, "wf.child_done"),
    (ClockRead, "wf.clock"),
    (Patched, "wf.patched"),
    (CompensationDone, "wf.compensation_done"),
    (CompensationFailed, "wf.compensation_failed"),
    (StepAttemptFailed, "wf.step_attempt_failed"),
    (StepParked, "wf.step_parked"),
    (StepRetried, "wf.step_retried"),
    (CompensationAttemptFailed, "wf.compensation_attempt_failed"),
    (SignalRejected, "wf.signal_rejected"),
    (SignalSent, "wf.signal"),
    (CancelRequested, "wf.cancel_requested"),
    (ChildrenCancelled, "wf.children_cancelled"),
    (ChildFinished, "wf.child_finished"),
    (Finished, "wf.finished"),
    (Stuck, "wf.stuck"),
    (Resumed, "wf.resumed"),
    (StepScheduled, "wf.step_scheduled"),
    (CompensationScheduled, "wf.compensation_scheduled"),
    (EventReceived, "sm.event_received"),
    (Transitioned, "sm.transitioned"),
    (TransitionFailed, "sm.transition_failed"),
    (EventRefused, "sm.event_refused"),
    (MachineCancelling, "sm.cancelling"),
    (MachineMigrated, "sm.migrated"),
)


def history_registry(registry: EventRegistry | None = None) -> EventRegistry:
    """``registry`` (or a new one) with the workflow history types registered."""
    registry = registry if registry is not None else EventRegistry()
    for cls, name in _TYPES:
        if registry.class_of(name) is None:
            registry.register(cls, name)
    return registry


@dataclass
class History:
    """An instance's stream, indexed for replay."""

    workflow_id: str
    started: Started
    version: int = 0
    commands: dict[int, list[Any]] = field(default_factory=dict)
    signals: list[tuple[int, SignalSent]] = field(default_factory=list)
    taken: set[int] = field(default_factory=set)
    cancel: CancelRequested | None = None
    cancel_version: int | None = None
    """Where the first cancel is in the stream (None: none, or unknown in a snapshot
    written before it was kept)."""
    children: dict[str, ChildFinished] = field(default_factory=dict)
    child_versions: dict[str, int] = field(default_factory=dict)
    """Where each child's end is in the stream: one told after the cancel does not
    undo it (see waits.child)."""
    ending_version: int | None = None
    """Where ``ChildrenCancelled`` is in the stream (None: not failing with children)."""
    command_version: int | None = None
    """Where the latest command's event is in the stream (None: none, or unknown in a
    snapshot written before it was kept): a cancel after it came while the pass
    that wrote it went on (see run._Pass.in_doubt)."""
    finished: Finished | None = None
    stuck: Stuck | None = None
    events: int = 0
    migrated_to: int | None = None
    """A state-machine instance's definition version since its last migration."""
    observer: Callable[[Any], None] | None = field(default=None, repr=False, compare=False)
    """Told of each command added (``statemachine.instance.view`` keeps a state
    machine's fold up to date with it)."""
    signal_cursor: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    """By signal name: the index in ``signals`` before which none of that name is
    left untaken (taken signals stay taken), so a mailbox's next signal is not
    looked for from its first one every time."""
    traceparent: str | None = None
    """The trace of the call that started it (``ledgerflow.tracing``)."""
    correlation_id: str | None = None
    """The correlation id it was started with (its logs carry it)."""
    signal_traces: dict[int, str] = field(default_factory=dict)
    """The trace of each signal's sender, by the signal's version: the pass that
    takes it links to it."""
    signal_times: dict[int, int] = field(default_factory=dict)
    """When each signal not yet taken was recorded (µs), by its version: one that
    came after a wait's deadline does not end that wait (see waits.signal)."""
    personal: bool = False
    """It holds personal data (``ledgerflow.personal``): never kept in a cache, so
    that an erasure reaches the next pass."""

    @classmethod
    def of(cls, workflow_id: str, events: list[RecordedEvent]) -> History:
        if not events or not isinstance(events[0].data, Started):
            raise ValueError(f"stream of workflow {workflow_id!r} does not begin with Started")
        history = cls(workflow_id, events[0].data)
        history.traceparent = events[0].metadata.traceparent
        history.correlation_id = events[0].metadata.correlation_id
        history.extend(events)
        return history

    def cancelled_after_last_command(self) -> bool:
        """Whether the cancel came after the latest command's event: the pass that
        appended that event did not see it, and went on to what followed."""
        return (
            self.cancel_version is not None
            and self.command_version is not None
            and self.cancel_version > self.command_version
        )

    def told_after_ending(self, child_id: str) -> bool:
        """Whether the child's end came after this instance, failing, asked it to
        cancel (``ChildrenCancelled``)."""
        told = self.child_versions.get(child_id)
        return self.ending_version is not None and told is not None and told > self.ending_version

    def told_after_cancel(self, child_id: str) -> bool:
        """Whether the child's end came after the instance's cancel (False when
        either is missing or unknown)."""
        told = self.child_versions.get(child_id)
        return self.cancel_version is not None and told is not None and told > self.cancel_version

    def patches(self) -> tuple[str, ...]:
        """The changes whose new path the instance took (``ctx.patched``)."""
        return tuple(
            c.name for seq in sorted(self.commands) for c in self.commands[seq] if c.kind == "patch"
        )

    def extend(self, events: list[RecordedEvent]) -> None:
        for event in events:
            if event.version <= self.version:
                continue
            self.personal = self.personal or event.sealed
            self.add(event.version, event.data)
            # Kept for a signal still to take only (as a snapshot keeps them).
            untaken = isinstance(event.data, SignalSent) and event.version not in self.taken
            if untaken:
                self.signal_times[event.version] = to_micros(event.recorded_at)
            traced = event.metadata.traceparent
            if traced is None:
                continue
            if untaken:
                self.signal_traces[event.version] = traced
            elif self.traceparent is None and isinstance(event.data, _Command):
                # Started outside any trace: its first pass's span is the root (the
                # first command the runner recorded names it).
                self.traceparent = traced

    def add(self, version: int, data: Any) -> None:
        self.version = version
        self.events += 1
        if personal.declared() and not self.personal:
            self.personal = bool(personal.subjects_in(data))
        if isinstance(data, _Command):
            self.command_version = version
            self.commands.setdefault(data.seq, []).append(data)
            if self.observer is not None:
                self.observer(data)
            if isinstance(data, (SignalTaken, SignalRejected)):
                self.taken.add(data.signal_version)
                # What only a signal still to take needs (as a snapshot keeps it).
                self.signal_times.pop(data.signal_version, None)
                self.signal_traces.pop(data.signal_version, None)
            elif isinstance(data, MachineMigrated):
                self.migrated_to = data.to_version
        elif isinstance(data, SignalSent):
            self.signals.append((version, data))
        elif isinstance(data, CancelRequested):
            if self.cancel is None:
                self.cancel, self.cancel_version = data, version
        elif isinstance(data, ChildrenCancelled):
            if self.ending_version is None:
                self.ending_version = version
        elif isinstance(data, ChildFinished):
            if data.child_id not in self.children:
                self.children[data.child_id] = data
                self.child_versions[data.child_id] = version
        elif isinstance(data, Finished):
            self.finished = data
        elif isinstance(data, Stuck):
            self.stuck = data
        elif isinstance(data, Resumed):
            self.stuck = None

    # -- snapshots: a long history loads from its latest snapshot plus the tail ------

    def snapshot(self) -> bytes:
        """The index as bytes; the events after ``version`` extend it on load."""
        return _snapshot_encode(
            {
                "workflow_id": self.workflow_id,
                "started": self.started,
                "version": self.version,
                "events": self.events,
                "commands": [
                    [_NAMES[type(event)], event]
                    for events in self.commands.values()
                    for event in events
                ],
                "signals": [[version, signal] for version, signal in self.signals],
                "cancel": self.cancel,
                "cancel_version": self.cancel_version,
                "children": list(self.children.values()),
                "child_versions": list(self.child_versions.items()),
                "ending_version": self.ending_version,
                "command_version": self.command_version,
                "finished": self.finished,
                "stuck": self.stuck,
                "traceparent": self.traceparent,
                "correlation_id": self.correlation_id,
                "signal_traces": [
                    [v, t] for v, t in self.signal_traces.items() if v not in self.taken
                ],
                "signal_times": [
                    [v, t] for v, t in self.signal_times.items() if v not in self.taken
                ],
            }
        )

    @classmethod
    def from_snapshot(cls, data: bytes) -> History:
        raw = _snapshot_decode(data)
        history = cls(raw["workflow_id"], msgspec.convert(raw["started"], Started))
        for name, event in raw["commands"]:
            command: Any = msgspec.convert(event, _CLASSES[name])
            history.commands.setdefault(command.seq, []).append(command)
            if isinstance(command, (SignalTaken, SignalRejected)):
                history.taken.add(command.signal_version)
            elif isinstance(command, MachineMigrated):
                history.migrated_to = command.to_version
        history.signals = [
            (version, msgspec.convert(signal, SignalSent)) for version, signal in raw["signals"]
        ]
        history.cancel = msgspec.convert(raw["cancel"], CancelRequested | None)
        for child in raw["children"]:
            done = msgspec.convert(child, ChildFinished)
            history.children[done.child_id] = done
        # Snapshots written before these were kept have neither: unknown.
        history.cancel_version = raw.get("cancel_version")
        history.child_versions = dict(raw.get("child_versions", ()))
        history.command_version = raw.get("command_version")
        history.ending_version = raw.get("ending_version")
        history.finished = msgspec.convert(raw["finished"], Finished | None)
        history.stuck = msgspec.convert(raw["stuck"], Stuck | None)
        history.version = raw["version"]
        history.events = raw["events"]
        # Snapshots written before traces were kept have neither.
        history.traceparent = raw.get("traceparent")
        history.correlation_id = raw.get("correlation_id")
        history.signal_traces = dict(raw.get("signal_traces", ()))
        history.signal_times = dict(raw.get("signal_times", ()))
        return history

    def from_outside(self, data: Any) -> bool:
        """Whether ``data`` was recorded by someone other than the instance's runner,
        who may append it while a pass runs: a signal, a cancellation, a child's
        end, an event sent to a state machine or its migration, or the attempts
        and outcome of a step or compensation sent to a task queue (only its
        task's runner records those)."""
        if isinstance(data, SignalSent | CancelRequested | ChildFinished):
            return True
        if isinstance(data, MachineMigrated):
            return True
        if isinstance(data, EventReceived):
            return data.by != "timeout"  # a state's timeout is sent by the runner
        if isinstance(data, _TASK_OUTCOMES):
            first = self.commands.get(data.seq)
            return first is not None and isinstance(first[0], StepScheduled | CompensationScheduled)
        return False

    def sent_to_queues(self) -> bool:
        """Whether any command was sent to a task queue."""
        return any(
            isinstance(events[0], StepScheduled | CompensationScheduled)
            for events in self.commands.values()
        )

    def untaken_signals(self) -> list[tuple[int, SignalSent]]:
        return [(v, s) for v, s in self.signals if v not in self.taken]

    @property
    def definition_version(self) -> int:
        """The version of its definition the instance runs on now."""
        return self.migrated_to if self.migrated_to is not None else self.started.version

    def recorded(self, seq: int) -> list[Any] | None:
        return self.commands.get(seq)

    def last_seq(self) -> int:
        return max(self.commands, default=0)

    def signal_time(self, version: int) -> int | None:
        """When the signal at ``version`` was recorded (µs); None if not known (a
        snapshot written before the times were kept)."""
        return self.signal_times.get(version)

    def instance_kind(self) -> Literal["machine", "workflow"] | None:
        """``machine`` or ``workflow``: recorded with the start, or, for an instance
        started by a release that did not record it, told by its commands (a state
        machine's first is its own; a code-first workflow's a step, timer, signal or
        child). None if it has none yet: it runs as whatever is registered under its
        name and version, as it always did."""
        if self.started.kind is not None:
            return self.started.kind
        kinds = {events[0].kind for events in self.commands.values() if events}
        if "machine" in kinds:  # its activities are steps: any machine command says
            return "machine"
        return "workflow" if kinds else None

    def next_signal(self, name: str, skip: Collection[int] = ()) -> tuple[int, SignalSent] | None:
        """The first signal ``name`` not taken (nor in ``skip``: being taken)."""
        signals, taken = self.signals, self.taken
        first_open: int | None = None
        for index in range(self.signal_cursor.get(name, 0), len(signals)):
            version, signal = signals[index]
            if signal.name != name or version in taken:
                continue
            if first_open is None:
                first_open = index
            if version not in skip:
                self.signal_cursor[name] = first_open
                return version, signal
        self.signal_cursor[name] = len(signals) if first_open is None else first_open
        return None

    def signal_at(self, version: int) -> SignalSent:
        signals = self.signals
        index = bisect.bisect_left(signals, version, key=_version_of)  # in stream order
        if index < len(signals) and signals[index][0] == version:
            return signals[index][1]
        raise KeyError(version)


def _version_of(entry: tuple[int, SignalSent]) -> int:
    return entry[0]


_TASK_OUTCOMES = (
    StepDone,
    StepFailed,
    StepAttemptFailed,
    CompensationDone,
    CompensationFailed,
    CompensationAttemptFailed,
)

SNAPSHOT_TYPE = "wf.history"
SNAPSHOT_VERSION = 2
"""Bump when History's shape changes: older snapshots are then ignored."""

_NAMES: dict[type, str] = dict(_TYPES)
_CLASSES: dict[str, type] = {name: cls for cls, name in _TYPES}
# JSON like the events themselves: whatever a history event can hold (integers of
# any size included), its snapshot can hold too.
_snapshot_encode = msgspec.json.Encoder().encode
_snapshot_decode = msgspec.json.Decoder().decode
