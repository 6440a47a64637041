"""A circuit breaker's rules (``resilience.breaker``) and the counts the stores keep
(``store._resources.tallied``, ``moved``), driven by hypothesis on a fake clock and
checked against a small model of the documented behaviour."""

from __future__ import annotations

from dataclasses import dataclass, replace

from hypothesis import given
from hypothesis import strategies as st

import ledgerflow as lf
from ledgerflow.resilience.breaker import HALF_OPEN_RECHECK_US, after_outcome, meets, trips
from ledgerflow.store._resources import moved, tallied
from ledgerflow.store.runtime import ResourceRow

S = 1_000_000
R = "erp"


@dataclass
class World:
    """The pure rules wired the way the guards use them, one call at a time."""

    breaker: lf.Breaker
    row: ResourceRow | None = None
    moves: int = 0

    def move(self, state: str, now: int) -> None:
        self.moves += 1
        self.row = moved(self.row, R, state, now, self.moves)

    def call(self, now: int, fails: bool) -> str:
        """``passed``, ``probe`` or ``refused``: what the call met."""
        met = meets(self.row, self.breaker, now)
        if met.verdict == "half_open":
            self.move("half_open", now)
            met = meets(self.row, self.breaker, now)
            assert met.verdict == "probe"
        if met.verdict == "refuse":
            assert met.until_us > now
            return "refused"
        probe = met.verdict == "probe"
        if probe:
            assert self.row is not None
            if self.row.probes >= self.breaker.half_open_probes:
                assert now < met.until_us <= now + HALF_OPEN_RECHECK_US
                return "refused"
            self.row = _probe(self.row)  # what take_probe does
        window = int(self.breaker.window * S)
        if not probe:
            self.row = tallied(self.row, R, fails, now, window)
        assert self.row is not None
        transitions = self.row.transitions
        move = after_outcome(
            self.row, self.breaker, probe=probe, probe_move=transitions, failed=fails
        )
        if move is not None:
            self.move(move.state, now)
        return "probe" if probe else "passed"


def _probe(row: ResourceRow) -> ResourceRow:
    return replace(row, probes=row.probes + 1)


calls = st.lists(
    st.tuples(st.integers(0, 40 * S), st.booleans()),  # (time since the last call, fails)
    min_size=1,
    max_size=80,
)


@given(st.integers(1, 6), st.integers(1, 60), st.integers(1, 3), calls)
def test_a_consecutive_failure_breaker_behaves_as_documented(
    k: int, open_for: int, probes: int, script: list[tuple[int, bool]]
) -> None:
    """Opens at the k-th failure in a row; refuses everything for open_for; then
    lets a probe through, whose success closes it and whose failure opens it again."""
    world = World(lf.Breaker(consecutive_failures=k, open_for=open_for, half_open_probes=probes))
    state, run, opened_at, now = "closed", 0, 0, 0
    for gap, fails in script:
        now += gap
        met = world.call(now, fails)
        if state == "open" and now < opened_at + open_for * S:
            assert met == "refused"  # the resource is never called while open
            continue
        if state == "open":
            state = "half_open"
        if state == "half_open":
            assert met == "probe"
            state, run = ("open", 0) if fails else ("closed", 0)
            opened_at = now if fails else opened_at
        else:
            assert met == "passed"
            run = run + 1 if fails else 0
            if run >= k:
                state, run, opened_at = "open", 0, now
        assert world.row is not None
        assert world.row.state == state


@given(
    st.floats(0.1, 1.0),
    st.integers(1, 8),
    st.integers(1, 120),
    calls,
)
def test_a_failure_rate_breaker_opens_only_over_its_threshold(
    rate: float, min_calls: int, window: int, script: list[tuple[int, bool]]
) -> None:
    breaker = lf.Breaker(
        consecutive_failures=None, failure_rate=rate, min_calls=min_calls, window=window,
        open_for=10_000,
    )  # fmt: skip
    world = World(breaker)
    now = 0
    start, seen, failed = None, 0, 0  # the model's tumbling window
    for gap, fails in script:
        now += gap
        before = world.row.state if world.row else "closed"
        met = world.call(now, fails)
        if before == "open":
            assert met == "refused"
            continue
        if start is None or now - start >= window * S:
            start, seen, failed = now, 0, 0
        seen, failed = seen + 1, failed + int(fails)
        should_open = fails and seen >= min_calls and failed >= rate * seen
        assert world.row is not None
        assert (world.row.state == "open") == should_open
        if should_open:
            return  # open for good in this script (open_for outlasts it)


@given(st.integers(0, 10), st.integers(0, 10), st.integers(0, 10))
def test_trips_names_its_reason(consecutive: int, calls_: int, failures: int) -> None:
    row = ResourceRow(
        R, "closed", 0, 0, consecutive, 0, calls_, min(failures, calls_), 0, None, None
    )
    by_run = lf.Breaker(consecutive_failures=3)
    assert (trips(row, by_run) is not None) == (consecutive >= 3)
    by_rate = lf.Breaker(consecutive_failures=None, failure_rate=0.5, min_calls=4)
    expected = calls_ >= 4 and min(failures, calls_) >= 0.5 * calls_
    said = trips(row, by_rate)
    assert (said is not None) == expected
    if said:
        assert "calls failed within 60s (threshold 50%)" in said


def test_a_half_open_breaker_whose_probe_was_lost_half_opens_again() -> None:
    breaker = lf.Breaker(consecutive_failures=1, open_for=10, half_open_probes=1)
    world = World(breaker)
    world.call(0, True)  # opens
    assert world.call(11 * S, True) == "probe"  # half-opens, probe fails: open again
    assert world.row is not None
    assert world.row.state == "open"
    # A probe that never settles (its worker died) does not wedge it half-open.
    world.move("half_open", 30 * S)
    world.row = _probe(world.row)
    assert meets(world.row, breaker, 31 * S).verdict == "probe"
    assert world.call(31 * S, False) == "refused"  # the probe is out
    assert meets(world.row, breaker, 40 * S).verdict == "half_open"
    assert world.call(40 * S, False) == "probe"
    assert world.row.state == "closed"


def test_a_refused_call_looks_at_a_long_open_breaker_again_within_a_minute() -> None:
    """Refused calls slept until the open span seen at refusal had passed (10 minutes
    here): a shorter open_for set meanwhile, or a breaker another call's probe closed,
    left them waiting that long."""
    from ledgerflow.workflow.rules import REFUSED_RECHECK_US, inline_rules, next_attempt_at

    rules = inline_rules(lf.RetryPolicy(max_attempts=3), None)
    now = 1_000 * S
    for open_us, earliest, latest in (
        (600 * S, now + REFUSED_RECHECK_US, now + REFUSED_RECHECK_US + S),
        (5 * S, now + 5 * S, now + 6 * S),  # a short span: back when it half-opens
    ):
        refused = lf.CircuitOpenError("erp", "open", now + open_us)
        at, why = next_attempt_at(
            rules,
            refused,
            now_us=now,
            workflow_id="w",
            seq=1,
            attempt=1,
            first_at_us=now,
            refused=True,
        )
        assert why == ""
        assert at is not None
        assert earliest <= at <= latest
