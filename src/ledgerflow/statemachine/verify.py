"""Verifying a state-machine definition before it runs: explicit-state exploration.

Every configuration (state and data) reachable from the machine's starts is visited
breadth first, over every event and every payload its domain allows, so each finding
comes with a shortest counterexample: the events that lead there. Found:

- ``unreachable_state``: a state no configuration reaches;
- ``dead_transition``: a transition never enabled in any reachable configuration;
- ``deadlock``: a reachable non-terminal configuration with no enabled transition;
- ``no_completion``: a reachable configuration from which no terminal state can be
  reached any more (a livelock or a trap), whatever events follow;
- ``nondeterminism``: a configuration where one event with one payload enables two
  transitions (their guards both hold);
- ``invariant``: a reachable configuration where a user's invariant does not hold;
- ``property``: a temporal property (``temporal.always``, ``never``, ``eventually``,
  ``leads_to``) that fails, with a run that shows it (no fairness assumed);
- ``guard_error``, ``update_error`` and ``out_of_domain``: a guard or an update that
  raised or read a payload field without a domain (``UNEXPLORED``), an update that
  returned no mapping, or one that left a data field's declared domain (or left a
  field out, or added one);
- ``improper_completion``: with parallel regions (fork/join), a configuration that has
  reached a terminal state while other regions still hold states.

A transition whose activity may fail towards ``failure`` states has both outcomes
explored: its targets (with the update) and its failure states (data unchanged).

With parallel regions a configuration is a marking of the definition's workflow net
(the states it is in, one per running region); it has completed when it is in one
terminal state alone. No deadlock, no configuration that cannot complete, no
improper completion and no dead transition together are workflow-net soundness.

Exploration stops at ``max_configurations`` (the report says it is ``bounded``): what
was found holds, and what needs the whole graph (unreachable, dead, completion) is
not reported, rather than guessed.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..errors import WorkflowDefinitionError
from . import sampling
from .definition import UNEXPLORED, Data, Machine, Payload, payload_fields, unexplored_reads
from .semantics import by_source as _by_source
from .semantics import candidates as _candidates
from .semantics import ended as _ended
from .semantics import final as _final
from .semantics import fire as _fire
from .semantics import fire_to
from .temporal import (
    Fairness,
    Moves,
    Property,
    avoiding_run,
    fair_escape,
    fair_run,
    must_reach,
)

__all__ = [
    "Config",
    "Finding",
    "FindingKind",
    "Report",
    "can_complete",
    "transition_labels",
    "verify",
]

Invariant = Callable[[str, Data], bool]
"""``invariant(state, data)``: must hold in every reachable configuration."""
MAX_CONFIGURATIONS = 1_000_000


class FindingKind(enum.StrEnum):
    UNREACHABLE_STATE = "unreachable_state"
    DEAD_TRANSITION = "dead_transition"
    DEADLOCK = "deadlock"
    NO_COMPLETION = "no_completion"
    NONDETERMINISM = "nondeterminism"
    INVARIANT = "invariant"
    PROPERTY = "property"
    GUARD_ERROR = "guard_error"
    UPDATE_ERROR = "update_error"
    OUT_OF_DOMAIN = "out_of_domain"
    IMPROPER_COMPLETION = "improper_completion"


@dataclass(frozen=True, slots=True)
class Config:
    """A configuration: the states it is in (sorted; several with parallel regions,
    the marking of the definition's workflow net) and the data as sorted (field,
    value) pairs."""

    marking: tuple[str, ...]
    data: tuple[tuple[str, Any], ...]

    @property
    def state(self) -> str:
        """The states, joined by ``+`` (one state's name, without regions): what
        invariants and properties are given."""
        return "+".join(self.marking)

    def values(self) -> Data:
        return MappingProxyType(dict(self.data))

    def __str__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.data)
        return f"{self.state}" + (f" [{shown}]" if shown else "")


@dataclass(frozen=True, slots=True)
class Finding:
    kind: FindingKind
    subject: str
    """The state, transition or invariant it is about."""
    message: str
    trace: tuple[str, ...] = ()
    """The events from a start to where it shows (empty: not about one configuration)."""
    start: str = ""
    """The start configuration of ``trace``."""

    def __str__(self) -> str:
        said = f"{self.kind}: {self.message}"
        if self.start:
            path = " -> ".join(self.trace) if self.trace else "(at the start)"
            said += f"\n    from {self.start}: {path}"
        return said


@dataclass(frozen=True, slots=True)
class Report:
    machine: str
    version: int
    configurations: int
    transitions_fired: int
    """How many of the definition's transitions fired somewhere (each counted once)."""
    findings: tuple[Finding, ...]
    bounded: bool = False
    """Exploration stopped at ``max_configurations``: graph-wide checks were skipped."""
    notes: tuple[str, ...] = field(default_factory=tuple)
    fairness: str = "none"
    """What liveness properties were checked under."""
    sampled: bool = False
    """Some payload fields were explored over sampled values, not all of theirs."""

    @property
    def ok(self) -> bool:
        return not self.findings and not self.bounded

    def of(self, kind: FindingKind) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]


def transition_labels(machine: Machine) -> list[str]:
    """How findings name each transition: ``source --event--> target`` (or its given
    name), with ``#n`` (its place among the machine's transitions) when two share it."""
    plain = [t.label() for t in machine.transitions]
    return [
        label if plain.count(label) == 1 else f"{label} #{i + 1}" for i, label in enumerate(plain)
    ]


def _key(data: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(data.items()))


def _label(event: str, payload: Data) -> str:
    fields = payload_fields(payload) if isinstance(payload, Payload) else payload
    if not fields:
        return event
    return f"{event}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


class _Unexplored:
    """What stands for ``UNEXPLORED`` in a payload's key (the value refuses hashing)."""

    __slots__ = ()


_UNEXPLORED_KEY = _Unexplored()


def _payload_key(payload: Payload) -> tuple[tuple[str, Any], ...]:
    return tuple(
        sorted(
            (k, _UNEXPLORED_KEY if v is UNEXPLORED else v)
            for k, v in payload_fields(payload).items()
        )
    )


def _unexplored_read(payload: Payload, what: str) -> str:
    """Why a guard or update that read a field without a domain is reported, or ""."""
    read = unexplored_reads(payload)
    if not read:
        return ""
    return (
        f"read the payload field {read[0]!r}, which has no declared domain, so {what} "
        f"cannot be explored (declare its values, payload={{{read[0]!r}: [...]}}, or "
        "verify a sample of them, sample=N)"
    )


def _not_data(after: object) -> str:
    """Why an update's result is not data (a mapping of the fields), or ""."""
    if isinstance(after, Mapping):
        return ""
    hint = " (does it forget to return the data?)" if after is None else ""
    return f"returned {after!r}, not the data (a mapping of every field){hint}"


def verify(
    machine: Machine,
    *,
    invariants: Mapping[str, Invariant] | None = None,
    properties: Mapping[str, Property] | None = None,
    max_configurations: int = MAX_CONFIGURATIONS,
    fairness: Fairness | None = None,
    sample: int | None = None,
    seed: int | None = None,
) -> Report:
    """Explore ``machine`` and report what is wrong with it (see the module docstring).
    ``invariants`` and ``properties`` add to those the machine declares; ``fairness``
    (default: the machine's) is what liveness properties assume of runs. ``sample``
    (default: the machine's) values are drawn for each payload field without a finite
    domain, from ``seed`` (``statemachine.sampling``): the report then says the
    exploration covered a sample of them.

    Raises ``WorkflowDefinitionError`` first for what no instance could run with
    (``Machine.check``: a timeout whose event leaves its state nowhere, ``failure=``
    without an activity, activities sharing a step name), as registration does.
    Data fields without a start value are explored from every value of their
    domain (registration asks for start values)."""
    machine.check(starts=False)
    sampled = _sampled(
        machine,
        machine.sample if sample is None else sample,
        machine.seed if seed is None else seed,
    )
    machine, sampling = sampled if sampled is not None else (machine, ())
    fairness = fairness or machine.fairness
    if fairness not in ("none", "strong"):
        raise WorkflowDefinitionError(f"fairness must be 'none' or 'strong', not {fairness!r}")
    initial = machine.initial()
    checks = {**machine.properties, **(properties or {})}
    invariants = {
        **machine.invariants,
        **(invariants or {}),
        **{n: p.p for n, p in checks.items() if p.kind == "always"},
        **{n: _not(p.p) for n, p in checks.items() if p.kind == "never"},
    }
    liveness = {n: p for n, p in checks.items() if p.kind in ("eventually", "leads_to")}
    findings: list[Finding] = []
    seen_kinds: set[tuple[FindingKind, str]] = set()
    parent: dict[Config, tuple[Config, str] | None] = {}
    origin: dict[Config, Config] = {}
    queue: deque[Config] = deque()
    for data in machine.starts():
        start = Config((initial.name,), _key(data))
        if start not in parent:
            parent[start] = None
            origin[start] = start
            queue.append(start)

    def trace(config: Config) -> tuple[str, tuple[str, ...]]:
        steps: list[str] = []
        at: Config | None = config
        while at is not None and (link := parent[at]) is not None:
            at, label = link
            steps.append(label)
        return str(origin[config]), tuple(reversed(steps))

    def found(
        kind: FindingKind,
        subject: str,
        message: str,
        at: Config | None,
        then: tuple[str, ...] = (),
    ) -> None:
        if (kind, subject) in seen_kinds:
            return  # the first (a shortest) counterexample per subject
        seen_kinds.add((kind, subject))
        start, steps = trace(at) if at is not None else ("", ())
        findings.append(Finding(kind, subject, message, steps + then, start))

    labels = transition_labels(machine)
    # Shared by every edge an (event, payload) labels: a string per edge cost more
    # than the rest of the graph. Payloads themselves are made anew for each guard,
    # since a payload remembers the unexplored fields read from it.
    shown = {
        name: [(_label(name, p), f"{_label(name, p)} (activity failed)") for p in e.payloads()]
        for name, e in machine.events.items()
    }
    known: dict[Config, Config] = {c: c for c in parent}
    """Each configuration as first made: an edge keeps that one, not an equal copy."""
    by_source = _by_source(machine)
    reached: set[str] = set()
    fired: set[int] = set()
    edges: dict[Config, dict[Config, str]] = {}
    """Each configuration's successors, with the (first) event that leads there."""
    moves: dict[Config, list[tuple[int, Config, str]]] = {}
    """Each configuration's moves by transition: kept only when fairness needs them."""
    fair = fairness == "strong" and bool(liveness)
    bounded = False
    count = 0
    while queue:
        config = queue.popleft()
        count += 1
        reached.update(config.marking)
        data = config.values()
        for name, holds in invariants.items():
            prop = checks.get(name)
            kind = FindingKind.PROPERTY if prop is not None else FindingKind.INVARIANT
            what = f"{prop.kind} property" if prop is not None else "invariant"
            try:
                ok = bool(holds(config.state, data))
            except Exception as exc:  # noqa: BLE001 - a finding, with its trace
                found(kind, name, f"{what} {name!r} raised {exc!r} in {config}", config)
                continue
            if not ok:
                found(kind, name, f"{what} {name!r} does not hold in {config}", config)
        outs = edges.setdefault(config, {})
        enabled: dict[tuple[str, tuple[tuple[str, Any], ...]], tuple[Payload, list[int]]] = {}
        for index, t in _candidates(by_source, config.marking):
            event = machine.events[t.event]
            for payload, (shown_ok, shown_failed) in zip(
                event.payloads(), shown[t.event], strict=True
            ):
                raised: Exception | None = None
                try:
                    allowed = t.guard is None or bool(t.guard(data, payload))
                except Exception as exc:  # noqa: BLE001 - a finding, with its trace
                    raised = exc
                unexplored = _unexplored_read(payload, "what it decides")
                if unexplored or raised is not None:
                    # An unexplored read is reported even when the guard caught its
                    # error: whatever it returned then was decided on no value.
                    why = unexplored or f"raised {raised!r}"
                    found(
                        FindingKind.GUARD_ERROR,
                        labels[index],
                        f"in {config} on {_label(t.event, payload)}, the guard of "
                        f"{labels[index]} {why}",
                        config,
                    )
                    continue
                if not allowed:
                    continue
                enabled.setdefault((t.event, _payload_key(payload)), (payload, []))[1].append(index)
                fired.add(index)
                try:
                    after = data if t.update is None else t.update(data, payload)
                except Exception as exc:  # noqa: BLE001 - a finding, with its trace
                    after, raised = None, exc
                wrong = _unexplored_read(payload, "the data it makes") or (
                    f"raised {raised!r}" if raised is not None else _not_data(after)
                )
                if wrong:
                    found(
                        FindingKind.UPDATE_ERROR,
                        labels[index],
                        f"in {config} on {_label(t.event, payload)}, the update of "
                        f"{labels[index]} {wrong}",
                        config,
                    )
                    continue
                assert isinstance(after, Mapping)
                wrong = _out_of_domain(machine, after)
                if wrong:
                    found(
                        FindingKind.OUT_OF_DOMAIN,
                        labels[index],
                        f"{labels[index]} on {_label(t.event, payload)} in {config} leaves {wrong}",
                        config,
                    )
                    continue
                outcomes = [(Config(_fire(config.marking, t), _key(after)), shown_ok)]
                if t.failure and machine.actions(t):
                    # Its activity may fail for good: compensated, the machine goes
                    # to the failure states with its data as it was.
                    failed = Config(fire_to(config.marking, t.sources, t.failure), config.data)
                    outcomes.append((failed, shown_failed))
                for made, label in outcomes:
                    target = known.get(made)
                    if target is None:
                        if len(parent) >= max_configurations:
                            # The graph is not used once bounded: no edge kept.
                            bounded = True
                            continue
                        target = known[made] = made
                        parent[target] = (config, label)
                        origin[target] = origin[config]
                        queue.append(target)
                    outs.setdefault(target, label)
                    if fair:
                        moves.setdefault(config, []).append((index, target, label))
        for (event_name, _), (payload, ts) in enabled.items():
            if len(ts) > 1:
                label = _label(event_name, payload)
                found(
                    FindingKind.NONDETERMINISM,
                    f"{config.state} on {event_name}",
                    f"in {config}, {label} enables {len(ts)} transitions: "
                    + ", ".join(labels[i] for i in ts),
                    config,
                )
        terminal = _final(machine, config.marking)
        if not terminal and _ended(machine, config.marking):
            found(
                FindingKind.IMPROPER_COMPLETION,
                config.state,
                f"{config} has reached an end while other regions still run",
                config,
            )
        if not terminal and not enabled:
            found(
                FindingKind.DEADLOCK,
                config.state,
                f"{config} is not terminal and no event can move it",
                config,
            )
    notes: list[str] = [
        _explored(machine, max_configurations),
        *sampling,
        *_likely_typos(machine),
    ]
    if bounded:
        notes.append(
            f"stopped at {max_configurations} configurations: unreachable states, dead "
            "transitions, completion and liveness were not checked"
        )
    else:
        for state in machine.states:
            if state not in reached:
                found(
                    FindingKind.UNREACHABLE_STATE, state, f"state {state!r} is never reached", None
                )
        for index, label in enumerate(labels):
            if index not in fired:
                found(
                    FindingKind.DEAD_TRANSITION,
                    label,
                    f"{label} is never enabled in a reachable configuration",
                    None,
                )
        _completion(machine, parent, edges, found)
        if liveness and fairness == "strong":
            notes.append(
                "liveness checked under strong fairness: a transition enabled infinitely "
                "often is taken infinitely often, so only a fair cycle that avoids the "
                "goal (or a run that stops) is a counterexample"
            )
        elif liveness:
            notes.append(
                "liveness checked with no fairness: a run may loop forever, so a cycle "
                "that avoids the goal is a counterexample (fairness='strong' assumes "
                "a transition enabled again and again is taken some day)"
            )
        if liveness:
            _liveness(liveness, parent, edges, moves, fairness, found)
    return Report(
        machine.name,
        machine.version,
        count,
        len(fired),
        tuple(findings),
        bounded,
        tuple(notes),
        fairness,
        bool(sampling),
    )


def _likely_typos(machine: Machine) -> list[str]:
    """Events only transitions name, close to a declared one: a sender of the
    declared name would be refused (the machine is consistent, so nothing else
    catches it)."""
    declared = [e for e in machine.events if e not in machine.implicit_events]
    said = []
    for name in sorted(machine.implicit_events):
        close = difflib.get_close_matches(name, declared, n=1, cutoff=0.8)
        if close:
            said.append(
                f"event {name!r} is named by a transition but never declared: did you "
                f"mean {close[0]!r}?"
            )
    return said


def _sampled(machine: Machine, count: int, seed: int) -> tuple[Machine, tuple[str, ...]] | None:
    """A copy of ``machine`` whose unexplored payload fields take ``count`` values
    drawn by hypothesis, and what the report says of each; None if there is nothing
    to sample (or ``count`` is 0)."""
    if count <= 0:
        return None
    events = dict(machine.events)
    said: list[str] = []
    for name, event in machine.events.items():
        payload = dict(event.payload)
        drawn = False
        for k, domain in event.payload.items():
            if not (len(domain) == 1 and domain[0] is UNEXPLORED):  # (== would refuse)
                continue
            drawn = True
            strategy = event.strategies.get(k)
            if strategy is None:
                strategy = sampling.strategy_for(name, event.type, k)
            payload[k] = sampling.draw(strategy, count, seed)
            said.append(
                f"{name}.{k} sampled, not exhausted: {len(payload[k])} values drawn by "
                f"hypothesis from {strategy!r} (seed {seed}); findings hold for them only"
            )
        if drawn:
            events[name] = dataclasses.replace(event, payload=MappingProxyType(payload))
    if not said:
        return None
    copied = copy.copy(machine)
    copied.events = events
    return copied, tuple(said)


def _explored(machine: Machine, bound: int) -> str:
    """What the exploration covered: each data and payload field's declared domain
    (the report's claims hold over these values only) and the bound."""
    fields = [f"{k} ({_values(v)})" for k, v in machine.domains.items()]
    for event in machine.events.values():
        for k, v in event.payload.items():
            unexplored = any(value is UNEXPLORED for value in v)
            fields.append(f"{event.name}.{k} ({'unexplored' if unexplored else _values(v)})")
    over = "; ".join(fields) if fields else "no data or payload fields"
    return f"explored over the declared domains: {over}; bound {bound:,} configurations"


def _values(domain: tuple[Any, ...]) -> str:
    return f"{len(domain)} value" + ("" if len(domain) == 1 else "s")


def _out_of_domain(machine: Machine, after: Mapping[str, Any]) -> str:
    missing = sorted(set(machine.domains) - set(after))
    if missing:
        return f"out the data fields {missing} (an update returns every field)"
    extra = sorted(set(after) - set(machine.domains))
    if extra:
        return f"data fields {extra} the machine does not declare"
    for k, v in after.items():
        try:
            inside = v is not UNEXPLORED and v in machine.domains[k]
        except Exception as exc:  # noqa: BLE001 - a value its domain cannot be compared with
            return f"{k}={v!r}, which cannot be compared with its domain ({exc!r})"
        if not inside:
            return f"{k}={v!r} outside its domain"
    return ""


def _completion(
    machine: Machine,
    parent: Mapping[Config, object],
    edges: Mapping[Config, Mapping[Config, str]],
    found: Callable[[FindingKind, str, str, Config | None], None],
) -> None:
    """Every reachable configuration must still be able to reach a terminal one."""
    back: dict[Config, list[Config]] = {}
    for source, targets in edges.items():
        for target in targets:
            back.setdefault(target, []).append(source)
    done = {c for c in parent if _final(machine, c.marking)}
    todo = deque(done)
    while todo:
        for source in back.get(todo.popleft(), ()):
            if source not in done:
                done.add(source)
                todo.append(source)
    for config in parent:  # in discovery order: the first has a shortest trace
        if config not in done and edges.get(config):
            found(
                FindingKind.NO_COMPLETION,
                config.state,
                f"from {config} no terminal state can be reached any more",
                config,
            )


def _not(p: Callable[[str, Data], bool]) -> Callable[[str, Data], bool]:
    return lambda state, data: not p(state, data)


def _evaluated(
    p: Callable[[str, Data], bool], configs: list[Config]
) -> tuple[dict[Config, bool], tuple[Config, Exception] | None]:
    """``p`` on every configuration, or where it first raised (in discovery order: a
    shortest trace). One that raises is reported as such, not taken as false: a
    counterexample built on it would show a run the property never judged."""
    holds: dict[Config, bool] = {}
    for config in configs:
        try:
            holds[config] = bool(p(config.state, config.values()))
        except Exception as exc:  # noqa: BLE001 - a finding, with its trace
            return holds, (config, exc)
    return holds, None


def _liveness(
    liveness: Mapping[str, Property],
    parent: Mapping[Config, object],
    edges: Mapping[Config, Mapping[Config, str]],
    moves: Mapping[Config, list[tuple[int, Config, str]]],
    fairness: Fairness,
    found: Callable[..., None],
) -> None:
    configs = list(parent)  # discovery order: the first failure has a shortest prefix
    graph: Mapping[object, Mapping[object, str]] = edges  # type: ignore[assignment]
    fired: Moves = moves  # type: ignore[assignment]
    for name, prop in liveness.items():
        goal = prop.q if prop.kind == "leads_to" else prop.p
        assert goal is not None
        judged = [("its goal", goal)]
        if prop.kind == "leads_to":
            judged.insert(0, ("its trigger", prop.p))
        tables: list[dict[Config, bool]] = []
        for which, pred in judged:
            table, raised = _evaluated(pred, configs)
            if raised is not None:
                at, exc = raised
                found(
                    FindingKind.PROPERTY,
                    name,
                    f"{prop.kind} property {name!r}: {which} raised {exc!r} in {at}",
                    at,
                )
                break
            tables.append(table)
        else:
            _counterexample(name, prop, tables, parent, configs, graph, fired, fairness, found)


def _counterexample(
    name: str,
    prop: Property,
    tables: list[dict[Config, bool]],
    parent: Mapping[Config, object],
    configs: list[Config],
    graph: Mapping[object, Mapping[object, str]],
    fired: Moves,
    fairness: Fairness,
    found: Callable[..., None],
) -> None:
    goal = tables[-1]

    def reached(config: object) -> bool:
        return goal[config]  # type: ignore[index]

    if fairness == "strong":
        escaping, stops, cycles = fair_escape(configs, fired, reached)
    else:
        inside = must_reach(configs, graph, reached)
    if prop.kind == "eventually":
        suspects = [c for c in configs if parent[c] is None]
    else:
        suspects = [c for c in configs if tables[0][c]]
    for config in suspects:
        if fairness == "strong":
            if config not in escaping:
                continue
            then, ending = fair_run(config, fired, escaping, stops, cycles, str)
        else:
            if config in inside:
                continue
            then, ending = avoiding_run(config, graph, inside, str)
        what = (
            "not every run from the start reaches its goal"
            if prop.kind == "eventually"
            else f"from {config}, not every run reaches its goal"
        )
        found(
            FindingKind.PROPERTY,
            name,
            f"{prop.kind} property {name!r}: {what}: a run {ending}",
            config,
            then,
        )
        break


def can_complete(
    machine: Machine,
    marking: tuple[str, ...],
    data: Mapping[str, Any],
    *,
    max_configurations: int = MAX_CONFIGURATIONS,
) -> tuple[bool | None, str]:
    """Whether some run from this configuration reaches completion (a terminal state
    alone), exploring as ``verify`` does: True, or False with why, or None if the
    exploration stopped at ``max_configurations`` first. Guards that raise, guards
    and updates that read a field without a domain, and updates that return no data
    or leave the domains are not taken (what ``verify`` reports)."""
    by_source = _by_source(machine)
    start = Config(tuple(sorted(marking)), _key(data))
    seen = {start}
    queue = deque([start])
    while queue:
        config = queue.popleft()
        if _final(machine, config.marking):
            return True, ""
        values = config.values()
        for _, t in _candidates(by_source, config.marking):
            for payload in machine.events[t.event].payloads():
                try:
                    if t.guard is not None and not t.guard(values, payload):
                        continue
                    after = values if t.update is None else t.update(values, payload)
                except Exception:  # noqa: BLE001, S112 - a move that cannot happen
                    continue
                if unexplored_reads(payload) or _not_data(after) or _out_of_domain(machine, after):
                    continue  # as verify reports them: moves it does not explore
                moves = [Config(_fire(config.marking, t), _key(after))]
                if t.failure and machine.actions(t):
                    moves.append(Config(fire_to(config.marking, t.sources, t.failure), config.data))
                for target in moves:
                    if target in seen:
                        continue
                    if len(seen) >= max_configurations:
                        return None, (
                            f"could not show it can complete within {max_configurations} "
                            "configurations"
                        )
                    seen.add(target)
                    queue.append(target)
    return False, (
        f"from {start} no terminal state of v{machine.version} can be reached "
        f"({len(seen)} configurations explored)"
    )
