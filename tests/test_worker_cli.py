"""``ledgerflow worker``: real worker processes, started, stopped with SIGTERM (issue 12).

A worker runs the workflows of ``--app`` until SIGTERM, then stops claiming, gives
running passes ``--grace`` seconds, gives its leases back and exits 0, so the next
worker takes over at once instead of after the lease.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest

import ledgerflow

from ._engines import WAIT
from ._workers import CLI, child_env

APP = textwrap.dedent(
    """
    import os
    import time

    import ledgerflow as lf

    MARKS = os.environ["MARKS"]


    def charge(n: int) -> int:
        with open(MARKS, "a") as marks:
            marks.write(f"{os.getpid()} {time.time()} charge {n}\\n")
        time.sleep(float(os.environ.get("STEP_SECONDS", "0")))
        return n * 2


    @lf.workflow(name="shop.order", version=1)
    async def order(ctx: lf.WorkflowContext, n: int) -> int:
        return await ctx.step(charge, n) + 1
    """
)


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    (tmp_path / "shop.py").write_text(APP)
    return tmp_path


def worker(shop: Path, db: str, *extra: str, step_seconds: float = 0) -> subprocess.Popen[str]:
    env = child_env(MARKS=str(shop / "marks.txt"), STEP_SECONDS=str(step_seconds))
    return subprocess.Popen(
        [
            *CLI,
            "worker",
            "--app",
            "shop",
            "--db",
            db,
            "--poll",
            "0.05",
            *extra,
        ],
        cwd=shop,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def marks(shop: Path) -> list[tuple[int, float, str]]:
    path = shop / "marks.txt"
    if not path.exists():
        return []
    rows = [line.split(" ", 2) for line in path.read_text().splitlines()]
    return [(int(pid), float(at), what) for pid, at, what in rows]


def stop(process: subprocess.Popen[str]) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=WAIT)
    return process.returncode, output


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'shop.db'}"


def client(db: str, shop: Path) -> ledgerflow.WorkflowClient:
    os.environ["MARKS"] = str(shop / "marks.txt")  # read when the module is imported
    sys.path.insert(0, str(shop))
    try:
        sys.modules.pop("shop", None)
        import shop as module  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(shop))
    return ledgerflow.WorkflowClient(db, workflows=[module.order], poll_interval=0.05)


async def started_ledger(db: str) -> None:
    """Workers create the ledger; wait until the first one has."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            async with ledgerflow.open_store(db, create=False):
                return
        except ledgerflow.LedgerNotFoundError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_a_worker_runs_the_app_and_exits_0_on_sigterm(shop: Path, db: str) -> None:
    process = worker(shop, db)
    try:
        await started_ledger(db)
        async with client(db, shop) as c:
            for i in range(5):
                await c.start("shop.order", i, id=f"o-{i}")
            results = [await c.handle(f"o-{i}").result(timeout=WAIT) for i in range(5)]
    finally:
        code, output = stop(process)
    assert results == [i * 2 + 1 for i in range(5)]
    assert code == 0, output
    assert "started" in output
    assert "stopped; its leases are given back" in output
    assert "Traceback" not in output


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text: str = answer.read().decode()
        return text


async def test_a_worker_serves_its_metrics_and_the_stores_gauges(shop: Path, db: str) -> None:
    port = free_port()
    process = worker(shop, db, "--metrics-port", str(port))
    try:
        await started_ledger(db)
        async with client(db, shop) as c:
            await c.start("shop.order", 1, id="m-1")
            assert await c.handle("m-1").result(timeout=WAIT) == 3
        done = 'ledgerflow_workflows_finished_total{status="completed",workflow="shop.order"} 1.0'
        deadline = time.monotonic() + WAIT
        while True:
            try:
                text = scrape(port)
            except OSError:
                text = ""
            if done in text and 'ledgerflow_instances{status="running"}' in text:
                break
            assert time.monotonic() < deadline, text
            await asyncio.sleep(0.05)
        assert 'ledgerflow_step_attempt_seconds_count{outcome="ok",step="charge"} 1.0' in text
    finally:
        code, output = stop(process)
    assert code == 0, output


async def test_a_stopped_worker_hands_its_instances_over_at_once(shop: Path, db: str) -> None:
    # A 60 s lease, a step of 3 s and a grace of 0.1 s: the first worker cancels the
    # pass, waits for the step's body to return (nothing can stop it: given back at
    # once, the lease let the second worker run the step beside it), gives the lease
    # back and exits; the second claims the instance at once.
    first = worker(shop, db, "--lease", "60", "--grace", "0.1", step_seconds=3)
    try:
        await started_ledger(db)
        async with client(db, shop) as c:
            await c.start("shop.order", 7, id="handed")
            deadline = time.monotonic() + WAIT
            while not marks(shop):
                assert time.monotonic() < deadline, "the step never began"
                await asyncio.sleep(0.05)
            code, output = stop(first)
            stopped_at = time.time()
            assert code == 0, output
            second = worker(shop, db, "--lease", "60")
            try:
                assert await c.handle("handed").result(timeout=WAIT) == 15
            finally:
                code, output = stop(second)
            assert code == 0, output
    finally:
        if first.poll() is None:
            first.kill()
    runs = marks(shop)
    assert [pid for pid, _, _ in runs] == [first.pid, second.pid]
    # Well before the 60 s lease would have let anyone take it, and not beside the
    # first body: it had ended (its 3 s) before the second began.
    assert runs[1][1] - stopped_at < 30
    assert runs[1][1] >= runs[0][1] + 3


def test_a_worker_without_workflows_says_so_and_exits_2(shop: Path, db: str) -> None:
    (shop / "empty.py").write_text("x = 1\n")
    result = subprocess.run(
        [
            *CLI,
            "worker",
            "--app",
            "empty",
            "--db",
            db,
        ],
        cwd=shop,
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=child_env(),
    )
    assert result.returncode == 2
    assert "no workflows, projections or steps found" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ("raise RuntimeError('boom at import')\n", "RuntimeError: boom at import"),
        ("def broken(:\n", "SyntaxError"),
        (
            "import ledgerflow as lf\n\n@lf.workflow(name='w', version=0)\n"
            "async def w(ctx, n: int) -> int:\n    return n\n",
            "WorkflowDefinitionError",
        ),
    ],
    ids=["raises", "syntax error", "bad definition"],
)
def test_an_app_that_fails_to_import_is_an_error_not_a_traceback(
    shop: Path, db: str, source: str, says: str
) -> None:
    """It was a traceback and exit 1, which for replay-check means "would break"."""
    (shop / "failing.py").write_text(source)
    for command in (["worker", "--app", "failing"], ["replay-check", "--app", "failing"]):
        result = subprocess.run(
            [*CLI, *command, "--db", db],
            cwd=shop,
            capture_output=True,
            text=True,
            timeout=WAIT,
            env=child_env(),
        )
        assert result.returncode == 2, (command, result.stderr)
        assert "importing 'failing' failed" in result.stderr
        assert says in result.stderr
        assert "Traceback" not in result.stderr


async def test_closing_does_not_wait_for_a_store_out_of_reach(tmp_path: Path) -> None:
    """A worker told to stop while its database could not be reached waited out
    every call's own timeouts (a minute, against a grace of 10 s): what closing
    tells the store is bounded now, and the leases expire by themselves."""
    import sqlite3

    from ledgerflow.workflow import engine as engine_module

    path = tmp_path / "locked.db"
    engine = ledgerflow.Engine(f"sqlite:///{path}?busy_timeout=120")
    await engine.open()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # every write waits up to the busy timeout
    try:
        began = time.monotonic()
        await engine.close(grace=0.1)
        took = time.monotonic() - began
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # A bound on hanging, with room: not a measure of speed.
    assert took < 60, took
    assert engine_module.CLOSE_BOOKKEEPING_S < 60


body_may_end = threading.Event()
body_began = threading.Event()


def long_body(n: int) -> int:
    body_began.set()
    assert body_may_end.wait(60)
    return n


@ledgerflow.workflow(name="closing.long", version=1)
async def long_flow(ctx: ledgerflow.WorkflowContext, n: int) -> int:
    return await ctx.step(long_body, n)


async def test_a_step_body_still_running_at_close_keeps_its_lease(tmp_path: Path) -> None:
    """Closing gave every lease back after the grace period although a sync step's
    body (which nothing can stop) still ran: another worker started the same step
    at once, and both ran it together (seen in every rolling restart)."""
    url = f"sqlite:///{tmp_path / 'long.db'}"
    body_may_end.clear()
    body_began.clear()
    engine = ledgerflow.Engine(url, workflows=[long_flow], lease=timedelta(seconds=4))
    await engine.open()
    try:
        await engine.start(long_flow, 1, id="long-1")
        assert await asyncio.to_thread(body_began.wait, WAIT)
        await engine.close(grace=0.1)
        async with ledgerflow.open_store(url) as store:
            row = await store.get_wakeup("long-1")
        assert row is not None
        assert row.lease_owner == engine.owner  # left to expire, not handed over
    finally:
        body_may_end.set()
