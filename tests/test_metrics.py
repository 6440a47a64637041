"""Prometheus metrics, asserted: a workflow started, its steps' attempts (ok and
failed), its passes, its end, an instance parked as stuck, and appends, as counted by
the engine and the store; served at /metrics by the HTTP server."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from litestar.testing import TestClient
from prometheus_client import REGISTRY

import ledgerflow
from ledgerflow.server import ServerSettings, create_app
from ledgerflow.server.openapi import openapi_document

from ._engines import until_status, waiting_for

failures = {"left": 1}


@ledgerflow.step(retry=ledgerflow.RetryPolicy(max_attempts=3, initial_interval=0.01))
def flaky(order: str) -> str:
    if failures["left"]:
        failures["left"] -= 1
        raise ConnectionError("erp down")
    return f"sent {order}"


@ledgerflow.workflow(name="metered")
async def metered(ctx: ledgerflow.WorkflowContext, order: str) -> str:
    return await ctx.step(flaky, order)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_the_engine_counts_what_it_does(tmp_path: Path) -> None:
    before = {
        "started": sample("ledgerflow_workflows_started_total", workflow="metered"),
        "done": sample(
            "ledgerflow_workflows_finished_total", workflow="metered", status="completed"
        ),
        "ok": sample("ledgerflow_step_attempt_seconds_count", step="flaky", outcome="ok"),
        "error": sample("ledgerflow_step_attempt_seconds_count", step="flaky", outcome="error"),
        "passes": sample("ledgerflow_pass_seconds_count", workflow="metered"),
        "appends": sample("ledgerflow_append_seconds_count", backend="sqlite"),
    }
    failures["left"] = 1
    url = f"sqlite:///{tmp_path / 'l.db'}"
    async with ledgerflow.Engine(url, workflows=[metered]) as engine:
        handle = await engine.start(metered, "o-1", id="m-1")
        assert await asyncio.wait_for(handle.result(), 10) == "sent o-1"
    assert sample("ledgerflow_workflows_started_total", workflow="metered") == before["started"] + 1
    assert (
        sample("ledgerflow_workflows_finished_total", workflow="metered", status="completed")
        == before["done"] + 1
    )
    assert (
        sample("ledgerflow_step_attempt_seconds_count", step="flaky", outcome="error")
        == before["error"] + 1
    )
    assert (
        sample("ledgerflow_step_attempt_seconds_count", step="flaky", outcome="ok")
        == before["ok"] + 1
    )
    assert sample("ledgerflow_pass_seconds_count", workflow="metered") > before["passes"]
    assert sample("ledgerflow_append_seconds_count", backend="sqlite") >= before["appends"] + 2


@ledgerflow.workflow(name="metered-nap")
async def napping(ctx: ledgerflow.WorkflowContext, order: str) -> str:
    await ctx.sleep(0.05)
    return await ctx.step(flaky, order)


async def test_retries_claims_and_commits_are_counted(tmp_path: Path) -> None:
    before = {
        "retries": sample("ledgerflow_step_retries_total", step="flaky"),
        "claims": sample("ledgerflow_claim_delay_seconds_count", kind="workflow"),
        "commits": sample("ledgerflow_commit_seconds_count", backend="sqlite"),
        "batched": sample("ledgerflow_commit_batch_appends_sum", backend="sqlite"),
        "appends": sample("ledgerflow_append_seconds_count", backend="sqlite"),
    }
    failures["left"] = 1
    url = f"sqlite:///{tmp_path / 'l.db'}"
    async with ledgerflow.Engine(url, workflows=[napping]) as engine:
        handle = await engine.start(napping, "o-2", id="n-1")
        assert await asyncio.wait_for(handle.result(), 10) == "sent o-2"
    assert sample("ledgerflow_step_retries_total", step="flaky") == before["retries"] + 1
    # The timer's wake-up was claimed once it was due (the start ran here unclaimed).
    assert sample("ledgerflow_claim_delay_seconds_count", kind="workflow") > before["claims"]
    commits = sample("ledgerflow_commit_seconds_count", backend="sqlite") - before["commits"]
    appends = sample("ledgerflow_append_seconds_count", backend="sqlite") - before["appends"]
    batched = sample("ledgerflow_commit_batch_appends_sum", backend="sqlite") - before["batched"]
    assert commits >= 1
    assert batched == appends  # each append in exactly one group commit
    assert commits <= appends


@ledgerflow.workflow(name="metered-stuck")
async def stuck(ctx: ledgerflow.WorkflowContext, order: str) -> str:
    await ctx.wait_for_signal("go")
    return order


@ledgerflow.workflow(name="metered-stuck")
async def changed(ctx: ledgerflow.WorkflowContext, order: str) -> str:
    await ctx.step(flaky, order)  # not what its history recorded
    return order


async def test_a_stuck_instance_is_counted(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    before = sample("ledgerflow_workflows_stuck_total", workflow="metered-stuck")
    async with ledgerflow.Engine(url, workflows=[stuck]) as engine:
        await engine.start(stuck, "o", id="st-1")
        await waiting_for(engine, "st-1", "signal 'go'")
    async with ledgerflow.Engine(url, workflows=[changed]) as engine:
        await engine.signal("st-1", "go")
        await until_status(engine, "st-1", "stuck")
    assert sample("ledgerflow_workflows_stuck_total", workflow="metered-stuck") == before + 1


def test_the_server_serves_metrics_without_credentials() -> None:
    engine = ledgerflow.Engine("memory://", workflows=[metered])
    with TestClient(create_app(engine, ServerSettings(gauges_every=0.05))) as http:
        answer = http.get("/metrics")
        # The store's gauges are read in the background from the start.
        for _ in range(200):
            if "ledgerflow_instances{" in answer.text:
                break
            time.sleep(0.01)
            answer = http.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    assert "ledgerflow_append_seconds" in answer.text
    assert 'ledgerflow_instances{status="running"}' in answer.text
    assert "/metrics" not in openapi_document()["paths"]  # not part of the API
