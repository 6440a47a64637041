"""The step threads on their own: slots, batching of finished bodies, shutdown."""

from __future__ import annotations

import asyncio
import threading

import pytest

from ledgerflow.workflow.step_threads import StepThreads

WAIT = 5.0


async def test_every_body_comes_back_with_its_own_outcome() -> None:
    threads = StepThreads(4)
    try:
        futures = [threads.run(lambda n: n * 2, (n,)) for n in range(2000)]
        outcomes = await asyncio.wait_for(asyncio.gather(*futures), WAIT)
    finally:
        threads.shutdown()
    assert outcomes == [(True, n * 2) for n in range(2000)]


async def test_a_failing_body_is_an_outcome_and_its_thread_goes_on() -> None:
    def fails(kind: type[BaseException]) -> None:
        raise kind("boom")

    threads = StepThreads(1)
    try:
        ok, error = await asyncio.wait_for(threads.run(fails, (ValueError,)), WAIT)
        assert (ok, type(error), str(error)) == (False, ValueError, "boom")
        # Even SystemExit: it fails the attempt, it does not end the only thread.
        ok, error = await asyncio.wait_for(threads.run(fails, (SystemExit,)), WAIT)
        assert not ok
        assert "SystemExit" in str(error)
        assert await asyncio.wait_for(threads.run(lambda: 7, ()), WAIT) == (True, 7)
    finally:
        threads.shutdown()


async def test_bodies_run_in_named_threads_with_the_callers_context() -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    var.set("caller's")
    threads = StepThreads(2, name="lf-test-step")
    try:
        ok, seen = await threads.run(lambda: (threading.current_thread().name, var.get()), ())
    finally:
        threads.shutdown()
    assert ok
    assert seen[0].startswith("lf-test-step")
    assert seen[1] == "caller's"


async def test_slots_bound_bodies_running_and_finished_but_not_given_back() -> None:
    threads = StepThreads(2)
    try:
        first, second = await threads.slot(), await threads.slot()
        assert threads.in_use == 2
        third = asyncio.ensure_future(threads.slot())
        await asyncio.sleep(0.05)
        assert not third.done()  # both slots held: a third body may not start
        first()
        first()  # giving back twice gives back once
        release = await asyncio.wait_for(third, WAIT)
        assert threads.in_use == 2
        second()
        release()
        assert threads.in_use == 0
    finally:
        threads.shutdown()


async def test_shutdown_drops_queued_bodies_and_ends_the_threads() -> None:
    gate = threading.Event()
    started: list[int] = []

    def body(n: int) -> int:
        started.append(n)
        gate.wait(WAIT)
        return n

    threads = StepThreads(1, name="lf-test-shutdown")
    running = threads.run(body, (1,))
    queued = threads.run(body, (2,))
    for _ in range(100):
        if started:
            break
        await asyncio.sleep(0.01)
    threads.shutdown()
    gate.set()
    assert await asyncio.wait_for(running, WAIT) == (True, 1)  # the running one finishes
    await asyncio.sleep(0.05)
    assert started == [1]
    assert not queued.done()  # the queued one never starts
    with pytest.raises(RuntimeError, match="shut down"):
        threads.run(body, (3,))
    for thread in threading.enumerate():
        if thread.name.startswith("lf-test-shutdown"):
            thread.join(WAIT)
            assert not thread.is_alive()


def test_at_least_one_thread() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        StepThreads(0)


async def test_threads_start_as_bodies_need_them_up_to_the_size() -> None:
    def names() -> set[str]:
        return {t.name for t in threading.enumerate() if t.name.startswith("lf-test-lazy")}

    threads = StepThreads(4, name="lf-test-lazy")
    try:
        for n in range(50):  # one body at a time: one thread
            assert await asyncio.wait_for(threads.run(lambda x: x, (n,)), WAIT) == (True, n)
        assert len(names()) == 1
        gate = threading.Event()
        blocked = [threads.run(gate.wait, (WAIT,)) for _ in range(8)]
        await asyncio.sleep(0.05)
        assert len(names()) == 4  # eight bodies at once, four threads at most
        gate.set()
        assert all(ok for ok, _ in await asyncio.wait_for(asyncio.gather(*blocked), WAIT))
    finally:
        threads.shutdown()
