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

__all__ = ["Done", "Instance", "MachineCall", "MachineOutcome", "MachineState", "Moment", "fold"]

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
    """The instance as its history records it."""
    instance = Instance(history.started.version)
    start = Moment(START_SEQ, "", {}, (), {}, {}, "start")
    instance.moment = start
    for seq in sorted(history.commands):
        events = history.commands[seq]
        instance.last_seq = seq
        first = events[0]
        if isinstance(first, EventReceived):
            instance.pending = first
            instance.moment = Moment(
                seq,
                first.name,
                first.payload,
                instance.marking,
                instance.data,
                dict(instance.results),
            )
            if first.timeout_of is not None:
                instance.timed_out.add(first.timeout_of)
            for outcome in events[1:]:
                _conclude(instance, outcome)
        elif isinstance(first, Transitioned | TransitionFailed | EventRefused):
            _conclude(instance, first)  # the start (seq 1)
            for outcome in events[1:]:
                _conclude(instance, outcome)
        elif isinstance(first, MachineMigrated):
            instance.version = first.to_version
            renamed = tuple(s for s in first.marking if s not in instance.marking)
            _move(instance, first.marking, renamed, first.at_us)
        elif isinstance(first, MachineCancelling):
            instance.cancelling = seq
        else:
            outcome = events[-1]
            if isinstance(outcome, StepDone) and instance.moment is not None:
                instance.results[outcome.name] = outcome.result
                instance.done.append(Done(seq, outcome.name, outcome.result, instance.moment))
            elif isinstance(outcome, CompensationDone | CompensationFailed):
                instance.compensated.setdefault(outcome.step_seq, seq)
    return instance


def _conclude(instance: Instance, outcome: Any) -> None:
    moment = instance.moment
    if isinstance(outcome, Transitioned):
        if outcome.seq == START_SEQ:
            instance.begun = True
            moment = instance.moment = Moment(START_SEQ, "", {}, (), outcome.data, {}, "start")
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
