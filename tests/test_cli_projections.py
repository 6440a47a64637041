"""``ledgerflow projections list|status|retry|skip|query`` on a SQLite ledger."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ledgerflow as lf
from ledgerflow.cli import app

from ._engines import WAIT
from ._workers import CLI, child_env

SHOP = textwrap.dedent(
    """
    from dataclasses import dataclass

    import ledgerflow as lf

    REGISTRY = lf.EventRegistry()


    @REGISTRY.event("shop.placed")
    @dataclass(frozen=True)
    class Placed:
        customer: str
        amount_cents: int


    ORDERS = lf.Table(
        "orders",
        key="order_id",
        columns={"order_id": str, "customer": str, "amount_cents": int, "status": str},
        indexes=("customer",),
    )
    PROJECTION = lf.Projection("shop", tables=[ORDERS])
    BROKEN = {"o-bad"}


    @PROJECTION.on(Placed)
    def placed(event, view):
        if event.stream_id in BROKEN:
            raise ValueError("no customer " + event.data.customer)
        view.put(ORDERS, {"order_id": event.stream_id, "customer": event.data.customer,
                          "amount_cents": event.data.amount_cents, "status": "placed"})
    """
)

runner = CliRunner()


@pytest.fixture
def shop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    (tmp_path / "shop_app.py").write_text(SHOP)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("shop_app", None)
    import shop_app  # type: ignore[import-not-found]

    return shop_app


def test_operators_see_list_retry_skip_and_query_a_projection(tmp_path: Path, shop: object) -> None:
    db = f"sqlite:///{tmp_path / 'shop.db'}"
    module: object = shop
    registry = module.REGISTRY  # type: ignore[attr-defined]
    placed = module.Placed  # type: ignore[attr-defined]
    projection = module.PROJECTION  # type: ignore[attr-defined]

    async def write_and_run() -> None:
        async with lf.open_store(db, registry=registry) as store:
            await store.append("o-1", [placed("acme", 500)])
            await store.append("o-bad", [placed("ghost", 1)])
            await store.append("o-2", [placed("bob", 70)])
            await lf.ProjectionRunner(store, [projection]).catch_up()

    asyncio.run(write_and_run())
    listed = runner.invoke(app, ["projections", "list", "--db", db])
    assert listed.exit_code == 0, listed.output
    assert "STOPPED" in listed.stdout
    as_json = runner.invoke(app, ["projections", "list", "--db", db, "--json"])
    (line,) = as_json.stdout.splitlines()
    assert json.loads(line)["failure"]["message"] == "no customer ghost"
    status = runner.invoke(app, ["projections", "status", "shop", "--db", db])
    assert status.exit_code == 0, status.output
    found = json.loads(status.stdout)
    assert (found["position"], found["behind"]) == (1, 2)
    assert found["failure"]["event_type"] == "shop.placed"
    no_reason = runner.invoke(app, ["projections", "skip", "shop", "--db", db, "--reason", " "])
    assert no_reason.exit_code == 2
    wrong = runner.invoke(
        app, ["projections", "skip", "shop", "--db", db, "--reason", "x", "--position", "3"]
    )
    assert wrong.exit_code == 2
    assert "failed at position 2, not 3" in wrong.stderr
    retried = runner.invoke(app, ["projections", "retry", "shop", "--db", db, "--actor", "ops"])
    assert retried.exit_code == 0, retried.output
    asyncio.run(_catch_up(db, registry, projection))  # fails again at the same event
    skipped = runner.invoke(
        app,
        ["projections", "skip", "shop", "--db", db, "--reason", "ghost order", "--actor", "ops"],
    )
    assert skipped.exit_code == 0, skipped.output
    assert "skipped shop.placed" in skipped.stdout
    asyncio.run(_catch_up(db, registry, projection))
    status = runner.invoke(app, ["projections", "status", "shop", "--db", db])
    assert json.loads(status.stdout)["behind"] == 0
    query = runner.invoke(
        app,
        ["projections", "query", "orders", "--app", "shop_app:PROJECTION", "--db", db,
         "--where", "customer=acme", "--json"],
    )  # fmt: skip
    assert query.exit_code == 0, query.output
    assert [json.loads(line) for line in query.stdout.splitlines()] == [
        {"order_id": "o-1", "customer": "acme", "amount_cents": 500, "status": "placed"}
    ]
    table = runner.invoke(
        app, ["projections", "query", "orders", "--app", "shop_app:PROJECTION", "--db", db,
              "--order-by", "amount_cents", "--desc"],
    )  # fmt: skip
    assert table.exit_code == 0, table.output
    assert table.stdout.index("o-1") < table.stdout.index("o-2")
    twice = runner.invoke(
        app, ["projections", "query", "orders", "--app", "shop_app:PROJECTION", "--db", db,
              "--where", "customer=acme", "--where", "customer=zed"],
    )  # fmt: skip
    assert twice.exit_code == 2  # the first was silently dropped
    assert "customer is given twice" in twice.stderr
    missing = runner.invoke(app, ["projections", "status", "nope", "--db", db])
    assert missing.exit_code == 2
    assert "no projection 'nope'" in missing.stderr


async def _catch_up(db: str, registry: lf.EventRegistry, projection: lf.Projection) -> None:
    async with lf.open_store(db, registry=registry) as store:
        await lf.ProjectionRunner(store, [projection]).catch_up()


def test_a_worker_runs_the_projections_of_its_app_with_the_apps_event_types(
    tmp_path: Path, shop: object
) -> None:
    """A worker opened its store without the app's event registry: events read as
    plain data, no handler keyed on a class matched, and the projection moved past
    every event as one it does not handle (0 rows, no failure, nothing behind)."""
    module: object = shop
    registry = module.REGISTRY  # type: ignore[attr-defined]
    placed = module.Placed  # type: ignore[attr-defined]
    db = f"sqlite:///{tmp_path / 'shop.db'}"

    async def write() -> None:
        async with lf.open_store(db, registry=registry) as store:
            await store.append("o-1", [placed("acme", 500)])
            await store.append("o-bad", [placed("ghost", 1)])

    asyncio.run(write())
    worker = subprocess.Popen(
        [*CLI, "worker", "--app", "shop_app", "--db", db, "--poll", "0.05"],
        cwd=tmp_path,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + WAIT
        while True:
            status = runner.invoke(app, ["projections", "status", "shop", "--db", db])
            found = json.loads(status.stdout) if status.exit_code == 0 else {}
            if found.get("failure") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=WAIT)
    assert worker.returncode == 0, output
    assert (found["position"], found["behind"]) == (1, 1)
    assert found["failure"]["message"] == "no customer ghost"
    query = runner.invoke(
        app,
        ["projections", "query", "orders", "--app", "shop_app:PROJECTION", "--db", db, "--json"],
    )
    assert [json.loads(line)["order_id"] for line in query.stdout.splitlines()] == ["o-1"]


async def test_a_projection_of_event_classes_the_store_does_not_know_is_refused(
    tmp_path: Path, shop: object
) -> None:
    projection = shop.PROJECTION  # type: ignore[attr-defined]
    async with lf.open_store(f"sqlite:///{tmp_path / 'x.db'}") as store:
        with pytest.raises(lf.ConfigurationError, match="handles Placed, which the store's"):
            lf.ProjectionRunner(store, [projection])
    with pytest.raises(lf.ConfigurationError, match="handles Placed"):
        lf.Engine(f"sqlite:///{tmp_path / 'y.db'}", projections=[projection])
    # Keyed on a base class of registered ones, or with the registry: fine.
    async with lf.open_store(
        f"sqlite:///{tmp_path / 'x.db'}",
        registry=shop.REGISTRY,  # type: ignore[attr-defined]
    ) as store:
        lf.ProjectionRunner(store, [projection])
        base = lf.Projection("any")
        base.on(object)(lambda event, view: None)
        lf.ProjectionRunner(store, [base])
