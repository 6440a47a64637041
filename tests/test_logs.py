"""Structured logs: one JSON object a line, tied to the workflow, the step and the
attempt the record was written in (step code logs without passing anything)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ledgerflow
from ledgerflow.cli import app
from ledgerflow.logs import JsonFormatter, configure

from ._engines import waiting_for
from ._spans import named, tracer

step_log = logging.getLogger("shop.steps")


@ledgerflow.step()
def charge(order: str) -> str:
    step_log.info("charging %s", order)
    return f"charged {order}"


@ledgerflow.workflow(name="shop")
async def shop(ctx: ledgerflow.WorkflowContext, order: str) -> str:
    return await ctx.step(charge, order)


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    level, root.level = root.level, logging.INFO
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_step_code_logs_carry_its_workflow_step_attempt_correlation_and_trace(
    lines: io.StringIO, tmp_path: Path, spans: object
) -> None:
    async with ledgerflow.Engine(f"sqlite:///{tmp_path / 'l.db'}", workflows=[shop]) as engine:
        with tracer.start_as_current_span("checkout") as root:
            handle = await engine.start(shop, "o-1", id="s-1", correlation_id="cart-42")
        assert await handle.result() == "charged o-1"
    (record,) = [r for r in records(lines) if r["logger"] == "shop.steps"]
    assert record["message"] == "charging o-1"
    assert record["level"] == "info"
    assert (record["workflow_id"], record["step"], record["attempt"]) == ("s-1", "charge", 1)
    assert record["correlation_id"] == "cart-42"
    assert record["trace_id"] == f"{root.get_span_context().trace_id:032x}"
    (step,) = named("step charge")
    assert record["span_id"] == f"{step.context.span_id:016x}"  # the step's own span
    assert str(record["time"]).endswith("+00:00")


@ledgerflow.step(name="erp.book", queue="erp")
def book(order: str) -> str:
    step_log.info("booking %s", order)
    return f"booked {order}"


@ledgerflow.workflow(name="shop-remote")
async def shop_remote(ctx: ledgerflow.WorkflowContext, order: str) -> str:
    return await ctx.step(book, order)


async def test_a_step_run_by_a_task_queues_worker_logs_its_correlation_id(
    lines: io.StringIO, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    async with (
        ledgerflow.Engine(url, workflows=[shop_remote]) as engine,
        ledgerflow.Engine(url, queues=["erp"], steps=[book]),
    ):
        handle = await engine.start(shop_remote, "o-2", id="q-1", correlation_id="cart-7")
        assert await handle.result() == "booked o-2"
    (record,) = [r for r in records(lines) if r["message"] == "booking o-2"]
    assert (record["workflow_id"], record["step"], record["correlation_id"]) == (
        "q-1",
        "erp.book",
        "cart-7",
    )


def test_engine_records_name_their_workflow_and_errors_keep_their_traceback(
    lines: io.StringIO,
) -> None:
    log = logging.getLogger("ledgerflow.engine")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("workflow %s: pass failed", "w-7", extra={"workflow_id": "w-7"})
    (record,) = records(lines)
    assert record["workflow_id"] == "w-7"
    assert "RuntimeError: boom" in str(record["error"])


def test_the_format_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        monkeypatch.setenv("LEDGERFLOW_LOG_FORMAT", "json")
        configure()
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
        monkeypatch.setenv("LEDGERFLOW_LOG_FORMAT", "xml")
        with pytest.raises(ledgerflow.ConfigurationError, match="text or json"):
            configure()
        url = f"sqlite:///{tmp_path}/x.db"

        async def create() -> None:
            async with ledgerflow.open_store(url):
                pass

        asyncio.run(create())
        result = CliRunner().invoke(app, ["audit", "checkpoint", "--db", url, "--follow"])
        assert result.exit_code == 2
        assert "text or json" in result.output
        assert "Traceback" not in result.output
    finally:
        root.handlers[:] = handlers


def test_a_text_line_cannot_be_forged_by_what_it_quotes() -> None:
    """A cancel reason or an id with a newline wrote a line of its own into the text
    log, which passed for another record; ESC sequences acted on a terminal."""
    from ledgerflow.logs import TextFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("ledgerflow.test.forged")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("cancelled: %s", "ok\n2026-12-02 00:00:00 ERROR forged\x1b[2J\r\u2028")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    first, *rest = stream.getvalue().splitlines()
    assert first.endswith("cancelled: ok\\x0a2026-12-02 00:00:00 ERROR forged\\x1b[2J\\x0d\\u2028")
    assert rest[0].endswith("ERROR failed")
    assert rest[1] == "Traceback (most recent call last):"  # a traceback keeps its lines


def declines(order: str) -> str:
    raise ValueError(f"card declined for {order}")


def refund(order: str) -> None:
    pass


@ledgerflow.workflow(name="shop.declined")
async def declined(ctx: ledgerflow.WorkflowContext, order: str) -> str:
    await ctx.step(charge, order, compensate=refund)
    return await ctx.step(declines, order, retry=ledgerflow.RetryPolicy.none())


async def test_a_step_failed_for_good_and_an_unhappy_end_are_logged(
    lines: io.StringIO, tmp_path: Path
) -> None:
    """Only the step's own lines said anything: nothing from the engine when a step
    failed for good or the instance ended compensated."""
    async with ledgerflow.Engine(f"sqlite:///{tmp_path / 'd.db'}", workflows=[declined]) as e:
        handle = await e.start(declined, "o-3", id="d-1")
        with pytest.raises(ledgerflow.WorkflowFailedError):
            await handle.result()
    engine = [r for r in records(lines) if r["logger"] == "ledgerflow.engine"]
    failed, ended = engine[-2:]
    assert (failed["level"], failed["workflow_id"], failed["step"]) == (
        "warning",
        "d-1",
        "declines",
    )
    assert "failed for good: ValueError: card declined for o-3" in str(failed["message"])
    assert (ended["level"], ended["workflow_id"]) == ("warning", "d-1")
    assert str(ended["message"]).startswith("workflow d-1 ended compensated: StepFailedError")


@ledgerflow.workflow(name="napping", version=1)
async def napping(ctx: ledgerflow.WorkflowContext, order: str) -> str:
    await ctx.sleep(3600)
    return order


async def test_a_lease_taken_over_is_logged_with_its_workflow(
    lines: io.StringIO, tmp_path: Path
) -> None:
    """The engine's one line about an instance without its workflow_id field."""
    from ledgerflow.store.runtime import Lease

    async with ledgerflow.Engine(f"sqlite:///{tmp_path / 'n.db'}", workflows=[napping]) as e:
        await e.start(napping, "o-9", id="n-1")
        await waiting_for(e, "n-1", "timer")
        later = e._now_us() + 7200 * 1_000_000  # past its timer: claimable
        (taken,) = await e.store.claim_wakeups(
            "intruder", now_us=later, lease_until_us=later + 60_000_000, limit=5, workflows=None
        )
        await e._lost(Lease("n-1", taken.epoch - 1))
    (stepped,) = [r for r in records(lines) if "taken over by intruder" in str(r["message"])]
    assert (stepped["level"], stepped["workflow_id"]) == ("warning", "n-1")
