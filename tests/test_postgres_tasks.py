"""Task queues on PostgreSQL only: the migration, and the locks. Whatever waits for
task rows takes them in task_id order, after any wake-up rows it takes (a write
transaction, a renewal, a release, a reap), and claims never wait for them: so
none of them can deadlock with another. The contract every backend shares is in
test_task_rows."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest

from ledgerflow import Appended, NewEvent
from ledgerflow.store._base import BaseEventStore
from ledgerflow.store.postgres import _migrations
from ledgerflow.store.runtime import (
    DropTask,
    DropTasks,
    Nudge,
    PutTask,
    QueueRow,
    Schedule,
    TaskFence,
    TaskLease,
    TaskRow,
    WakeupRow,
    WorkerRow,
)

from ._adapters import open_adapter
from .conftest import lock_waiters, pg_admin, pg_url, terminate_backends

pytestmark = pytest.mark.postgres

NOW = 1_000_000_000
LEASE = 30_000_000
FAR = 2**62


def ev(n: int = 0) -> NewEvent:
    return NewEvent("noted", {"n": n}, id=uuid.uuid4())


def task(workflow_id: str, seq: int = 1, *, queue: str = "erp") -> TaskRow:
    return TaskRow(f"{workflow_id}/{seq}", workflow_id, seq, "step", "reserve", queue, "{}", NOW)


async def claim(
    store: BaseEventStore, owner: str = "w1", *, limit: int = 10, queues: tuple[str, ...] = ("erp",)
) -> list[TaskRow]:
    return await store.claim_tasks(
        owner, queues=queues, now_us=NOW, lease_until_us=NOW + LEASE, limit=limit
    )


def _locked(schema: str, table: str, key: str, value: str) -> bool:
    """Whether another transaction holds that row's lock."""
    with pg_admin() as probe, probe.transaction():
        try:
            probe.execute(
                f"SELECT 1 FROM {schema}.{table} WHERE {key} = %s FOR UPDATE NOWAIT", (value,)
            )
        except psycopg.errors.LockNotAvailable:
            return True
    return False


# -- the schema -----------------------------------------------------------------------


async def test_a_ledger_at_version_5_gets_the_task_tables_on_open(pg_schema: str) -> None:
    url = pg_url(pg_schema)
    async with open_adapter(url) as store:
        await store.append("s", [ev()])
    with pg_admin() as con:
        s = pg_schema
        con.execute(
            f"DROP TABLE {s}.tasks, {s}.queues, {s}.resources, {s}.permits, {s}.projections, "
            f"{s}.inbox, {s}.merkle_tiles, {s}.checkpoints, {s}.subject_keys"
        )
        con.execute(f"DROP INDEX {s}.workflows_by_created")
        con.execute(f"DELETE FROM {pg_schema}.schema_migrations WHERE version > 5")
    async with open_adapter(url) as store:
        await store.append("wf-a", [ev()], runtime=[PutTask(task("a"))])
        await store.set_queue_limit("erp", 1)
        (claimed,) = await claim(store, limit=5)
        assert (claimed.task_id, claimed.lease_epoch, claimed.attempt) == ("a/1", 1, 1)
        assert await store.list_queues(NOW) == [QueueRow("erp", 1, 0, 0, 1)]
    with pg_admin() as con:
        rows = con.execute(
            f"SELECT version, name FROM {pg_schema}.schema_migrations ORDER BY version"
        ).fetchall()
    assert rows[-7] == (6, "task queues")
    assert rows[-6] == (7, "guarded resources: breakers, rate limits, bulkheads")
    assert rows[-5] == (8, "projections: checkpoints, leases, failures")
    assert rows[-4] == (9, "instances listed newest first")
    assert rows[-3] == (10, "audit: Merkle tiles, checkpointed tree heads, personal-data keys")
    assert rows[-2] == (11, "task attempts lost with their workers")
    assert rows[-1] == (12, "task attempts handed back unfinished")
    assert _migrations(pg_schema)[-1].version == 12


async def test_the_payload_is_kept_byte_for_byte(pg_schema: str) -> None:
    payload = '{"b": 1,   "a": [1.50, "\\u00e9", "é"]}'
    row = TaskRow("a/1", "a", 1, "step", "reserve", "erp", payload, NOW)
    async with open_adapter(pg_url(pg_schema)) as store:
        await store.append("wf-a", [ev()], runtime=[PutTask(row)])
        assert [t.payload for t in await store.list_tasks()] == [payload]
        assert [t.payload for t in await claim(store)] == [payload]


# -- lock order -----------------------------------------------------------------------


async def test_a_write_locks_its_wakeups_before_its_tasks(pg_schema: str) -> None:
    s = pg_schema
    async with open_adapter(pg_url(s)) as store:
        await store.append(
            "wf-a", [ev()], runtime=[Schedule("a", 1, "runner", FAR), PutTask(task("a"))]
        )
        (held,) = await claim(store)
        with pg_admin() as blocker, blocker.transaction():
            blocker.execute(f"SELECT 1 FROM {s}.tasks WHERE task_id = 'a/1' FOR UPDATE")
            # The task's write comes first in the batch; its lock still comes second.
            append = asyncio.create_task(
                store.append(
                    "wf-a",
                    [ev()],
                    fence=TaskFence("a/1", "w1", held.lease_epoch),
                    runtime=[DropTask("a/1"), Nudge("a", 0)],
                )
            )
            await lock_waiters(f"%{s}.tasks%", 1)
            assert _locked(s, "wakeups", "workflow_id", "a")
        async with asyncio.timeout(10):
            assert await append == Appended("wf-a", 2, (2,))
        assert await store.list_tasks() == []
        assert await store.get_wakeup("a") == WakeupRow("a", 0, "runner", FAR, 1)


async def test_dropping_a_workflows_tasks_locks_them_in_id_order(pg_schema: str) -> None:
    s = pg_schema
    async with open_adapter(pg_url(s)) as store:
        # Stored against the id order: a scan by workflow would meet a/3 first.
        await store.append("wf-a", [ev()], runtime=[PutTask(task("a", n)) for n in (3, 2, 1)])
        with pg_admin() as blocker, blocker.transaction():
            blocker.execute(f"SELECT 1 FROM {s}.tasks WHERE task_id = 'a/2' FOR UPDATE")
            append = asyncio.create_task(store.append("wf-a", [ev()], runtime=[DropTasks("a")]))
            await lock_waiters(f"%{s}.tasks%", 1)
            assert _locked(s, "tasks", "task_id", "a/1")
            assert not _locked(s, "tasks", "task_id", "a/3")
        async with asyncio.timeout(10):
            await append
        assert await store.list_tasks() == []


async def test_reaping_locks_wakeups_before_tasks(pg_schema: str) -> None:
    s = pg_schema
    async with open_adapter(pg_url(s)) as store:
        await store.register_worker(
            WorkerRow("dead", "h", 1, ("erp",), (), "v", NOW, NOW, LEASE, 1)
        )
        await store.append(
            "wf-a", [ev()], runtime=[Schedule("a", 1, "dead", FAR), PutTask(task("a"))]
        )
        await claim(store, "dead")
        with pg_admin() as blocker, blocker.transaction():
            blocker.execute(f"SELECT 1 FROM {s}.tasks WHERE task_id = 'a/1' FOR UPDATE")
            reap = asyncio.create_task(store.reap_workers(NOW + LEASE + 1))
            await lock_waiters(f"%{s}.tasks%", 1)
            assert _locked(s, "wakeups", "workflow_id", "a")
        async with asyncio.timeout(10):
            assert await reap == ["dead"]
        assert await store.get_wakeup("a") == WakeupRow("a", 1, None, None, 1)
        (t,) = await store.list_tasks()
        assert (t.lease_owner, t.lease_until_us, t.attempt, t.lease_epoch) == (None, None, 1, 1)


async def test_reaping_frees_expired_task_leases_of_owners_without_a_row(pg_schema: str) -> None:
    async with open_adapter(pg_url(pg_schema)) as store:
        await store.append("wf", [ev()], runtime=[PutTask(task("a")), PutTask(task("b"))])
        await claim(store, "ghost", limit=1)  # an engine from before the registry
        await store.claim_tasks(
            "young", queues=["erp"], now_us=NOW, lease_until_us=NOW + 3 * LEASE, limit=1
        )
        assert await store.reap_workers(NOW + LEASE + 1) == []
        a, b = await store.list_tasks()
        assert (a.lease_owner, a.attempt, b.lease_owner) == (None, 1, "young")


async def test_renewal_and_release_lock_in_id_order(pg_schema: str) -> None:
    s = pg_schema
    async with open_adapter(pg_url(s)) as store:
        await store.append("wf-a", [ev()], runtime=[PutTask(task("a", n)) for n in (3, 2, 1)])
        claimed = await claim(store)
        leases = [TaskLease(t.task_id, t.lease_epoch) for t in reversed(claimed)]
        for act in (
            lambda: store.renew_task_leases("w1", leases, lease_until_us=NOW + 9 * LEASE),
            lambda: store.release_tasks("w1"),
        ):
            with pg_admin() as blocker, blocker.transaction():
                blocker.execute(f"SELECT 1 FROM {s}.tasks WHERE task_id = 'a/2' FOR UPDATE")
                running = asyncio.create_task(act())
                await lock_waiters(f"%{s}.tasks%", 1)
                assert _locked(s, "tasks", "task_id", "a/1")
                assert not _locked(s, "tasks", "task_id", "a/3")
            async with asyncio.timeout(10):
                await running
        assert [(t.lease_owner, t.attempt) for t in await store.list_tasks()] == [(None, 0)] * 3


async def test_a_task_claim_skips_rows_being_written_instead_of_waiting(pg_schema: str) -> None:
    async with open_adapter(pg_url(pg_schema)) as store:
        await store.append("wf", [ev()], runtime=[PutTask(task(w)) for w in "abc"])
        with pg_admin() as blocker, blocker.transaction():
            blocker.execute(f"SELECT 1 FROM {pg_schema}.tasks WHERE task_id = 'b/1' FOR UPDATE")
            async with asyncio.timeout(10):
                first = await claim(store)
        second = await claim(store)
    assert [t.task_id for t in first] == ["a/1", "c/1"]
    assert [t.task_id for t in second] == ["b/1"]


# Whatever the server's default: the claim's count must see what committed while it
# waited for the queue's lock (a REPEATABLE READ snapshot, taken before, would not).
_REPEATABLE_READ = "&options=-c%20default_transaction_isolation%3Drepeatable%5C%20read"


@pytest.mark.parametrize("options", ["", _REPEATABLE_READ], ids=["default", "repeatable-read"])
async def test_a_claim_of_a_limited_queue_waits_for_the_one_before(
    pg_schema: str, options: str
) -> None:
    """The running count is read after the queue's lock: a claim that waited for it
    counts what the previous holder claimed."""
    s = pg_schema
    async with open_adapter(pg_url(s) + options) as store:
        await store.append("wf", [ev()], runtime=[PutTask(task(f"t{i}")) for i in range(5)])
        await store.set_queue_limit("erp", 3)
        with pg_admin() as other, other.transaction():
            # Another claimer, inside its transaction: the queue locked, two claimed.
            other.execute(f"SELECT 1 FROM {s}.queues WHERE queue = 'erp' FOR UPDATE")
            other.execute(
                f"UPDATE {s}.tasks SET lease_owner = 'x', lease_until = %s, "
                "lease_epoch = 1, attempt = 1 WHERE task_id IN ('t0/1', 't1/1')",
                (FAR,),
            )
            waiting = asyncio.create_task(claim(store, "w1"))
            await lock_waiters(f"%{s}.queues%", 1)
        async with asyncio.timeout(10):
            got = await waiting
        assert [t.task_id for t in got] == ["t2/1"]
        if options:
            rows = await store._fetch(  # type: ignore[attr-defined]
                "check", "SELECT current_setting('default_transaction_isolation')", ()
            )
            assert rows == [("repeatable read",)]


# -- concurrency ----------------------------------------------------------------------


async def test_drops_outcomes_renewals_releases_and_reaps_do_not_deadlock(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = pg_url(pg_schema)
    workflows = [f"wf{i:02}" for i in range(12)]
    stores = [await open_adapter(url).open() for _ in range(3)]
    redone = 0
    try:
        for store in stores:
            # A writer that deadlocks is rolled back and decides its batch again
            # silently; it discards its connection first, which is what we count.
            discard = store._discard_writer  # type: ignore[attr-defined]

            async def counting(discard: Callable[[], Awaitable[Any]] = discard) -> Any:
                nonlocal redone
                redone += 1
                return await discard()

            monkeypatch.setattr(store, "_discard_writer", counting)
        main = stores[0]
        # Each workflow's tasks stored against the id order, all claimed by w1.
        for wid in workflows:
            await main.append(
                f"wf-{wid}",
                [ev()],
                runtime=[Schedule(wid, 1, "runner", FAR)]
                + [PutTask(task(wid, n)) for n in range(6, 0, -1)],
            )
        claimed = await claim(main, limit=1000)
        assert len(claimed) == 6 * len(workflows)
        leases = [TaskLease(t.task_id, t.lease_epoch) for t in claimed]
        rng = random.Random(7)

        async def renew(store: BaseEventStore) -> None:
            for _ in range(15):
                mine = rng.sample(leases, len(leases))
                await store.renew_task_leases("w1", mine, lease_until_us=NOW + 2 * LEASE)
                await asyncio.sleep(0)

        async def finish(store: BaseEventStore, wid: str) -> None:
            # Outcomes of some tasks (fenced), then the workflow ends.
            for t in rng.sample([t for t in claimed if t.workflow_id == wid], 3):
                await store.append(
                    f"wf-{wid}",
                    [ev()],
                    fence=TaskFence(t.task_id, "w1", t.lease_epoch),
                    runtime=[DropTask(t.task_id), Nudge(wid, 0)],
                )
            await store.append(f"wf-{wid}", [ev()], runtime=[DropTasks(wid), Nudge(wid, 0)])

        async def churn(store: BaseEventStore) -> None:
            for _ in range(10):
                await store.release_wakeups("nobody")
                await store.reap_workers(NOW)
                await store.release_tasks("nobody")
                await asyncio.sleep(0)

        jobs = [renew(s) for s in stores] + [churn(s) for s in stores]
        jobs += [finish(stores[i % len(stores)], wid) for i, wid in enumerate(workflows)]
        async with asyncio.timeout(60):
            await asyncio.gather(*jobs)
        assert await main.list_tasks() == []
        assert redone == 0
    finally:
        for store in stores:
            await store.close()


async def test_a_queue_limit_holds_while_claimers_come_and_go(pg_schema: str) -> None:
    url = pg_url(pg_schema)
    stores = [await open_adapter(url).open() for _ in range(3)]
    try:
        main = stores[0]
        await main.append("wf", [ev()], runtime=[PutTask(task(f"t{i:02}")) for i in range(30)])
        await main.set_queue_limit("erp", 3)
        done: list[str] = []
        peaks: list[int] = []

        async def work(store: BaseEventStore, owner: str) -> None:
            while len(done) < 30:
                got = await claim(store, owner, limit=2)
                for t in got:
                    await asyncio.sleep(0.001)
                    await store.append(
                        "wf",
                        [ev()],
                        fence=TaskFence(t.task_id, owner, t.lease_epoch),
                        runtime=[DropTask(t.task_id)],
                    )
                    done.append(t.task_id)
                if not got:
                    await asyncio.sleep(0.002)

        async def watch() -> None:
            while len(done) < 30:
                (queue,) = await main.list_queues(NOW) or [QueueRow("erp", 3, 0, 0, 0)]
                peaks.append(queue.running)
                await asyncio.sleep(0)

        async with asyncio.timeout(60):
            await asyncio.gather(
                watch(), *(work(s, f"w{i}-{j}") for i, s in enumerate(stores) for j in range(3))
            )
        assert sorted(done) == sorted(f"t{i:02}/1" for i in range(30))  # each once
        assert max(peaks) <= 3
    finally:
        for store in stores:
            await store.close()


async def test_claims_over_several_queues_share_the_limit_in_queue_order(
    pg_schema: str,
) -> None:
    async with open_adapter(pg_url(pg_schema)) as store:
        rows = [task(f"{q}{i}", queue=q) for q in ("c", "a", "b") for i in range(3)]
        await store.append("wf", [ev()], runtime=[PutTask(r) for r in rows])
        await store.set_queue_limit("a", 2)
        got = await claim(store, limit=4, queues=("c", "b", "a"))
        assert sorted(t.task_id for t in got) == ["a0/1", "a1/1", "b0/1", "b1/1"]
        assert await store.list_queues(NOW) == [
            QueueRow("a", 2, ready=1, scheduled=0, running=2),
            QueueRow("b", None, ready=1, scheduled=0, running=2),
            QueueRow("c", None, ready=3, scheduled=0, running=0),
        ]


# -- the pool and the write paths -----------------------------------------------------


async def test_a_task_claim_survives_the_server_dropping_the_readers(pg_schema: str) -> None:
    app = f"lf_tasks_{pg_schema[-12:]}"
    async with open_adapter(f"{pg_url(pg_schema)}&application_name={app}") as store:
        await store.append("wf", [ev()], runtime=[PutTask(task("a")), PutTask(task("b"))])
        await store.set_queue_limit("erp", 5)
        assert [t.task_id for t in await claim(store, limit=1)] == ["a/1"]
        assert terminate_backends(app) >= 2  # writer and reader pool
        # The dead pooled connection is replaced and the claim's transaction run again.
        assert [t.task_id for t in await claim(store, limit=5)] == ["b/1"]


async def test_only_task_puts_take_the_one_round_trip_path(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_adapter(pg_url(pg_schema)) as store:
        fast: list[bool] = []
        commit_fast = store._commit_fast  # type: ignore[attr-defined]

        async def spy(plan: Any) -> Any:
            done = await commit_fast(plan)
            fast.append(done is not None)
            return done

        monkeypatch.setattr(store, "_commit_fast", spy)
        await store.append("wf-a", [ev()], runtime=[PutTask(task("a"))])
        await store.append("wf-a", [ev()], runtime=[PutTask(task("a", 2))])
        assert fast == [True]  # the first append learned the ledger; the second used it
        a1, _ = await claim(store)
        await store.append(
            "wf-a", [ev()], fence=TaskFence("a/1", "w1", a1.lease_epoch), runtime=[DropTask("a/1")]
        )
        await store.append("wf-a", [ev()], runtime=[DropTasks("a")])
        assert fast == [True]
        assert await store.list_tasks() == []
