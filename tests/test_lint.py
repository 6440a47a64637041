"""The determinism lint: what it catches in workflow bodies, and what it leaves alone.

The bodies below are only read, never run. Each caught one has exactly one offending
line, marked ``# caught``, so a test can check the line a finding names.
"""

# Ruff's own async checks flag some of the same calls the bodies below exist to hold.
# ruff: noqa: ASYNC221, ASYNC230, ASYNC251

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import random
import random as r
import secrets
import subprocess
import threading
import time as clock_module
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from os import environ
from pathlib import Path
from random import choice
from time import monotonic, time
from typing import Any
from uuid import uuid4

import pytest

import ledgerflow
from ledgerflow import WorkflowContext
from ledgerflow.workflow.lint import LintFinding, lint_workflow

SHARED_RNG = random.Random(7)
"""A module-level generator: its state depends on every earlier draw, so not replayable."""


@dataclass(frozen=True)
class Order:
    sku: str
    amount_cents: int


def tax(amount_cents: int) -> int:
    """A pure helper: workflow bodies may call it."""
    return amount_cents // 5


async def charge(order: Order) -> str:
    return f"charged {order.amount_cents}"


def line_of(fn: Callable[..., Any], marker: str = "# caught") -> int:
    lines, first = inspect.getsourcelines(fn)
    return next(first + n for n, line in enumerate(lines) if line.rstrip().endswith(marker))


# -- caught: racing commands against real time ----------------------------------------


async def with_wait(ctx: WorkflowContext, pending: set[asyncio.Task[str]]) -> None:
    await asyncio.wait(pending, timeout=60)  # caught


async def with_wait_for(ctx: WorkflowContext, order: Order) -> str:
    return await asyncio.wait_for(ctx.step(charge, order), timeout=60)  # caught


async def with_as_completed(ctx: WorkflowContext, order: Order) -> list[str]:
    steps = [ctx.step(charge, order), ctx.step(charge, order)]
    return [await done for done in asyncio.as_completed(steps)]  # caught


async def with_timeout(ctx: WorkflowContext, order: Order) -> str:
    async with asyncio.timeout(60):  # caught
        return await ctx.step(charge, order)


async def with_from_asyncio_wait(ctx: WorkflowContext, pending: set[asyncio.Task[str]]) -> None:
    from asyncio import wait

    await wait(pending)  # caught


async def with_asyncio_sleep(ctx: WorkflowContext, order: Order) -> None:
    await asyncio.sleep(5)  # caught


async def with_create_task(ctx: WorkflowContext, order: Order) -> str:
    task = asyncio.create_task(ctx.step(charge, order))  # caught
    return await task


async def with_ensure_future(ctx: WorkflowContext, order: Order) -> str:
    return await asyncio.ensure_future(ctx.step(charge, order))  # caught


# -- caught: threads and the event loop -----------------------------------------------


async def with_to_thread(ctx: WorkflowContext, order: Order) -> int:
    return await asyncio.to_thread(tax, order.amount_cents)  # caught


async def with_run_in_executor(ctx: WorkflowContext, order: Order, loop: Any) -> int:
    result: int = await loop.run_in_executor(None, tax, order.amount_cents)  # caught
    return result


async def with_get_running_loop(ctx: WorkflowContext, order: Order) -> float:
    return asyncio.get_running_loop().time()  # caught


async def with_thread(ctx: WorkflowContext, order: Order) -> None:
    threading.Thread(target=print).start()  # caught


# -- caught: clocks, randomness, I/O, the environment ---------------------------------


async def with_time_sleep(ctx: WorkflowContext, order: Order) -> None:
    clock_module.sleep(1)  # caught


async def with_time_module_alias(ctx: WorkflowContext, order: Order) -> float:
    return clock_module.time()  # caught


async def with_from_time_import_time(ctx: WorkflowContext, order: Order) -> float:
    return time()  # caught


async def with_from_time_import_monotonic(ctx: WorkflowContext, order: Order) -> float:
    return monotonic()  # caught


async def with_strftime_of_now(ctx: WorkflowContext, order: Order) -> str:
    return clock_module.strftime("%Y")  # caught


async def with_from_datetime_import_datetime(ctx: WorkflowContext, order: Order) -> datetime:
    return datetime.now(UTC)  # caught


async def with_from_datetime_import_date(ctx: WorkflowContext, order: Order) -> date:
    return date.today()  # caught


async def with_aliased_random(ctx: WorkflowContext, order: Order) -> float:
    return r.random()  # caught


async def with_from_random_import_choice(ctx: WorkflowContext, order: Order) -> str:
    return choice(["a", "b"])  # caught


async def with_module_level_generator(ctx: WorkflowContext, order: Order) -> float:
    return SHARED_RNG.random()  # caught


async def with_secrets(ctx: WorkflowContext, order: Order) -> str:
    return secrets.token_hex(8)  # caught


async def with_uuid4(ctx: WorkflowContext, order: Order) -> str:
    return str(uuid4())  # caught


async def with_environ(ctx: WorkflowContext, order: Order) -> str | None:
    return environ.get("REGION")  # caught


async def with_subprocess(ctx: WorkflowContext, order: Order) -> None:
    subprocess.run(["true"], check=True)  # caught


async def with_open(ctx: WorkflowContext, order: Order) -> str:
    with open("/etc/hostname") as f:  # caught
        return f.read()


async def with_import_inside(ctx: WorkflowContext, order: Order) -> float:
    import random as dice

    return dice.random()  # caught


async def in_a_nested_function(ctx: WorkflowContext, order: Order) -> float:
    def stamp() -> float:
        return clock_module.time()  # caught

    return stamp()


async def in_a_lambda(ctx: WorkflowContext, order: Order) -> float:
    draw: Callable[[], float] = lambda: r.random()  # noqa: E731  # caught
    return draw()


async def in_a_comprehension(ctx: WorkflowContext, order: Order) -> list[float]:
    return [r.random() for _ in range(3)]  # caught


async def with_a_clock_taken_as_a_value(ctx: WorkflowContext, order: Order) -> str:
    now = datetime.now  # caught
    return str(now())


async def with_a_uuid_taken_as_a_value(ctx: WorkflowContext, order: Order) -> str:
    make = [uuid4][0]  # caught
    return str(make())


CAUGHT: list[tuple[Callable[..., Any], str, str]] = [
    (with_wait, "asyncio.wait()", "wait_for_signal(..., timeout=...)"),
    (with_wait_for, "asyncio.wait_for()", "wait_for_signal(..., timeout=...)"),
    (with_as_completed, "asyncio.as_completed()", "asyncio.gather"),
    (with_timeout, "asyncio.timeout()", "ctx.sleep()"),
    (with_from_asyncio_wait, "wait() (asyncio.wait)", "wait_for_signal(..., timeout=...)"),
    (with_asyncio_sleep, "asyncio.sleep()", "ctx.sleep()"),
    (with_create_task, "asyncio.create_task()", "asyncio.gather"),
    (with_ensure_future, "asyncio.ensure_future()", "asyncio.gather"),
    (with_to_thread, "asyncio.to_thread()", "ctx.step"),
    (with_run_in_executor, "loop.run_in_executor()", "ctx.step"),
    (with_get_running_loop, "asyncio.get_running_loop()", "ctx.sleep()"),
    (with_thread, "threading.Thread()", "ctx.step"),
    (with_time_sleep, "clock_module.sleep() (time.sleep)", "ctx.sleep()"),
    (with_time_module_alias, "clock_module.time() (time.time)", "ctx.now()"),
    (with_from_time_import_time, "time() (time.time)", "ctx.now()"),
    (with_from_time_import_monotonic, "monotonic() (time.monotonic)", "ctx.now()"),
    (with_strftime_of_now, "(time.strftime)", "ctx.now()"),
    (with_from_datetime_import_datetime, "(datetime.datetime.now)", "ctx.now()"),
    (with_from_datetime_import_date, "date.today() (datetime.date.today)", "ctx.now()"),
    (with_aliased_random, "r.random() (random.random)", "ctx.random()"),
    (with_from_random_import_choice, "choice() (random.", "ctx.random()"),
    (with_module_level_generator, "SHARED_RNG.random() (random.Random.random)", "ctx.random()"),
    (with_secrets, "secrets.token_hex()", "ctx.random()"),
    (with_uuid4, "uuid4() (uuid.uuid4)", "ctx.uuid()"),
    (with_environ, "environ (os.environ)", "pass it in the input"),
    (with_subprocess, "subprocess.run()", "ctx.step"),
    (with_open, "open()", "ctx.step"),
    (with_import_inside, "dice.random() (random.random)", "ctx.random()"),
    (in_a_nested_function, "(time.time)", "ctx.now()"),
    (in_a_lambda, "(random.random)", "ctx.random()"),
    (in_a_comprehension, "(random.random)", "ctx.random()"),
    # Taken as a value and called under another name (it passed unseen).
    (with_a_clock_taken_as_a_value, "(datetime.datetime.now)", "ctx.now()"),
    (with_a_uuid_taken_as_a_value, "uuid4 (uuid.uuid4)", "ctx.uuid()"),
]


@pytest.mark.parametrize(
    ("body", "what", "instead"), CAUGHT, ids=[fn.__name__ for fn, _, _ in CAUGHT]
)
def test_caught(body: Callable[..., Any], what: str, instead: str) -> None:
    findings = lint_workflow(body)
    assert len(findings) == 1, findings
    [finding] = findings
    assert finding.line == line_of(body)
    assert what in finding.what
    assert instead in finding.why
    assert str(finding).startswith(f"line {finding.line}: ")


def test_the_decorator_refuses_a_caught_body_naming_each_line() -> None:
    with pytest.raises(ledgerflow.WorkflowDefinitionError) as caught:

        @ledgerflow.workflow(name="racing")
        async def racing(ctx: WorkflowContext, order: Order) -> str | None:
            if r.random() < 0.5:  # first
                return None
            return await asyncio.wait_for(ctx.wait_for_signal("go"), 5)  # second

    message = str(caught.value)
    here = test_the_decorator_refuses_a_caught_body_naming_each_line
    assert f"line {line_of(here, '# first')}: r.random() (random.random)" in message
    assert f"line {line_of(here, '# second')}: asyncio.wait_for()" in message


def test_a_name_from_the_enclosing_function_is_resolved_through_the_closure() -> None:
    from asyncio import wait_for as deadline

    async def body(ctx: WorkflowContext, order: Order) -> str:
        return await deadline(ctx.step(charge, order), 1)  # caught

    [finding] = lint_workflow(body)
    assert finding.what == "deadline() (asyncio.wait_for)"
    assert finding.line == line_of(body)


def test_an_import_below_the_workflow_is_still_caught_as_spelled(tmp_path: Path) -> None:
    # A decorator runs before the rest of its module: `time` is not a global yet, so
    # the name cannot be resolved and is taken as spelled.
    module = tmp_path / "late_import.py"
    module.write_text(
        "from ledgerflow.workflow.lint import lint_workflow\n"
        "\n"
        "async def body(ctx, order):\n"
        "    return time.time()\n"
        "\n"
        "FINDINGS = lint_workflow(body)\n"
        "\n"
        "import time\n"
    )
    spec = importlib.util.spec_from_file_location("late_import", module)
    assert spec is not None
    assert spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    findings: list[LintFinding] = loaded.FINDINGS
    assert findings == [LintFinding(4, "time.time()", "reads the wall clock: use ctx.now()")]


def test_the_exemption_holds_for_resolved_names() -> None:
    async def body(ctx: WorkflowContext, pending: set[asyncio.Task[str]]) -> float:
        await asyncio.wait(pending)  # ledgerflow: allow
        return r.random()  # ledgerflow: allow

    assert lint_workflow(body) == []


def test_the_exemption_may_sit_on_the_last_line_of_a_wrapped_call() -> None:
    async def body(ctx: WorkflowContext, order: Order) -> str:
        return await asyncio.wait_for(
            ctx.step(charge, order),
            timeout=60,
        )  # ledgerflow: allow

    assert lint_workflow(body) == []


# -- allowed --------------------------------------------------------------------------


async def uses_the_context(ctx: WorkflowContext, order: Order) -> str:
    started = ctx.now()
    await ctx.sleep(timedelta(minutes=5))
    await ctx.sleep_until(started + timedelta(days=1))
    approval = await ctx.wait_for_signal("approval", timeout=timedelta(days=3))
    draw = ctx.random().random()
    ident = ctx.uuid()
    charged = await ctx.step(charge, order)
    ctx.expose({"approval": approval, "draw": draw, "id": str(ident)})
    return charged


async def gathers_commands(ctx: WorkflowContext, order: Order) -> list[str]:
    return list(await asyncio.gather(ctx.step(charge, order), ctx.step(charge, order)))


async def calls_pure_helpers(ctx: WorkflowContext, order: Order) -> str:
    due = datetime(2030, 1, 1, tzinfo=UTC) + timedelta(days=tax(order.amount_cents))
    parsed = datetime.fromisoformat("2030-01-01T00:00:00+00:00")
    stamp = clock_module.strftime("%Y", clock_module.gmtime(0))  # given a time: pure
    return f"{due:%Y}{parsed:%Y}{stamp}{urllib.parse.quote(order.sku)}"


async def has_a_local_named_random(ctx: WorkflowContext, order: Order) -> float:
    random = ctx.random()  # shadows the module imported at the top of this file
    return random.random() + random.uniform(0, 1)


async def has_a_parameter_named_time(ctx: WorkflowContext, time: Any) -> Any:
    return time.time()  # a parameter: the lint cannot know, and does not guess


async def shadows_in_a_comprehension(ctx: WorkflowContext, order: Order) -> list[int]:
    return [r.bit_length() for r in range(3)]


async def defines_and_catches(ctx: WorkflowContext, order: Order) -> str:
    try:
        return await ctx.step(charge, order)
    except ledgerflow.StepFailedError as failed:
        return str(failed)


@pytest.mark.parametrize(
    "body",
    [
        uses_the_context,
        gathers_commands,
        calls_pure_helpers,
        has_a_local_named_random,
        has_a_parameter_named_time,
        shadows_in_a_comprehension,
        defines_and_catches,
    ],
)
def test_allowed(body: Callable[..., Any]) -> None:
    assert lint_workflow(body) == []


def test_the_decorator_accepts_gather_of_commands() -> None:
    @ledgerflow.workflow(name="fan_out")
    async def fan_out(ctx: WorkflowContext, order: Order) -> list[str]:
        left, right = await asyncio.gather(ctx.step(charge, order), ctx.step(charge, order))
        return [left, right]

    assert fan_out.name == "fan_out"


def test_without_source_there_is_nothing_to_lint() -> None:
    namespace: dict[str, Any] = {}
    exec("async def body(ctx, order):\n    import time\n    return time.time()\n", namespace)
    assert lint_workflow(namespace["body"]) == []
