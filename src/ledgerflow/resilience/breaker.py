"""A circuit breaker's rules as pure functions over its shared state (a
``ResourceRow``): what a call meets, and which move an outcome calls for. The guards
(``guards.py``) read the state, ask these, and make the moves in the ledger; the
counts themselves are kept by the store (``store._resources.tallied`` and ``moved``
say how).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..store.runtime import ResourceRow
from .policy import Breaker

__all__ = [
    "HALF_OPEN_RECHECK_US",
    "Meets",
    "Move",
    "after_outcome",
    "meets",
    "trips",
]

HALF_OPEN_RECHECK_US = 1_000_000
"""A call refused while the probes of a half-open breaker are out tries again this
soon (or after ``open_for``, if shorter): their verdict comes within a call's time."""


@dataclass(frozen=True, slots=True)
class Meets:
    """What a call meets at the breaker.

    - ``pass``: closed, go ahead;
    - ``refuse``: open (or half-open with the probes out), refused until ``until_us``;
    - ``half_open``: open long enough, or half-open with its probes lost: move it to
      half-open (``why``), then look again;
    - ``probe``: half-open: go ahead if a probe can be taken, else refused until
      ``until_us``.
    """

    verdict: Literal["pass", "refuse", "half_open", "probe"]
    until_us: int = 0
    why: str = ""


@dataclass(frozen=True, slots=True)
class Move:
    state: Literal["open", "closed"]
    why: str


def trips(row: ResourceRow, breaker: Breaker) -> str | None:
    """Why a closed breaker with these counts opens, or None if it stays closed."""
    if breaker.consecutive_failures is not None and row.consecutive >= breaker.consecutive_failures:
        return f"{row.consecutive} failures in a row"
    rate = breaker.failure_rate
    if (
        rate is not None
        and row.window_calls >= breaker.min_calls
        and row.window_failures >= rate * row.window_calls
    ):
        return (
            f"{row.window_failures} of {row.window_calls} calls failed within "
            f"{breaker.window:g}s (threshold {rate:.0%})"
        )
    return None


def meets(row: ResourceRow | None, breaker: Breaker, now_us: int) -> Meets:
    """What a call at ``now_us`` meets (see ``Meets``)."""
    if row is None or row.state == "closed":
        return Meets("pass")
    open_us = int(breaker.open_for * 1_000_000)
    until = row.changed_at_us + open_us
    if row.state == "open":
        if now_us < until:
            return Meets("refuse", until)
        return Meets("half_open", why=f"open for {breaker.open_for:g}s")
    if now_us >= until:
        return Meets("half_open", why=f"no probe settled within {breaker.open_for:g}s")
    return Meets("probe", now_us + min(open_us, HALF_OPEN_RECHECK_US))


def after_outcome(
    row: ResourceRow,
    breaker: Breaker,
    *,
    probe: bool,
    probe_move: int,
    failed: bool,
    last: str = "",
) -> Move | None:
    """The move a recorded outcome calls for, given the state after it was counted:
    a probe's verdict (if its half-opening, move ``probe_move``, is still the
    breaker's latest) closes or re-opens it; a counted failure that crosses a
    threshold opens a closed one. ``last`` describes the error, for the record."""
    if probe:
        if row.state != "half_open" or row.transitions != probe_move:
            return None  # another probe settled it already
        return Move("open", f"probe failed{last}") if failed else Move("closed", "probe succeeded")
    if failed and row.state == "closed":
        why = trips(row, breaker)
        if why is not None:
            return Move("open", f"{why}{last}")
    return None
