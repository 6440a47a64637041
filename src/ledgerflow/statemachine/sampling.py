"""Payload fields without a finite domain, sampled for verification.

Exhaustive exploration needs every payload field's values. A field typed ``int`` or
``str`` has too many: by default verification marks it ``UNEXPLORED`` and a guard
that reads it is reported. With ``sample=N`` (``verify``, ``Machine``, ``ledgerflow
verify --sample``) such fields take N values drawn by hypothesis instead, from the
strategy the event declares for the field (``payload={"amount":
st.integers(0, 10_000)}``) or else from the field's type (``st.from_type``). The
draw is reproducible (``seed``) and hypothesis favours edge cases (0, negatives,
bounds, empty strings), but it is a sample: the report says so, and a sound verdict
then holds for the sampled values only.
"""

from __future__ import annotations

import typing
from typing import Any

from ..errors import WorkflowDefinitionError

__all__ = ["draw", "is_strategy", "strategy_for"]


def is_strategy(value: object) -> bool:
    """Whether ``value`` is a hypothesis strategy (without importing hypothesis when
    nothing uses it)."""
    return any(c.__module__.startswith("hypothesis.") for c in type(value).__mro__)


_MISSING = "sampling payload fields needs hypothesis: pip install 'ledgerflow[verify]'"


def strategy_for(event: str, payload_type: Any, field: str) -> Any:
    """The strategy of ``field`` of ``payload_type`` (a Struct or dataclass): values
    of its annotated type."""
    try:
        from hypothesis import strategies
    except ImportError:
        raise WorkflowDefinitionError(_MISSING) from None
    try:
        hint = typing.get_type_hints(payload_type)[field]
    except (KeyError, NameError, TypeError) as exc:
        raise WorkflowDefinitionError(
            f"payload field {field!r} of {event!r}: no type to sample values from ({exc})"
        ) from None
    return strategies.from_type(hint)


def draw(strategy: Any, count: int, seed: int) -> tuple[Any, ...]:
    """Up to ``count`` distinct values of ``strategy``, the same ones for the same
    seed (fewer if the strategy has fewer)."""
    try:
        import hypothesis
    except ImportError:
        raise WorkflowDefinitionError(_MISSING) from None
    found: list[Any] = []

    @hypothesis.seed(seed)
    @hypothesis.settings(
        max_examples=count * 4,  # duplicates are drawn too; they are dropped
        database=None,
        deadline=None,
        phases=[hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(strategy)
    def collect(value: Any) -> None:
        if len(found) < count and value not in found:
            found.append(value)

    try:
        collect()
    except hypothesis.errors.HypothesisException as exc:
        raise WorkflowDefinitionError(f"the strategy {strategy!r} drew no values: {exc}") from None
    if not found:
        raise WorkflowDefinitionError(f"the strategy {strategy!r} drew no values")
    return tuple(found)
