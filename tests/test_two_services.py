"""Two services on one database, with real worker processes (issue 12).

The orders service runs the workflows; its ``reserve`` step is declared there only as
a stub on queue ``erp``. The ERP service runs ``ledgerflow worker --queue erp`` with
the real function. Stopping the ERP group parks the steps (the workflows wait,
nobody else runs them); starting it again resumes them; killing an ERP worker in the
middle of a step lets another finish it once the lease runs out, and an
idempotency-keyed ledger of effects applies each reservation once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

import ledgerflow

from ._engines import WAIT
from ._workers import CLI, child_env
from .conftest import backend_url

ORDERS = textwrap.dedent(
    """
    import ledgerflow as lf


    @lf.step(name="erp.reserve", queue="erp")
    def reserve(n: int) -> str:
        raise NotImplementedError("runs on the ERP service")


    def total(n: int, reservation: str) -> str:
        return f"{reservation}:{n * 10}"


    @lf.workflow(name="shop.order")
    async def order(ctx: lf.WorkflowContext, n: int) -> str:
        reservation = await ctx.step(reserve, n)
        return await ctx.step(total, n, reservation)
    """
)

ERP = textwrap.dedent(
    """
    import os
    import time

    import ledgerflow as lf

    EFFECTS = os.environ["EFFECTS"]


    @lf.step(name="erp.reserve")
    def reserve(n: int) -> str:
        key = lf.current_step().idempotency_key
        with open(EFFECTS, "a") as effects:
            effects.write(f"{os.getpid()} start {key}\\n")
        time.sleep(float(os.environ.get("STEP_SECONDS", "0")))
        # The external system applies each key once, however often it is called.
        with open(EFFECTS, "a") as effects:
            effects.write(f"{os.getpid()} applied {key}\\n")
        return f"R{n}"
    """
)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request.param, tmp_path, request)


@pytest.fixture
def services(tmp_path: Path) -> Path:
    (tmp_path / "orders.py").write_text(ORDERS)
    (tmp_path / "erp.py").write_text(ERP)
    return tmp_path


def start(
    services: Path, db: str, app: str, *extra: str, step_seconds: float = 0
) -> subprocess.Popen[str]:
    env = child_env(EFFECTS=str(services / "effects.txt"), STEP_SECONDS=str(step_seconds))
    return subprocess.Popen(
        [*CLI, "worker", "--app", app, "--db", db, "--poll", "0.05", *extra],
        cwd=services,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop(process: subprocess.Popen[str]) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=WAIT)
    assert process.returncode in (0, -signal.SIGKILL), output
    assert "Traceback" not in output, output
    return output


def effects(services: Path) -> list[tuple[int, str, str]]:
    path = services / "effects.txt"
    if not path.exists():
        return []
    rows = [line.split(" ") for line in path.read_text().splitlines()]
    return [(int(pid), what, key) for pid, what, key in rows]


def cli(services: Path, db: str, *args: str) -> list[dict[str, object]]:
    out = subprocess.run(
        [*CLI, *args, "--db", db, "--json"],
        cwd=services,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines()]


def client(db: str, services: Path) -> ledgerflow.WorkflowClient:
    """A client of the orders service, with its workflow (imported from its file)."""
    sys.path.insert(0, str(services))
    try:
        sys.modules.pop("orders", None)
        import orders  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(services))
    return ledgerflow.WorkflowClient(db, workflows=[orders.order], poll_interval=0.05)


async def ledger_ready(db: str) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        try:
            async with ledgerflow.open_store(db, create=False):
                return
        except (ledgerflow.LedgerNotFoundError, ledgerflow.SchemaOutdatedError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_steps_run_on_the_service_that_serves_their_queue(services: Path, db: str) -> None:
    orders = start(services, db, "orders", "--lease", "2")
    erp = start(services, db, "erp", "--queue", "erp", "--lease", "2")
    erp_again: subprocess.Popen[str] | None = None
    try:
        await ledger_ready(db)
        async with client(db, services) as c:
            for i in range(10):
                await c.start("shop.order", i, id=f"o-{i}")
            done = [await c.handle(f"o-{i}").result(timeout=WAIT) for i in range(10)]
            assert done == [f"R{i}:{i * 10}" for i in range(10)]
            registry = cli(services, db, "workers", "list")
            assert sorted(tuple(w["queues"]) for w in registry) == [(), ("erp",)]  # type: ignore[arg-type]

            # The ERP group stops: the steps wait for it, nobody else runs them.
            stop(erp)
            for i in range(10, 15):
                await c.start("shop.order", i, id=f"o-{i}")
            await asyncio.sleep(1.0)
            for i in range(10, 15):
                assert (await c.handle(f"o-{i}").describe()).status == "running"
            (erp_queue,) = cli(services, db, "queues", "list")
            assert erp_queue == {
                "queue": "erp",
                "max_concurrent": None,
                "ready": 5,
                "scheduled": 0,
                "running": 0,
            }
            erp_again = start(services, db, "erp", "--queue", "erp", "--lease", "2")
            done = [await c.handle(f"o-{i}").result(timeout=WAIT) for i in range(10, 15)]
            assert done == [f"R{i}:{i * 10}" for i in range(10, 15)]
    finally:
        for process in (orders, erp, erp_again):
            if process is not None:
                stop(process)
    applied = Counter(key for _, what, key in effects(services) if what == "applied")
    assert applied == Counter({f"o-{i}/1": 1 for i in range(15)})
    pids = {pid for pid, _, _ in effects(services)}
    assert pids <= {erp.pid, erp_again.pid if erp_again else 0}  # never the orders worker
    assert orders.pid not in pids


async def test_a_killed_step_worker_hands_its_step_to_another(services: Path, db: str) -> None:
    orders = start(services, db, "orders", "--lease", "1")
    first = start(services, db, "erp", "--queue", "erp", "--lease", "1", step_seconds=2)
    second: subprocess.Popen[str] | None = None
    try:
        await ledger_ready(db)
        async with client(db, services) as c:
            await c.start("shop.order", 3, id="killed")
            deadline = time.monotonic() + WAIT
            while not effects(services):
                assert time.monotonic() < deadline, "the step never began"
                await asyncio.sleep(0.02)
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=WAIT)
            second = start(services, db, "erp", "--queue", "erp", "--lease", "1")
            assert await c.handle("killed").result(timeout=WAIT) == "R3:30"
            history = await c.history("killed")
    finally:
        for process in (orders, first, second):
            if process is not None:
                stop(process)
    assert second is not None
    runs = [(pid, what) for pid, what, _ in effects(services)]
    assert runs[0] == (first.pid, "start")
    assert (second.pid, "applied") in runs
    assert (first.pid, "applied") not in runs
    types = [e.type for e in history]
    assert types.count("wf.step_done") == 2  # reserve once, total once
    assert types.count("wf.step_scheduled") == 1
