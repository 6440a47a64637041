"""A state-machine instance as its history says it is: a fold of the recorded facts.

What a transition did is recorded as it happened (the marking and data it left, when),
so the fold needs no guard or update of the definition: an instance reads the same
after its definition changed, and a migration applies from the next event on. The
runtime (``runtime.MachineRun``) and the client (``execute``) read instances through
this one fold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..workflow.history import (
    CompensationDone,
    CompensationFailed,
    EventReceived,
    EventRefused,
    History,
    MachineCancelling,
    MachineMigrated,
    StepDone,
    Transitioned,
    TransitionFailed,
)

__all__ = [
    "Done",
    "Instance",
    "MachineCall",
    "MachineOutcome",
    "MachineState",
    "Moment",
    "fold",
    "view",
]

START_SEQ = 1
"""The seq of an instance's entry into its initial state."""


class MachineCall(msgspec.Struct, frozen=True, kw_only=True):
    """What an activity (and its compensation) is called with: the instance, the event
    that fired the transition, and the configuration it fired in."""

    instance_id: str
    machine: str
    version: int
    event: str
    """Empty for the entry into the initial state."""
    payload: dict[str, Any]
    state: str
    """The states the machine was in, joined by ``+`` (empty at the start)."""
    transition: str
    data: dict[str, Any]
    """The data before the transition's update."""
    input: Any
    """The instance's input, as JSON values: ``msgspec.convert(call.input, T)``."""
    results: dict[str, Any]
    """The latest result of each activity completed before this transition, by step
    name."""


class MachineOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """How a state-machine instance ended (its ``result()``): the terminal state it
    reached, its data and its activities' results."""

    state: str
    data: dict[str, Any]
    results: dict[str, Any]


class MachineState(msgspec.Struct, frozen=True, kw_only=True):
    """Where a state-machine instance is (``execute`` returns it, ``machine_state``
    reads it)."""

    instance_id: str
    machine: str
    version: int
    state: str
    """The states it is in, joined by ``+``."""
    marking: tuple[str, ...]
    data: dict[str, Any]
    results: dict[str, Any]
    accepts: tuple[str, ...]
    """The events it accepts now (their guards aside); empty once it ended."""
    pending: str | None = None
    """An event accepted and still being processed, if any."""
    status: str = "running"
    path: tuple[str, ...] = ()
    """The transitions it took, in order (``start`` first; a failed one with
    `` (failed)`` when it moved to failure states)."""
    visited: tuple[str, ...] = ()
    """The states it entered, in order."""
    stream_version: int = 0


@dataclass
class Moment:
    """An event's turn: what its activities are called with."""

    seq: int
    event: str
    payload: dict[str, Any]
    marking: tuple[str, ...]
    data: dict[str, Any]
    results: dict[str, Any]
    transition: str = ""


@dataclass
class Done:
    """A completed activity, for its compensation."""

    step_seq: int
    name: str
    result: Any
    moment: Moment


@dataclass
class Instance:
    version: int
    begun: bool = False
    marking: tuple[str, ...] = ()
    data: dict[str, Any] = field(default_factory=dict)
    entered: dict[str, int] = field(default_factory=dict)
    """When each state of the marking was entered (µs): its timeout counts from there."""
    timed_out: set[str] = field(default_factory=set)
    """States of the marking whose timeout was sent since they were entered."""
    results: dict[str, Any] = field(default_factory=dict)
    last_seq: int = 0
    pending: EventReceived | None = None
    moment: Moment | None = None
    """The turn under way: the start, or the pending event's."""
    done: list[Done] = field(default_factory=list)
    """Completed activities, oldest first."""
    compensated: dict[int, int] = field(default_factory=dict)
    """The seq of the compensation (done or given up) of each activity's step seq."""
    path: list[str] = field(default_factory=list)
    visited: list[str] = field(default_factory=list)
    """The states entered, in order (again on each entry)."""
    cancelling: int | None = None
    """The seq of ``MachineCancelling`` once the undoing of a cancellation began."""

    def __post_init__(self) -> None:
        if self.moment is None:
            self.moment = Moment(START_SEQ, "", {}, (), {}, {}, "start")

    def apply(self, event: Any) -> None:
        """Fold in one recorded command (in the order of the stream, or by seq: the
        same instance either way). Other events are not the machine's."""
        seq = getattr(event, "seq", None)
        if seq is None:
            return
        self.last_seq = max(self.last_seq, seq)
        if isinstance(event, EventReceived):
            self.pending = event
            self.moment = Moment(
                seq, event.name, event.payload, self.marking, self.data, dict(self.results)
            )
            if event.timeout_of is not None:
                self.timed_out.add(event.timeout_of)
        elif isinstance(event, Transitioned | TransitionFailed | EventRefused):
            _conclude(self, event)
        elif isinstance(event, MachineMigrated):
            self.version = event.to_version
            renamed = tuple(s for s in event.marking if s not in self.marking)
            _move(self, event.marking, renamed, event.at_us)
        elif isinstance(event, MachineCancelling):
            self.cancelling = seq
        elif isinstance(event, StepDone) and self.moment is not None:
            self.results[event.name] = event.result
            self.done.append(Done(seq, event.name, event.result, self.moment))
        elif isinstance(event, CompensationDone | CompensationFailed):
            self.compensated.setdefault(event.step_seq, seq)

    def copy(self) -> Instance:
        """A copy to fold further on its own (its ``Done`` and ``Moment`` records are
        shared: they do not change once their turn is over)."""
        return Instance(
            self.version,
            self.begun,
            self.marking,
            self.data,
            dict(self.entered),
            set(self.timed_out),
            dict(self.results),
            self.last_seq,
            self.pending,
            self.moment,
            list(self.done),
            dict(self.compensated),
            list(self.path),
            list(self.visited),
            self.cancelling,
        )

    def outstanding(self, before: int, *, skip_turn: int | None = None) -> list[Done]:
        """Completed activities not compensated by a command before seq ``before``,
        oldest first: what an undo starting there must run (or replay: those it
        compensated itself stay listed, so its commands keep their seq numbers).
        ``skip_turn``: leave out that turn's own activities."""
        return [
            d
            for d in self.done
            if self.compensated.get(d.step_seq, before) >= before and d.moment.seq != skip_turn
        ]


def fold(history: History) -> Instance:
    """The instance as its history records it, folded anew."""
    instance = Instance(history.started.version)
    for seq in sorted(history.commands):
        for event in history.commands[seq]:
            instance.apply(event)
    return instance


def view(history: History) -> Instance:
    """The instance as its history records it, kept up to date as events are added to
    ``history`` (folded once, then one event at a time)."""
    found = history.observer
    if isinstance(found, _View):
        return found.instance
    kept = _View(fold(history))
    history.observer = kept
    return kept.instance


class _View:
    """Applies each command added to a history to its instance."""

    __slots__ = ("instance",)

    def __init__(self, instance: Instance) -> None:
        self.instance = instance

    def __call__(self, event: Any) -> None:
        self.instance.apply(event)


def _conclude(instance: Instance, outcome: Any) -> None:
    moment = instance.moment
    if isinstance(outcome, Transitioned):
        if outcome.seq == START_SEQ:
            instance.begun = True
            if moment is not None and moment.seq == START_SEQ:
                moment.data = outcome.data
        _move(instance, outcome.marking, outcome.targets, outcome.at_us)
        instance.data = outcome.data
        instance.path.append(outcome.transition)
    elif isinstance(outcome, TransitionFailed) and outcome.targets:
        _move(instance, outcome.marking, outcome.targets, outcome.at_us)
        instance.path.append(f"{outcome.transition} (failed)")
    if moment is not None and isinstance(outcome, Transitioned | TransitionFailed):
        moment.transition = outcome.transition
    instance.pending = None


def _move(instance: Instance, marking: tuple[str, ...], targets: tuple[str, ...], at: int) -> None:
    """States entered (anew) count their timeouts from ``at``; the others keep theirs."""
    instance.entered = {s: at if s in targets else instance.entered.get(s, at) for s in marking}
    instance.timed_out = {s for s in instance.timed_out if s in marking and s not in targets}
    instance.marking = marking
    instance.visited.extend(targets)
