"""The workflows of bench/scaleout.py, run by ``ledgerflow worker --app scaleout_app``.

Plain ``def`` steps with trivial bodies, as an application writes them. The steps of
the ``failover`` and ``claim`` workflows append a line to a marker file (the path in
``LEDGERFLOW_SCALEOUT_MARKS``) when they start, with ``os.write`` on an ``O_APPEND``
descriptor, so a line survives a worker killed right after it:

    <workflow id> <step name> <pid> <time.time()>

The benchmark reads these lines to tell when a step started and in which worker.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ledgerflow as lf

MARKS_ENV = "LEDGERFLOW_SCALEOUT_MARKS"

_marks_fd: int | None = None


def mark(step: str) -> None:
    """Record that ``step`` of the current instance starts now, in this process."""
    global _marks_fd
    if _marks_fd is None:
        _marks_fd = os.open(os.environ[MARKS_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    line = f"{lf.current_step().workflow_id} {step} {os.getpid()} {time.time():.6f}\n"
    os.write(_marks_fd, line.encode())


# -- workflows: three trivial steps ---------------------------------------------------


def add_one(x: int) -> int:
    return x + 1


def double(x: int) -> int:
    return x * 2


def minus_three(x: int) -> int:
    return x - 3


@lf.workflow(name="scaleout.three_steps", version=1)
async def three_steps(ctx: lf.WorkflowContext, n: int) -> int:
    a = await ctx.step(add_one, n)
    b = await ctx.step(double, a)
    return await ctx.step(minus_three, b)


def three_steps_result(n: int) -> int:
    return (n + 1) * 2 - 3


# -- failover: a step that is still running when its worker dies ----------------------


def before(i: int) -> int:
    mark("before")
    return i


def slow(seconds: float) -> float:
    mark("slow")
    time.sleep(seconds)
    return seconds


@lf.workflow(name="scaleout.failover", version=1)
async def failover(ctx: lf.WorkflowContext, seconds: float) -> float:
    await ctx.step(before, 1)
    return await ctx.step(slow, seconds)


# -- claim latency: when does the first step start? -----------------------------------


def first(i: int) -> int:
    mark("first")
    return i


@lf.workflow(name="scaleout.claim", version=1)
async def claim(ctx: lf.WorkflowContext, i: int) -> int:
    return await ctx.step(first, i)


# -- task latency: when does a step sent to a task queue start? -----------------------

REMOTE_QUEUE = "bench-remote"


@lf.step(name="scaleout.remote_first", queue=REMOTE_QUEUE)
def remote_first(i: int) -> int:
    mark("remote_first")
    return i


@lf.workflow(name="scaleout.remote", version=1)
async def remote(ctx: lf.WorkflowContext, i: int) -> int:
    return await ctx.step(remote_first, i)


WORKFLOWS: list[lf.WorkflowDefinition[Any, Any]] = [three_steps, failover, claim, remote]
