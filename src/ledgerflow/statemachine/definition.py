"""Declaring a state machine: states, events with finite payload domains, guarded
transitions over finite data.

A definition is a value: it runs nothing and touches no store. ``verify`` explores
every configuration it can reach (its state and its data), so whatever a guard or an
update reads must range over a finite domain the definition declares: each data
field and each event payload field lists its possible values.

    order = Machine("order", version=1, data={"stock": range(0, 3)}, initial_data={"stock": 2})
    order.state("created", initial=True)
    order.state("approved")
    order.state("placed", terminal=True)
    order.state("rejected", terminal=True)
    order.event("approve", payload={"approver": ["alice", "bob"]})
    order.transition("created", "approve", "approved")
    order.transition("created", "reject", "rejected")
    order.transition(
        "approved", "place", "placed",
        guard=lambda data, payload: data["stock"] > 0,
        update=lambda data, payload: {**data, "stock": data["stock"] - 1},
    )
"""

from __future__ import annotations

import itertools
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from ..errors import WorkflowDefinitionError
from .sampling import is_strategy

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

    from .instance import MachineCall
    from .temporal import Property

__all__ = [
    "UNEXPLORED",
    "Activity",
    "Data",
    "Event",
    "Guard",
    "Machine",
    "Payload",
    "State",
    "Transition",
    "UnexploredFieldError",
    "Update",
    "payload_fields",
    "unexplored_reads",
]

Data = Mapping[str, Any]
Guard = Callable[[Data, Any], bool]
"""``guard(data, payload)``: whether the transition may fire. The payload is a
``Payload``: its fields read by key or by attribute, so a guard may annotate it with
the event's declared type (``def big(data: Data, p: Payment) -> bool: return
p.amount >= 100``) and have mypy check the fields it reads."""
Update = Callable[[Data, Any], Mapping[str, Any]]
"""``update(data, payload)``: the data after the transition (every field)."""


class UnexploredFieldError(TypeError):
    """A guard or an update read a payload field verification has no values for (a
    typed field without a domain, not sampled): what it decides cannot be explored."""

    def __init__(self, field: str | None) -> None:
        named = repr(field) if field is not None else "field"
        super().__init__(
            f"payload {'field ' + named if field is not None else 'field'} has no "
            f"declared domain and was read: declare its values (payload={{{named}: "
            "[...]}) or verify a sample of them (sample=N)"
        )
        self.field = field
        """The field read, if known (None: an ``UNEXPLORED`` value used elsewhere)."""


class Payload(Mapping[str, Any]):
    """An event's payload as guards and updates see it, at run time and in
    verification alike: read-only, its fields by key (``p["amount"]``) or by attribute
    (``p.amount``). Field values are as sent (JSON values: an ``Enum`` field holds its
    value, a nested type a mapping).

    In verification a field without a domain holds ``UNEXPLORED``, and reading it
    raises ``UnexploredFieldError``: the read itself is refused (and remembered, see
    ``unexplored_reads``), not the value's operations, because ``is None``,
    ``isinstance`` and identity tests cannot be intercepted on a value."""

    __slots__ = ("_fields", "_unexplored")
    _fields: dict[str, Any]
    _unexplored: tuple[str, ...]

    def __init__(self, fields: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_fields", dict(fields))
        object.__setattr__(self, "_unexplored", ())

    def _read(self, name: str) -> Any:
        value = self._fields[name]
        if value is UNEXPLORED:
            # Remembered as well as raised: a guard that catches the error (or
            # hasattr, getattr with a default) would otherwise decide unnoticed.
            object.__setattr__(self, "_unexplored", (*self._unexplored, name))
            raise UnexploredFieldError(name)
        return value

    def __getitem__(self, name: str) -> Any:
        return self._read(name)

    def __contains__(self, name: object) -> bool:
        # Mapping's would read the value: asking whether a field is there is not.
        return name in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __getattr__(self, name: str) -> Any:
        if name not in self._fields:
            raise AttributeError(f"the payload has no field {name!r}")
        return self._read(name)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("a payload is read-only")

    def __repr__(self) -> str:
        return f"Payload({self._fields!r})"


def unexplored_reads(payload: Payload) -> tuple[str, ...]:
    """The fields without a domain a guard or update read from ``payload`` (in the
    order read, repeats included), whether or not it let the error through."""
    return payload._unexplored


def payload_fields(payload: Payload) -> Mapping[str, Any]:
    """The payload's fields, ``UNEXPLORED`` ones included, without reading them as a
    guard would (for verification's labels and keys)."""
    return MappingProxyType(payload._fields)


Activity: TypeAlias = "Callable[[MachineCall], Any]"
"""A step function (``def`` or ``async def``, optionally ``@ledgerflow.step(...)``
for its name, policy, queue and compensation), called with one ``MachineCall``: one
that takes anything else fails ``mypy --strict`` where the machine is declared."""
Undo: TypeAlias = Callable[..., Any]
"""A compensation: called with the activity's ``MachineCall`` and, if it takes it,
``result=`` (what the activity returned)."""


@dataclass(frozen=True, slots=True)
class State:
    name: str
    initial: bool = False
    terminal: bool = False
    on_enter: Activity | None = None
    """Run (as a step) by every transition that enters the state."""
    on_exit: Activity | None = None
    """Run (as a step) by every transition that leaves the state."""
    timeout: timedelta | None = None
    """How long an instance may stay: then ``on_timeout`` is sent to it (once per
    entry), by a durable timer."""
    on_timeout: str | None = None


@dataclass(frozen=True, slots=True)
class Event:
    name: str
    payload: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    """Each payload field and the values verification explores."""
    type: Any = None
    """The payload's type (a ``msgspec.Struct`` or dataclass), if declared: what a
    sent payload is checked against."""
    strategies: Mapping[str, Any] = field(default_factory=dict)
    """Hypothesis strategies given for fields (``payload={"amount": st.integers()}``):
    the fields are ``UNEXPLORED`` unless verification samples them."""

    def payloads(self) -> Iterator[Payload]:
        """Every payload the event may carry (one empty payload if it has none)."""
        names = list(self.payload)
        for values in itertools.product(*(self.payload[n] for n in names)):
            yield Payload(dict(zip(names, values, strict=True)))


@dataclass(frozen=True, slots=True)
class Transition:
    """``source --event--> target``. A fork has several targets (each a region that
    runs on its own), a join several sources (all must be reached before it fires):
    ``sources``/``targets`` hold them, ``source``/``target`` the names joined by
    ``+``."""

    source: str
    event: str
    target: str
    guard: Guard | None = None
    update: Update | None = None
    name: str = ""
    """How findings name it: ``source --event--> target`` unless given."""
    sources: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    activity: Activity | None = None
    """Run as a step (its policy, retries, queue) when the transition fires; the
    machine moves once it succeeded."""
    compensate: Undo | None = None
    """Undoes ``activity`` (called with its ``MachineCall`` and ``result=``) when a
    later transition fails towards ``failure`` states or the instance is cancelled;
    the activity's own ``@step(compensate=...)`` otherwise."""
    failure: tuple[str, ...] = ()
    """Where the machine goes if an activity of the transition fails for good, after
    the compensations of every completed activity ran (newest first). Without it the
    machine stays where it was and the event's sender gets the error."""

    def label(self) -> str:
        return self.name or f"{self.source} --{self.event}--> {self.target}"


class Machine:
    """A state-machine definition under construction (see the module docstring)."""

    def __init__(
        self,
        name: str,
        *,
        version: int = 1,
        data: Mapping[str, Iterable[Any]] | None = None,
        initial_data: Mapping[str, Any] | None = None,
        input: Any = Any,
        start_data: Callable[[Any], Mapping[str, Any]] | None = None,
        fairness: str = "none",
        sample: int = 0,
        seed: int = 0,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise WorkflowDefinitionError("a state machine needs a non-empty name")
        if version < 1:
            raise WorkflowDefinitionError(f"machine {name!r}: version must be >= 1")
        self.name = name
        self.version = version
        self.domains: dict[str, tuple[Any, ...]] = {
            k: _domain(name, f"data field {k!r}", v) for k, v in (data or {}).items()
        }
        given = dict(initial_data or {})
        unknown = set(given) - set(self.domains)
        if unknown:
            raise WorkflowDefinitionError(
                f"machine {name!r}: initial data for undeclared fields {sorted(unknown)}"
            )
        for k, v in given.items():
            if v not in self.domains[k]:
                raise WorkflowDefinitionError(
                    f"machine {name!r}: initial {k}={v!r} is not in its domain"
                )
        self.initial_data = given
        """Fields not given start at every value of their domain (each a start); a
        running instance takes them from ``start_data(input)``."""
        self.input_type: Any = input
        """The type of an instance's input (``engine.start(machine, input)``)."""
        self.start_data = start_data
        if fairness not in ("none", "strong"):
            raise WorkflowDefinitionError(
                f"machine {name!r}: fairness must be 'none' or 'strong', not {fairness!r}"
            )
        self.fairness: Literal["none", "strong"] = "strong" if fairness == "strong" else "none"
        """What its liveness properties assume of runs (``temporal.Fairness``)."""
        if not isinstance(sample, int) or sample < 0 or not isinstance(seed, int):
            raise WorkflowDefinitionError(
                f"machine {name!r}: sample must be an int >= 0 and seed an int"
            )
        self.sample = sample
        """Values verification draws for each payload field without a finite domain
        (``statemachine.sampling``); 0: they are not explored."""
        self.seed = seed
        self.states: dict[str, State] = {}
        self.events: dict[str, Event] = {}
        self.implicit_events: set[str] = set()
        """Events first named by a transition (declared then, without payload): a
        name close to a declared one is likely a typo, and ``verify`` says so."""
        self.transitions: list[Transition] = []
        self.invariants: dict[str, Callable[[str, Data], bool]] = {}
        """What must hold in every reachable configuration: ``verify`` checks them."""
        self.properties: dict[str, Property] = {}
        """Temporal properties (``statemachine.temporal``) ``verify`` checks."""

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)

    def lacks(self, marking: Iterable[str]) -> list[str]:
        """The states of ``marking`` this definition has not (a deploy renamed or
        removed them in place), in the marking's order."""
        return [s for s in marking if s not in self.states]

    @property
    def output_type(self) -> Any:
        from .instance import MachineOutcome  # the runtime's type; definitions need not load it

        return MachineOutcome

    def state(
        self,
        name: str,
        *,
        initial: bool = False,
        terminal: bool = False,
        on_enter: Activity | None = None,
        on_exit: Activity | None = None,
        timeout: timedelta | None = None,
        on_timeout: str | None = None,
    ) -> State:
        if not isinstance(name, str) or not name:
            raise WorkflowDefinitionError(f"machine {self.name!r}: a state needs a name")
        if name in self.states:
            raise WorkflowDefinitionError(f"machine {self.name!r}: state {name!r} twice")
        if initial and any(s.initial for s in self.states.values()):
            raise WorkflowDefinitionError(f"machine {self.name!r}: two initial states")
        if initial and terminal:
            raise WorkflowDefinitionError(
                f"machine {self.name!r}: state {name!r} cannot be initial and terminal"
            )
        if (timeout is None) != (on_timeout is None):
            raise WorkflowDefinitionError(
                f"machine {self.name!r}: state {name!r} needs both timeout= and on_timeout= "
                "(the event its timeout sends)"
            )
        if timeout is not None and (not isinstance(timeout, timedelta) or timeout <= timedelta(0)):
            raise WorkflowDefinitionError(
                f"machine {self.name!r}: state {name!r} timeout must be a positive timedelta"
            )
        if terminal and (timeout is not None or on_exit is not None):
            raise WorkflowDefinitionError(
                f"machine {self.name!r}: terminal state {name!r} is never left "
                "(no timeout, no on_exit)"
            )
        for which, fn in (("on_enter", on_enter), ("on_exit", on_exit)):
            if fn is not None and not callable(fn):
                raise WorkflowDefinitionError(
                    f"machine {self.name!r}: state {name!r} {which} must be a function"
                )
        made = self.states[name] = State(
            name, initial, terminal, on_enter, on_exit, timeout, on_timeout
        )
        return made

    def event(
        self,
        name: str,
        *,
        payload: Mapping[str, Iterable[Any] | SearchStrategy[Any]] | None = None,
        type: Any = None,
    ) -> Event:
        """Declare an event and its payload: ``payload`` lists the values each field
        takes in verification; ``type`` (a ``msgspec.Struct`` or dataclass) is what a
        sent payload must fit. With a type, fields typed ``Literal``, ``bool`` or an
        ``Enum`` (optional or not) get their domains from it; a field with neither
        is explored as ``UNEXPLORED``, which a guard cannot compare (a
        ``guard_error`` finding says to declare its domain), unless verification
        samples it (``sample=``: values drawn by hypothesis from its type, or from a
        strategy given here as its ``payload`` entry)."""
        if name in self.events:
            raise WorkflowDefinitionError(f"machine {self.name!r}: event {name!r} twice")
        given = dict(payload or {})
        strategies = {k: v for k, v in given.items() if is_strategy(v)}
        domains = {
            k: (UNEXPLORED,)
            if k in strategies
            else _domain(self.name, f"payload field {k!r} of {name!r}", v)
            for k, v in given.items()
        }
        if type is not None:
            domains = _typed_domains(self.name, name, type, domains)
        made = self.events[name] = Event(
            name, MappingProxyType(domains), type, MappingProxyType(strategies)
        )
        return made

    def transition(
        self,
        source: str | Sequence[str],
        event: str,
        target: str | Sequence[str],
        *,
        guard: Guard | None = None,
        update: Update | None = None,
        name: str = "",
        activity: Activity | None = None,
        compensate: Undo | None = None,
        failure: str | Sequence[str] = (),
    ) -> Transition:
        """``source --event--> target``; an event not declared with ``event`` is one
        without payload. Several targets fork parallel regions; several sources join
        them (the transition fires once every one of them is reached).

        ``activity`` runs as a step when it fires (with the policy, queue and
        compensation its ``@step`` gives it; ``compensate`` here wins); ``failure``
        names where to go if an activity fails for good, after compensating."""
        sources = (source,) if isinstance(source, str) else tuple(source)
        targets = (target,) if isinstance(target, str) else tuple(target)
        if not sources or not targets:
            raise WorkflowDefinitionError(
                f"machine {self.name!r}: a transition needs a source and a target"
            )
        for which in (*sources, *targets):
            if which not in self.states:
                raise WorkflowDefinitionError(
                    f"machine {self.name!r}: transition on undeclared state {which!r}"
                )
        for which in sources:
            if self.states[which].terminal:
                raise WorkflowDefinitionError(
                    f"machine {self.name!r}: terminal state {which!r} has no way out"
                )
        failures = (failure,) if isinstance(failure, str) else tuple(failure)
        for which in failures:
            if which not in self.states:
                raise WorkflowDefinitionError(
                    f"machine {self.name!r}: failure state {which!r} is not declared"
                )
        for which, fn in (("activity", activity), ("compensate", compensate)):
            if fn is not None and not callable(fn):
                raise WorkflowDefinitionError(
                    f"machine {self.name!r}: transition {which} must be a function"
                )
        if compensate is not None and activity is None:
            raise WorkflowDefinitionError(
                f"machine {self.name!r}: compensate= needs an activity= to undo"
            )
        if event not in self.events:
            self.event(event)
            self.implicit_events.add(event)
        made = Transition(
            "+".join(sources),
            event,
            "+".join(targets),
            guard,
            update,
            name,
            sources,
            targets,
            activity,
            compensate,
            failures,
        )
        self.transitions.append(made)
        return made

    def invariant(self, name: str, holds: Callable[[str, Data], bool]) -> None:
        """Declare ``holds(state, data)`` true of every reachable configuration."""
        if name in self.invariants:
            raise WorkflowDefinitionError(f"machine {self.name!r}: invariant {name!r} twice")
        self.invariants[name] = holds

    def property(self, name: str, prop: Property) -> None:
        """Declare a temporal property: ``always(p)``, ``never(p)``, ``eventually(p)``
        or ``leads_to(p, q)`` (``statemachine.temporal``)."""
        if name in self.properties or name in self.invariants:
            raise WorkflowDefinitionError(f"machine {self.name!r}: property {name!r} twice")
        self.properties[name] = prop

    def actions(self, t: Transition) -> list[tuple[Activity, Undo | None]]:
        """What firing ``t`` runs, in order, each with its compensation: the exit
        activities of the states it leaves, its activity, the entry activities of
        the states it enters."""
        found: list[tuple[Activity, Undo | None]] = []
        for source in t.sources:
            if (fn := self.states[source].on_exit) is not None:
                found.append((fn, None))
        if t.activity is not None:
            found.append((t.activity, t.compensate))
        for target in t.targets:
            if (fn := self.states[target].on_enter) is not None:
                found.append((fn, None))
        return found

    def check(self, *, starts: bool = True) -> None:
        """What an instance needs of the definition beyond what ``verify`` explores:
        a timeout's event moves its state, a failure target has something to fail,
        every data field has a start value, and no two functions share a step name
        (compensations are found by it). ``WorkflowDefinitionError`` lists what is
        wrong. ``starts=False`` leaves out the start values: ``verify`` explores
        every value of a field's domain as a start where none is given."""
        problems: list[str] = []
        try:
            self.initial()
        except WorkflowDefinitionError as exc:
            problems.append(str(exc))
        for state in self.states.values():
            if state.on_timeout is None:
                continue
            if not any(
                state.name in t.sources and t.event == state.on_timeout for t in self.transitions
            ):
                problems.append(
                    f"state {state.name!r} times out with {state.on_timeout!r}, but no "
                    f"transition leaves it on that event"
                )
            sent = self.events.get(state.on_timeout)
            if sent is not None and (sent.payload or sent.strategies or sent.type is not None):
                # A timeout sends its event with an empty payload: refused, the state
                # would never time out again (a timeout fires once per entry).
                problems.append(
                    f"state {state.name!r} times out with {state.on_timeout!r}, whose "
                    "payload has fields, but a timeout sends no payload: time out with an "
                    "event of its own"
                )
        for t in self.transitions:
            if t.failure and not self.actions(t):
                problems.append(f"{t.label()} has failure= but no activity that can fail")
        missing = [k for k in self.domains if k not in self.initial_data]
        if starts and missing and self.start_data is None:
            problems.append(
                f"data fields {missing} have no start value: give initial_data= or "
                "start_data=(input -> data)"
            )
        # Here, not at the top: the workflow package loads its engine, which loads
        # this module (a definition is a value; it needs steps' names only here).
        from ..workflow.definition import step_options

        names: dict[str, Activity] = {}
        for fn in self._functions():
            name = step_options(fn).name
            if names.setdefault(name, fn) is not fn:
                problems.append(f"two activities share the step name {name!r}")
        if problems:
            listed = "\n".join(f"  {p}" for p in problems)
            raise WorkflowDefinitionError(f"machine {self.name!r} v{self.version}:\n{listed}")

    def _functions(self) -> Iterator[Activity]:
        for state in self.states.values():
            yield from (fn for fn in (state.on_enter, state.on_exit) if fn is not None)
        for t in self.transitions:
            yield from (fn for fn in (t.activity, t.compensate) if fn is not None)

    def initial(self) -> State:
        found = [s for s in self.states.values() if s.initial]
        if not found:
            raise WorkflowDefinitionError(f"machine {self.name!r} has no initial state")
        return found[0]

    def starts(self) -> Iterator[Data]:
        """Every data the machine may start with: given fields fixed, the others over
        their domains."""
        free = [k for k in self.domains if k not in self.initial_data]
        for values in itertools.product(*(self.domains[k] for k in free)):
            yield MappingProxyType({**self.initial_data, **dict(zip(free, values, strict=True))})


def _domain(machine: str, what: str, values: object) -> tuple[Any, ...]:
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise WorkflowDefinitionError(
            f"machine {machine!r}: {what} needs a finite domain (a list or range of values)"
        )
    domain = tuple(values)
    if not domain:
        raise WorkflowDefinitionError(f"machine {machine!r}: {what} has an empty domain")
    return domain


class _Unexplored:
    """The one value verification gives a typed payload field without a domain.
    Reading the field through ``Payload`` is refused already; the value also
    refuses every operation a decision could be made on, should it get out some
    other way (a copy of the payload's values): comparing, hashing, truth, size,
    iteration, membership, conversion, formatting and arithmetic. Only ``repr`` (for
    reports) and identity remain, and copies are itself."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNEXPLORED"

    def __reduce__(self) -> str:
        return "UNEXPLORED"

    def __copy__(self) -> _Unexplored:
        return self

    def __deepcopy__(self, memo: object) -> _Unexplored:
        return self

    def _refuse(self, *args: object) -> typing.NoReturn:
        raise UnexploredFieldError(None)

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse
    __hash__ = __bool__ = __len__ = __iter__ = __contains__ = __getitem__ = _refuse
    __str__ = __format__ = __bytes__ = __index__ = __int__ = __float__ = _refuse
    __complex__ = __round__ = __trunc__ = __floor__ = __ceil__ = __abs__ = _refuse
    __neg__ = __pos__ = __invert__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _refuse
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = _refuse
    __mod__ = __rmod__ = __divmod__ = __rdivmod__ = __pow__ = __rpow__ = _refuse
    __and__ = __rand__ = __or__ = __ror__ = __xor__ = __rxor__ = _refuse
    __lshift__ = __rlshift__ = __rshift__ = __rrshift__ = __matmul__ = __rmatmul__ = _refuse
    __getattr__ = _refuse


UNEXPLORED: Any = _Unexplored()


def _typed_domains(
    machine: str, event: str, kind: Any, declared: dict[str, tuple[Any, ...]]
) -> dict[str, tuple[Any, ...]]:
    import msgspec  # here: only typed payloads need it at declaration

    try:
        info = msgspec.inspect.type_info(kind)
    except (TypeError, ValueError) as exc:
        raise WorkflowDefinitionError(
            f"machine {machine!r}: payload type of {event!r} is not usable: {exc}"
        ) from None
    fields = getattr(info, "fields", None)
    if fields is None:
        raise WorkflowDefinitionError(
            f"machine {machine!r}: payload type of {event!r} must be a msgspec.Struct or "
            "a dataclass"
        )
    names = {f.name for f in fields}
    unknown = set(declared) - names
    if unknown:
        raise WorkflowDefinitionError(
            f"machine {machine!r}: payload of {event!r} declares fields {sorted(unknown)} "
            f"its type {getattr(kind, '__qualname__', kind)} does not have"
        )
    hints = typing.get_type_hints(kind, include_extras=True)
    for f in fields:
        listed = [v for v in declared.get(f.name, ()) if v is not UNEXPLORED]
        wanted = hints.get(f.name, Any)
        wrong = [v for v in listed if not _fits(v, wanted)]
        if wrong:
            # Explored, they were values no sender could ever get past the type.
            raise WorkflowDefinitionError(
                f"machine {machine!r}: payload field {f.name!r} of {event!r} lists "
                f"{', '.join(repr(v) for v in wrong)}, which its type does not allow"
            )
    found = dict(declared)
    for f in fields:
        if f.name not in found:
            found[f.name] = _values_of(f.type) or (UNEXPLORED,)
    return found


def _fits(value: Any, wanted: Any) -> bool:
    import msgspec

    try:
        msgspec.convert(value, wanted)
    except (msgspec.ValidationError, TypeError):
        return False
    return True


def _values_of(info: Any) -> tuple[Any, ...] | None:
    """The JSON values a field of this type takes, if they are few and known."""
    import msgspec

    if isinstance(info, msgspec.inspect.LiteralType):
        return tuple(info.values)
    if isinstance(info, msgspec.inspect.BoolType):
        return (False, True)
    if isinstance(info, msgspec.inspect.EnumType):
        return tuple(member.value for member in info.cls)
    if isinstance(info, msgspec.inspect.NoneType):
        return (None,)
    if isinstance(info, msgspec.inspect.UnionType):
        parts = [_values_of(t) for t in info.types]
        if all(p is not None for p in parts):
            return tuple(v for p in parts if p is not None for v in p)
    return None
