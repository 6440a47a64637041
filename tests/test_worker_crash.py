"""Several worker processes on one ledger, killed with SIGKILL again and again (issue 12).

Three ``ledgerflow worker`` processes run 3-step order workflows; one of them is killed
at random every fraction of a second and replaced, eight times. Then every workflow
completes with its result, no step result is recorded twice in any history, and an
idempotency-keyed fake external system has applied each effect exactly once (its
requests may repeat: steps are at-least-once).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

import ledgerflow
from ledgerflow.workflow.history import StepDone

from ._workers import CLI, child_env

APP = textwrap.dedent(
    """
    import os
    import time

    import ledgerflow as lf

    EFFECTS = os.environ["EFFECTS"]


    def apply(label: str, n: int) -> int:
        # The fake external system: appends one line per request, keyed.
        key = lf.current_step().idempotency_key
        with open(EFFECTS, "a") as effects:
            effects.write(f"{key} {label}\\n")
        time.sleep(0.2)
        return n + 1


    @lf.workflow(name="crash.order", version=1)
    async def order(ctx: lf.WorkflowContext, n: int) -> int:
        a = await ctx.step(apply, "reserve", n)
        b = await ctx.step(apply, "charge", a)
        return await ctx.step(apply, "ship", b)
    """
)

# The same order, its charge sent to the "pay" task queue, which only the payment
# service's workers serve (``--app crashapp:apply --queue pay``).
REMOTE_APP = APP.replace("\ndef apply(", '\n@lf.step(name="apply")\ndef apply(').replace(
    'b = await ctx.step(apply, "charge", a)', 'b = await ctx.step(apply, "charge", a, queue="pay")'
)

INSTANCES = 240
KILLS = 8
WORKERS = 3


def spawn(app_dir: Path, db: str, *app: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            *CLI,
            "worker",
            "--app",
            *(app or ("crashapp",)),
            "--db",
            db,
            "--poll",
            "0.05",
            "--lease",
            "2",
            "--concurrency",
            "50",
        ],
        cwd=app_dir,
        env=child_env(EFFECTS=str(app_dir / "effects.txt")),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    from .conftest import pg_url

    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'crash.db'}"
    return pg_url(request.getfixturevalue("pg_schema"))


async def test_killed_workers_lose_and_double_nothing(tmp_path: Path, db: str) -> None:
    await _kill_run(tmp_path, db, instances=INSTANCES, workers=WORKERS, kills=KILLS)


@pytest.mark.postgres
@pytest.mark.slow
async def test_four_workers_two_thousand_orders_twenty_kills(
    tmp_path: Path, pg_schema: str
) -> None:
    """The issue's full size: 4 workers, 2,000 orders, a worker killed 20 times."""
    from .conftest import pg_url

    await _kill_run(
        tmp_path, pg_url(pg_schema), instances=2000, workers=4, kills=20, gap=(0.2, 0.5)
    )


@pytest.mark.postgres
async def test_killed_workers_of_two_services_lose_and_double_nothing(
    tmp_path: Path, pg_schema: str
) -> None:
    """Orders workers and payment workers (serving the "pay" task queue) are killed at
    random and replaced: every order completes, every step result is recorded once,
    every effect applied."""
    from .conftest import pg_url

    await _kill_run(
        tmp_path,
        pg_url(pg_schema),
        instances=200,
        workers=4,
        kills=KILLS,
        app=REMOTE_APP,
        kinds=[(), ("crashapp:apply", "--queue", "pay")],
    )


async def _kill_run(
    tmp_path: Path,
    db: str,
    *,
    instances: int,
    workers: int,
    kills: int,
    gap: tuple[float, float] = (0.1, 0.3),
    app: str = APP,
    kinds: list[tuple[str, ...]] | None = None,
) -> None:
    """``workers`` worker processes (taking turns among ``kinds`` of command line),
    one killed at random ``kills`` times and replaced by one of its kind."""
    (tmp_path / "crashapp.py").write_text(app)
    # The ledger exists before the workers race to create it.
    async with ledgerflow.open_store(db):
        pass
    rng = random.Random(12)
    assert app.count("ctx.step") == 3
    kinds = kinds or [()]
    running = [spawn(tmp_path, db, *kinds[i % len(kinds)]) for i in range(workers)]
    kind_of = {w.pid: kinds[i % len(kinds)] for i, w in enumerate(running)}
    try:
        async with ledgerflow.WorkflowClient(db, poll_interval=0.05) as client:
            # Kills begin while the orders are still being started (2,000 starts take
            # seconds, and the workers run the first ones meanwhile).
            starting = asyncio.create_task(start_all(client, tmp_path, instances))
            await asyncio.sleep(0.3)
            mid_run = 0
            for _ in range(kills):
                await asyncio.sleep(rng.uniform(*gap))
                mid_run += effects_done(tmp_path) < 3 * instances
                victim = running.pop(rng.randrange(len(running)))
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                again = spawn(tmp_path, db, *kind_of[victim.pid])
                kind_of[again.pid] = kind_of[victim.pid]
                running.append(again)
            await starting
            # A worker that exited by itself (a bad command line, a crash) would
            # only show as a timeout below.
            assert all(w.poll() is None for w in running), "a worker exited by itself"
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(client.handle(f"o-{i}").result(timeout=240) for i in range(instances))
                ),
                timeout=270,
            )
            recorded = await _recorded_steps(client, instances)
    finally:
        for worker in running:
            worker.kill()
            worker.wait()
    lines, applied = _each_once(tmp_path, instances, results, recorded)
    # Steps in flight when a worker died ran again: a few repeats, never most.
    assert mid_run >= kills // 2  # the kills did hit work in flight
    assert len(lines) - len(applied) < instances


async def _recorded_steps(
    client: ledgerflow.WorkflowClient, instances: int
) -> Counter[tuple[str, int]]:
    """How many times each (order, step) result is recorded in the histories."""
    recorded = Counter[tuple[str, int]]()
    for i in range(instances):
        for event in await client.history(f"o-{i}"):
            if isinstance(event.data, StepDone):
                recorded[(f"o-{i}", event.data.seq)] += 1
    return recorded


def _each_once(
    app_dir: Path, instances: int, results: list[object], recorded: Counter[tuple[str, int]]
) -> tuple[list[str], set[str]]:
    """Every order finished with its result, each step result is recorded once, and
    the external system applied each effect; the effect lines and the keys applied."""
    assert results == [i + 3 for i in range(instances)]
    assert set(recorded.values()) == {1}  # no step result recorded twice
    assert len(recorded) == 3 * instances
    lines = (app_dir / "effects.txt").read_text().splitlines()
    applied = {line.split(" ", 1)[0] for line in lines}
    assert applied == {f"o-{i}/{seq}" for i in range(instances) for seq in (1, 2, 3)}
    return lines, applied


def effects_done(app_dir: Path) -> int:
    path = app_dir / "effects.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


async def start_all(
    client: ledgerflow.WorkflowClient, app_dir: Path, count: int = INSTANCES
) -> None:
    sys.path.insert(0, str(app_dir))
    os.environ["EFFECTS"] = str(app_dir / "effects.txt")
    try:
        sys.modules.pop("crashapp", None)
        import crashapp  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(app_dir))
    client.register(crashapp.order)
    for i in range(count):
        await client.start(crashapp.order, i, id=f"o-{i}")


RESTART_INSTANCES = 120


def _restart_postgres() -> None:
    """Restart the PostgreSQL cluster the tests use (fast shutdown: every session is
    cut, as in a failover or a crash-restart), and wait until it answers again."""
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not versions or shutil.which("pg_ctlcluster") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true and pg_ctlcluster is missing: cannot restart PostgreSQL")
        pytest.skip("restarting PostgreSQL needs pg_ctlcluster (Debian's postgresql-common)")
    subprocess.run(
        [
            "pg_ctlcluster",
            "--skip-systemctl-redirect",
            versions[-1],
            "main",
            "restart",
            "-m",
            "fast",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.parametrize("services", ["one", "two"])
async def test_postgres_restarted_mid_run_loses_and_doubles_nothing(
    tmp_path: Path, pg_schema: str, services: str
) -> None:
    """Every session is cut while workers run steps and write: workers back off and
    reconnect, appends whose commit was cut are settled (never recorded twice), and
    every workflow completes. With two services, the charge runs on the payment
    workers' task queue, so task claims and fenced task outcomes are cut too."""
    from .conftest import pg_url

    if os.geteuid() != 0 and os.environ.get("CI", "").lower() != "true":
        pytest.skip("restarting PostgreSQL needs root here")
    db = pg_url(pg_schema)
    (tmp_path / "crashapp.py").write_text(APP if services == "one" else REMOTE_APP)
    async with ledgerflow.open_store(db):
        pass
    payment = ("crashapp:apply", "--queue", "pay")
    workers = [spawn(tmp_path, db), spawn(tmp_path, db, *(() if services == "one" else payment))]
    try:
        async with ledgerflow.WorkflowClient(db, poll_interval=0.05) as client:
            await start_all(client, tmp_path, RESTART_INSTANCES)
            await _until_effects(tmp_path, RESTART_INSTANCES)
            in_flight = effects_done(tmp_path) < 3 * RESTART_INSTANCES
            await asyncio.to_thread(_restart_postgres)
            assert in_flight  # the restart cut work in flight
            assert all(w.poll() is None for w in workers)  # the outage ended no worker
            results = await _results(client, RESTART_INSTANCES)
            recorded = await _recorded_steps(client, RESTART_INSTANCES)
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
    _each_once(tmp_path, RESTART_INSTANCES, results, recorded)


async def _until_effects(app_dir: Path, count: int) -> None:
    async with asyncio.timeout(60):
        while True:
            if effects_done(app_dir) >= count:
                return
            await asyncio.sleep(0.05)


async def _results(client: ledgerflow.WorkflowClient, count: int) -> list[object]:
    """Every result, reading again while the server is still coming back (this client
    is the test's, not a worker: its reads may meet the outage)."""
    async with asyncio.timeout(150):
        while True:
            try:
                return list(
                    await asyncio.gather(
                        *(client.handle(f"o-{i}").result(timeout=120) for i in range(count))
                    )
                )
            except ledgerflow.StoreUnavailableError:
                await asyncio.sleep(0.2)
