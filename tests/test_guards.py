"""Circuit breakers, bulkheads and rate limits in front of a resource, as steps under
a named policy meet them, on every backend (one engine; ``test_guards_processes``
shares them across worker processes)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import ledgerflow as lf
from ledgerflow import ManualClock, WorkflowContext
from ledgerflow.resilience.guards import BreakerMoved
from ledgerflow.workflow.history import StepAttemptFailed, StepDone

from ._engines import WAIT, EngineFactory, waiting_for

REAL = lf.SystemClock()
calls: Counter[str] = Counter()
erp = {"healthy": False}


class Declined(Exception):
    retryable = False


@pytest.fixture(autouse=True)
def fresh() -> None:
    calls.clear()
    erp["healthy"] = False


def create_po(n: int) -> str:
    calls["erp"] += 1
    if n < 0:
        raise Declined("over the credit limit")
    if not erp["healthy"]:
        raise ConnectionError("ERP unreachable")
    return f"po-{n}"


@lf.workflow(name="purchase", version=1)
async def purchase(ctx: WorkflowContext, n: int) -> str:
    return await ctx.step(create_po, n, policy="erp")


BREAKER = lf.Policy(
    retry=lf.Retry(max_attempts=1, initial_interval=0.01, jitter=0),
    breaker=lf.Breaker(consecutive_failures=3, open_for=30),
)


async def fail_three(e: lf.Engine) -> None:
    for i in range(3):
        with pytest.raises(lf.WorkflowFailedError, match="ERP unreachable"):
            await (await e.start(purchase, i, id=f"po-{i}")).result(timeout=WAIT)


async def moves(e: lf.Engine) -> list[BreakerMoved]:
    events = await e.store.read_stream("breaker-erp")
    return [ev.data for ev in events]


async def test_a_breaker_opens_refuses_fast_then_probes_and_closes(
    engine: EngineFactory, clock: ManualClock
) -> None:
    async with engine(purchase, policies={"erp": BREAKER}) as e:
        await fail_three(e)
        (opened,) = await moves(e)
        assert (opened.previous, opened.state) == ("closed", "open")
        assert opened.reason.startswith("3 failures in a row; last: ConnectionError")
        assert opened.workflow_id == "po-2"
        # Open: the call is refused without reaching the ERP, and waits it out.
        erp["healthy"] = True
        handle = await e.start(purchase, 7, id="po-7")
        await waiting_for(e, "po-7", "retry of step 'create_po' at ")
        assert calls["erp"] == 3
        (refused,) = [ev.data for ev in await e.history("po-7") if ev.type.endswith("failed")]
        assert isinstance(refused, StepAttemptFailed)
        assert refused.refused
        assert refused.error_type == "CircuitOpenError"
        assert "circuit 'erp' is open since" in refused.message
        assert "3 failures in a row" in refused.message
        assert refused.retry_at_us is not None
        assert refused.retry_at_us >= clock.now().timestamp() * 1e6 + 29e6
        # After open_for, one probe goes through; it succeeds and closes the breaker.
        clock.advance(31)
        assert await handle.result(timeout=WAIT) == "po-7"
        assert [(m.previous, m.state) for m in await moves(e)] == [
            ("closed", "open"),
            ("open", "half_open"),
            ("half_open", "closed"),
        ]
        done = [ev.data for ev in await e.history("po-7") if isinstance(ev.data, StepDone)]
        assert done[0].policy == "erp"
        state = await e.store.resource_state("erp", now_us=0)
        assert state is not None
        assert state.state == "closed"
    assert calls["erp"] == 4


async def test_a_failed_probe_opens_the_breaker_again(
    engine: EngineFactory, clock: ManualClock
) -> None:
    async with engine(purchase, policies={"erp": BREAKER}) as e:
        await fail_three(e)
        await e.policies.update("erp", {"retry.max_attempts": 3}, reason="probe twice")
        handle = await e.start(purchase, 8, id="po-8")
        await waiting_for(e, "po-8", "retry of step 'create_po' at ")
        clock.advance(31)  # half-open: the probe fails, the breaker opens again
        await waiting_for(e, "po-8", "retry of step 'create_po' at ")
        async with asyncio.timeout(WAIT):
            while len(await moves(e)) < 3:  # noqa: ASYNC110 - the probe settles
                await asyncio.sleep(0.01)
        assert [m.state for m in await moves(e)] == ["open", "half_open", "open"]
        assert (await moves(e))[2].reason.startswith("probe failed; last: ConnectionError")
        erp["healthy"] = True
        clock.advance(31)
        assert await handle.result(timeout=WAIT) == "po-8"
        assert [m.state for m in await moves(e)][-2:] == ["half_open", "closed"]


async def test_a_business_refusal_does_not_trip_the_breaker(engine: EngineFactory) -> None:
    async with engine(purchase, policies={"erp": BREAKER}) as e:
        for i in range(5):
            with pytest.raises(lf.WorkflowFailedError, match="credit limit"):
                await (await e.start(purchase, -1 - i, id=f"neg-{i}")).result(timeout=WAIT)
        erp["healthy"] = True
        assert await (await e.start(purchase, 1, id="ok-1")).result(timeout=WAIT) == "po-1"
        with pytest.raises(lf.StreamNotFoundError):
            await moves(e)


async def test_errors_the_policy_does_not_retry_do_not_trip_its_breaker(
    engine: EngineFactory,
) -> None:
    """The policy's own retry.non_retryable was not consulted: errors it names
    (refused at once, not retried) still opened the breaker."""
    policy = lf.Policy(
        retry=lf.Retry(max_attempts=3, initial_interval=0.01, non_retryable=["ConnectionError"]),
        breaker=lf.Breaker(consecutive_failures=2, open_for=30),
    )
    async with engine(purchase, policies={"erp": policy}) as e:
        for i in range(4):
            with pytest.raises(lf.WorkflowFailedError, match="ERP unreachable"):
                await (await e.start(purchase, i, id=f"nr-{i}")).result(timeout=WAIT)
        assert calls["erp"] == 4  # one attempt each: not retried
        with pytest.raises(lf.StreamNotFoundError):
            await moves(e)  # and the breaker never moved


async def test_the_failure_rate_opens_a_breaker(engine: EngineFactory) -> None:
    by_rate = lf.Policy(
        retry=lf.Retry(max_attempts=1),
        breaker=lf.Breaker(consecutive_failures=None, failure_rate=0.5, min_calls=4, window=600),
    )
    async with engine(purchase, policies={"erp": by_rate}) as e:
        for i, healthy in enumerate([True, False, True, False]):
            erp["healthy"] = healthy
            with contextlib.suppress(lf.WorkflowFailedError):
                await (await e.start(purchase, i, id=f"r-{i}")).result(timeout=WAIT)
        (opened,) = await moves(e)
    assert opened.reason.startswith("2 of 4 calls failed within 600s (threshold 50%)")


# -- bulkhead --------------------------------------------------------------------------

running = {"now": 0, "most": 0}
gate: asyncio.Event | None = None


async def slow_call(n: int) -> int:
    running["now"] += 1
    running["most"] = max(running["most"], running["now"])
    try:
        assert gate is not None
        await gate.wait()
    finally:
        running["now"] -= 1
    return n


@lf.workflow(name="bulk", version=1)
async def bulk(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(slow_call, n, policy="erp")


async def test_a_bulkhead_bounds_calls_in_progress(engine: EngineFactory) -> None:
    global gate
    gate = asyncio.Event()
    running.update(now=0, most=0)
    policy = lf.Policy(
        retry=lf.Retry(max_attempts=2, initial_interval=0.05, multiplier=1),
        bulkhead=lf.Bulkhead(max_concurrent=2, max_wait=0.3),
    )
    async with engine(bulk, policies={"erp": policy}, clock=REAL) as e:
        handles = [await e.start(bulk, i, id=f"b-{i}") for i in range(5)]
        async with asyncio.timeout(WAIT):
            while running["now"] < 2:  # noqa: ASYNC110 - the first two get permits
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # the others wait max_wait, are refused, retry later
        assert running["most"] == 2
        state = await e.store.resource_state("erp", now_us=e._now_us())
        assert state is not None
        assert state.permits == 2
        gate.set()
        assert await asyncio.gather(*(h.result(timeout=WAIT) for h in handles)) == list(range(5))
        refusals = [
            ev.data
            for h in handles
            for ev in await e.history(h.id)
            if isinstance(ev.data, StepAttemptFailed)
        ]
        state = await e.store.resource_state("erp", now_us=e._now_us())
    assert running["most"] == 2
    assert refusals
    assert all(r.refused and r.error_type == "BulkheadFullError" for r in refusals)
    assert all(r.attempt == 1 for r in refusals)  # a refusal uses up no attempt
    assert state is not None
    assert state.permits == 0  # each permit went with its call's outcome


# -- rate limit ------------------------------------------------------------------------

stamps: list[float] = []


def stamped(n: int) -> int:
    stamps.append(time.monotonic())
    return n


@lf.workflow(name="limited", version=1)
async def limited(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(stamped, n, policy="erp")


async def test_a_rate_limit_spaces_calls_out(engine: EngineFactory) -> None:
    stamps.clear()
    policy = lf.Policy(rate_limit=lf.RateLimit(rate=20, burst=2))
    async with engine(limited, policies={"erp": policy}, clock=REAL) as e:
        handles = await asyncio.gather(*(e.start(limited, i, id=f"l-{i}") for i in range(12)))
        assert await asyncio.gather(*(h.result(timeout=WAIT) for h in handles)) == list(range(12))
    stamps.sort()
    # An upper bound, not a speed: never more than the burst plus what the rate adds.
    for i, start in enumerate(stamps):
        within = [s for s in stamps[i:] if s - start <= 0.25]
        assert len(within) <= 2 + 20 * 0.25 + 1
    assert stamps[-1] - stamps[0] >= (12 - 2) / 20 * 0.8


async def test_a_policy_without_guards_touches_no_shared_state(engine: EngineFactory) -> None:
    policy = lf.Policy(retry=lf.Retry(max_attempts=2))
    async with engine(purchase, policies={"erp": policy}) as e:
        erp["healthy"] = True
        assert await (await e.start(purchase, 3, id="plain")).result(timeout=WAIT) == "po-3"
        assert await e.store.list_resources(now_us=0) == []


# -- the CLI -----------------------------------------------------------------------------


async def test_the_cli_shows_shared_state_and_every_breaker_move(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ledgerflow.cli import app

    url = f"sqlite:///{tmp_path / 'ledger.db'}"

    def run(*args: str) -> Any:
        return CliRunner().invoke(app, [*args, "--db", url], env={"COLUMNS": "200"})

    async with lf.Engine(url, workflows=[purchase], policies={"erp": BREAKER}) as e:
        assert (await asyncio.to_thread(run, "resources", "list")).stdout.startswith("no guarded")
        await fail_three(e)
    listed = await asyncio.to_thread(run, "resources", "list", "--json")
    assert listed.exit_code == 0, listed.output
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (row["resource"], row["breaker"], row["moves"]) == ("erp", "open", 1)
    table = await asyncio.to_thread(run, "resources", "list")
    assert "erp" in table.stdout
    assert "open" in table.stdout
    history = await asyncio.to_thread(run, "resources", "history", "erp")
    assert "closed -> open" in history.stdout
    assert "3 failures in a row" in history.stdout
    assert "po-2" in history.stdout
    (moved,) = [
        json.loads(line)
        for line in (
            await asyncio.to_thread(run, "resources", "history", "erp", "--json")
        ).stdout.splitlines()
    ]
    assert (moved["previous"], moved["state"], moved["version"]) == ("closed", "open", 1)
    never = await asyncio.to_thread(run, "resources", "history", "bank")
    assert "never moved" in never.stdout
