"""Task rows and their leases, run on every backend (``store.runtime``'s ``tasks`` and
``queues`` tables; the claims, renewals and hand-backs of ``WorkflowStore``).

A step sent to a queue is a ``PutTask`` riding with the workflow's append; a worker of
that queue claims it with a lease and records the outcome in the workflow's stream,
fenced by that lease (``TaskFence``). Times are plain integers here.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from ledgerflow import ConcurrencyError, InvalidEventDataError, LeaseLostError, NewEvent
from ledgerflow.errors import TaskLeaseLostError
from ledgerflow.store._base import BaseEventStore
from ledgerflow.store.runtime import (
    DropTask,
    DropTasks,
    Nudge,
    PutTask,
    QueueRow,
    RetryTask,
    TaskFence,
    TaskLease,
    TaskRow,
    WorkerRow,
    makes_work,
)

from ._adapters import open_adapter

NOW = 1_000_000_000
LEASE = 30_000_000


def ev(n: int = 0) -> NewEvent:
    return NewEvent("noted", {"n": n}, id=uuid.uuid4())


def task(
    workflow_id: str,
    seq: int = 1,
    *,
    queue: str = "erp",
    name: str = "reserve",
    due: int = NOW,
    kind: str = "step",
) -> TaskRow:
    return TaskRow(
        f"{workflow_id}/{seq}",
        workflow_id,
        seq,
        kind,
        name,
        queue,
        '{"args": [1, "x"]}',
        due,
        created_at_us=NOW - 5,
    )


async def put(store: BaseEventStore, *rows: TaskRow) -> None:
    """Append to each task's workflow stream the event that sends it."""
    for row in rows:
        await store.append(f"wf-{row.workflow_id}", [ev(row.seq)], runtime=[PutTask(row)])


async def claim(
    store: BaseEventStore,
    owner: str = "w1",
    *,
    queues: tuple[str, ...] = ("erp",),
    now: int = NOW,
    limit: int = 10,
    names: tuple[str, ...] | None = None,
) -> list[TaskRow]:
    return await store.claim_tasks(
        owner, queues=queues, now_us=now, lease_until_us=now + LEASE, limit=limit, names=names
    )


async def test_a_task_is_written_with_its_append_and_only_then(store: BaseEventStore) -> None:
    row = task("a")
    await put(store, row)
    assert await store.list_tasks() == [row]
    with pytest.raises(ConcurrencyError):
        await store.append("wf-b", [ev()], 5, runtime=[PutTask(task("b"))])
    assert [t.task_id for t in await store.list_tasks()] == ["a/1"]
    # Putting it again keeps the row as it is (a lease, an attempt count).
    await claim(store)
    await store.append("wf-a", [ev()], runtime=[PutTask(row)])
    (kept,) = await store.list_tasks()
    assert (kept.lease_owner, kept.attempt) == ("w1", 1)


async def test_claims_take_due_tasks_of_the_queues_and_steps_asked_for(
    store: BaseEventStore,
) -> None:
    await put(
        store,
        task("late", due=NOW + 1),
        task("b", due=NOW - 10),
        task("a", due=NOW - 10),
        task("other", queue="billing"),
        task("unknown", name="ship"),
    )
    got = await claim(store, names=("reserve",))
    assert [t.task_id for t in got] == ["a/1", "b/1"]
    for t in got:
        assert (t.lease_owner, t.lease_until_us, t.lease_epoch, t.attempt) == (
            "w1",
            NOW + LEASE,
            1,
            1,
        )
        assert (t.payload, t.created_at_us) == ('{"args": [1, "x"]}', NOW - 5)
    assert await claim(store, "w2", names=("reserve",)) == []  # leased: nobody else's
    assert [t.task_id for t in await claim(store, "w2")] == ["unknown/1"]
    assert [t.task_id for t in await claim(store, "w2", queues=("billing", "erp"))] == ["other/1"]
    assert [t.task_id for t in await claim(store, "w2", now=NOW + 1)] == ["late/1"]
    assert await claim(store, "w3", names=()) == []
    assert await claim(store, "w3", limit=0) == []


async def test_an_expired_task_lease_is_claimed_again_at_the_next_epoch_and_attempt(
    store: BaseEventStore,
) -> None:
    await put(store, task("a"))
    (first,) = await claim(store, "w1")
    later = NOW + LEASE + 1
    (second,) = await claim(store, "w2", now=later)
    assert (second.lease_owner, second.lease_epoch, second.attempt) == ("w2", 2, 2)
    assert second.recorded_attempt == 0  # attempt 1 was lost, unrecorded
    # The first runner's outcome is refused: its lease is gone.
    with pytest.raises(TaskLeaseLostError) as lost:
        await store.append(
            "wf-a",
            [ev()],
            fence=TaskFence("a/1", "w1", first.lease_epoch),
            runtime=[DropTask("a/1")],
        )
    assert isinstance(lost.value, LeaseLostError)
    assert (lost.value.held_by, lost.value.workflow_id) == ("w2", "a")
    assert len(await store.read_stream("wf-a")) == 1  # nothing of it was written
    await store.append(
        "wf-a",
        [ev()],
        fence=TaskFence("a/1", "w2", 2),
        runtime=[Nudge("a", later), DropTask("a/1")],
    )
    assert await store.list_tasks() == []


async def test_a_queue_limit_holds_across_claimers(store: BaseEventStore) -> None:
    await put(store, *(task(f"t{i}") for i in range(5)))
    await store.set_queue_limit("erp", 2)
    assert len(await claim(store, "w1")) == 2
    assert await claim(store, "w2") == []
    (held, _) = await store.list_tasks(limit=2)
    await store.append(
        f"wf-{held.workflow_id}",
        [ev()],
        fence=TaskFence(held.task_id, "w1", held.lease_epoch),
        runtime=[DropTask(held.task_id)],
    )
    assert len(await claim(store, "w2")) == 1
    # Expired leases do not count as running.
    assert len(await claim(store, "w3", now=NOW + LEASE + 1)) == 2
    await store.set_queue_limit("erp", None)
    assert len(await claim(store, "w4", now=NOW + LEASE + 1)) == 2
    queues = await store.list_queues(NOW + LEASE + 1)
    assert queues == [QueueRow("erp", None, ready=0, scheduled=0, running=4)]


async def test_concurrent_claimers_never_share_a_task_nor_break_the_limit(
    store: BaseEventStore, store_url: str
) -> None:
    await put(store, *(task(f"t{i:02}") for i in range(40)))
    await store.set_queue_limit("erp", 7)
    async with open_adapter(store_url) as other:
        rounds = await asyncio.gather(
            *(claim(s, f"w{i}", limit=3) for i in range(6) for s in (store, other))
        )
    got = [t.task_id for r in rounds for t in r]
    assert len(got) == len(set(got)) == 7


async def test_a_retry_gives_the_lease_back_and_waits_for_its_due_time(
    store: BaseEventStore,
) -> None:
    await put(store, task("a"))
    (t,) = await claim(store)
    fence = TaskFence("a/1", "w1", t.lease_epoch)
    await store.append("wf-a", [ev()], fence=fence, runtime=[RetryTask("a/1", NOW + 500)])
    with pytest.raises(TaskLeaseLostError):  # given back: no more outcomes from w1
        await store.append("wf-a", [ev()], fence=fence)
    assert await claim(store, "w2", now=NOW + 499) == []
    assert await store.next_task_due(queues=["erp"]) == NOW + 500
    (again,) = await claim(store, "w2", now=NOW + 500)
    assert (again.attempt, again.lease_epoch, again.recorded_attempt) == (2, 2, 1)
    # Attempt 2 lost with w2; attempt 3 knows only attempt 1 was recorded.
    (third,) = await claim(store, "w3", now=NOW + 500 + LEASE + 1)
    assert (third.attempt, third.recorded_attempt) == (3, 1)
    fence = TaskFence("a/1", "w3", third.lease_epoch)
    await store.append("wf-a", [ev()], fence=fence, runtime=[RetryTask("a/1", NOW)])
    (row,) = await store.list_tasks()
    assert (row.attempt, row.recorded_attempt) == (3, 3)


async def test_a_refunded_retry_does_not_count_the_attempt(store: BaseEventStore) -> None:
    """A call its resource's breaker refused never ran: the claim that made it gives
    its attempt back."""
    await put(store, task("a"))
    (t,) = await claim(store)
    assert t.attempt == 1
    fence = TaskFence("a/1", "w1", t.lease_epoch)
    refund = RetryTask("a/1", NOW + 5, refund=True)
    await store.append("wf-a", [ev()], fence=fence, runtime=[refund])
    (again,) = await claim(store, "w2", now=NOW + 5)
    assert (again.attempt, again.lease_epoch, again.recorded_attempt) == (1, 2, 0)


async def test_a_finished_workflow_drops_its_tasks_and_their_outcomes(
    store: BaseEventStore,
) -> None:
    await put(store, task("a", 1), task("a", 2), task("b", 1))
    leased = {t.task_id: t for t in await claim(store)}
    await store.append("wf-a", [ev()], runtime=[DropTasks("a")])
    assert [t.task_id for t in await store.list_tasks()] == ["b/1"]
    with pytest.raises(TaskLeaseLostError) as lost:
        await store.append("wf-a", [ev()], fence=TaskFence("a/2", "w1", leased["a/2"].lease_epoch))
    assert lost.value.held_by is None


async def test_renewal_keeps_only_leases_still_held(store: BaseEventStore) -> None:
    await put(store, task("a"), task("b"))
    a, b = await claim(store)
    await store.append(
        "wf-b", [ev()], fence=TaskFence("b/1", "w1", b.lease_epoch), runtime=[DropTask("b/1")]
    )
    leases = [TaskLease("a/1", a.lease_epoch), TaskLease("b/1", b.lease_epoch)]
    kept = await store.renew_task_leases("w1", leases, lease_until_us=NOW + 9 * LEASE)
    assert kept == [TaskLease("a/1", a.lease_epoch)]
    assert await store.renew_task_leases("w2", leases, lease_until_us=NOW) == []
    (row,) = await store.list_tasks()
    assert row.lease_until_us == NOW + 9 * LEASE


async def test_hand_back_does_not_count_the_attempt(store: BaseEventStore) -> None:
    await put(store, task("a"), task("b"))
    await claim(store, "w1", limit=1)
    await claim(store, "w2", limit=1)
    assert await store.release_tasks("w1") == 1
    a, b = await store.list_tasks()
    assert (a.lease_owner, a.attempt, a.lease_epoch) == (None, 0, 1)
    assert b.lease_owner == "w2"
    assert await store.next_task_due(queues=["erp"]) == NOW
    assert await store.release_tasks() == 1
    (again,) = await claim(store, "w3", limit=1)
    assert (again.task_id, again.attempt, again.lease_epoch) == ("a/1", 1, 2)
    assert again.recorded_attempt == 0  # nothing lost: the attempt was handed back


async def test_next_task_due_sees_leases_and_filters(store: BaseEventStore) -> None:
    assert await store.next_task_due(queues=["erp"]) is None
    await put(store, task("a", due=NOW + 100), task("b", due=NOW + 50, name="ship"))
    assert await store.next_task_due(queues=["erp"]) == NOW + 50
    assert await store.next_task_due(queues=["erp"], names=["reserve"]) == NOW + 100
    assert await store.next_task_due(queues=["billing"]) is None
    await claim(store, now=NOW + 100)
    assert await store.next_task_due(queues=["erp"]) == NOW + 100 + LEASE + 1


async def test_reaping_a_dead_worker_frees_its_tasks(store: BaseEventStore) -> None:
    await put(store, task("a"), task("b"))
    await store.register_worker(WorkerRow("dead", "h", 1, ("erp",), (), "v", NOW, NOW, LEASE, 1))
    await store.register_worker(
        WorkerRow("alive", "h", 2, ("erp",), (), "v", NOW, NOW + LEASE, LEASE, 1)
    )
    await claim(store, "dead", limit=1)
    await claim(store, "alive", limit=1)
    assert await store.reap_workers(NOW + LEASE + 1) == ["dead"]
    a, b = await store.list_tasks()
    assert (a.lease_owner, a.attempt, a.recorded_attempt) == (None, 1, 0)  # lost: counts
    assert b.lease_owner == "alive"


async def test_queue_counts(store: BaseEventStore) -> None:
    await store.set_queue_limit("idle", 3)
    await put(store, task("a"), task("b"), task("c", due=NOW + 10), task("d", queue="billing"))
    await claim(store, limit=1)
    assert await store.list_queues(NOW) == [
        QueueRow("billing", None, ready=1, scheduled=0, running=0),
        QueueRow("erp", None, ready=1, scheduled=1, running=1),
        QueueRow("idle", 3, ready=0, scheduled=0, running=0),
    ]
    assert [t.task_id for t in await store.list_tasks(queue="erp", after="a/1")] == [
        "b/1",
        "c/1",
    ]
    assert [t.task_id for t in await store.list_tasks(workflow_id="d")] == ["d/1"]
    await store.set_queue_limit("idle", None)  # no limit and no tasks: no queue to list
    assert [q.queue for q in await store.list_queues(NOW)] == ["billing", "erp"]


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.claim_tasks("w", queues="erp", now_us=1, lease_until_us=2, limit=1),
        lambda s: s.claim_tasks("w", queues=[""], now_us=1, lease_until_us=2, limit=1),
        lambda s: s.claim_tasks("w", queues=["erp"], now_us=1, lease_until_us=2, limit=-1),
        lambda s: s.claim_tasks("w", queues=["q"], now_us=1, lease_until_us=2, limit=1, names="x"),
        lambda s: s.set_queue_limit("erp", 0),
        lambda s: s.set_queue_limit("e\x00rp", 1),
        lambda s: s.renew_task_leases("w", [("a/1", 1)], lease_until_us=1),
        lambda s: s.append("x", [ev()], runtime=[PutTask(task("a", kind="activity"))]),
        lambda s: s.append(
            "x", [ev()], runtime=[PutTask(TaskRow("a/2", "a", 1, "step", "n", "q", "{}", 1))]
        ),
        lambda s: s.append(
            "x",
            [ev()],
            runtime=[PutTask(TaskRow("a/1", "a", 1, "step", "n", "q", "{}", 1, 0, "w", 5))],
        ),
        lambda s: s.append("x", [ev()], runtime=[RetryTask("a/1", 2**64)]),
        lambda s: s.append("x", [ev()], fence=TaskFence("a/1", "w", -1)),
    ],
)
async def test_bad_task_input_is_refused_before_it_is_queued(
    store: BaseEventStore, call: object
) -> None:
    with pytest.raises(InvalidEventDataError):
        await call(store)  # type: ignore[operator]
    assert await store.list_tasks() == []
    assert await store.stream_version("x") == 0


def test_queued_and_retried_tasks_are_work_for_others() -> None:
    assert makes_work([PutTask(task("a", due=NOW))], NOW)
    assert not makes_work([PutTask(task("a", due=NOW + 60_000_000))], NOW)
    assert makes_work([RetryTask("a/1", NOW + 10)], NOW)
    assert not makes_work([DropTask("a/1"), DropTasks("a")], NOW)


async def test_only_a_task_no_worker_ever_claimed_is_withdrawn(
    store: BaseEventStore, store_url: str
) -> None:
    """A cancelled workflow withdraws a queued step that never ran; one a worker
    claimed, even if its lease has run out since (an attempt lost with its worker),
    stays: it may have run. The look and the delete are one step, so a claim racing
    a withdrawal either wins (the task stays) or finds nothing."""
    await put(store, task("a"), task("b"))
    assert await store.withdraw_task("a/1") is True
    assert [t.task_id for t in await store.list_tasks()] == ["b/1"]
    assert await store.withdraw_task("a/1") is True  # gone: it will not run either
    assert [t.task_id for t in await claim(store, "w1")] == ["b/1"]
    assert await store.withdraw_task("b/1") is False
    await claim(store, "w2", now=NOW + LEASE + 1)  # the lease ran out: claimed again
    assert await store.withdraw_task("b/1") is False
    assert [t.task_id for t in await store.list_tasks()] == ["b/1"]
    await put(store, *(task(f"r{i:02}") for i in range(20)))
    async with open_adapter(store_url) as other:
        claimed, withdrawn = await asyncio.gather(
            claim(other, "w3", now=NOW + 3 * LEASE, limit=20),
            asyncio.gather(*(store.withdraw_task(f"r{i:02}/1") for i in range(20))),
        )
    ran = {t.task_id for t in claimed}
    for i, gone in enumerate(withdrawn):
        assert gone != (f"r{i:02}/1" in ran), i


async def test_a_task_waiting_out_its_retry_is_withdrawn_unless_an_attempt_is_in_doubt(
    store: BaseEventStore,
) -> None:
    """A cancelled workflow need not wait for a step whose last attempt failed and is
    recorded (it waits out its backoff: no attempt runs, none acted unseen); it
    must for one running now, one lost with its worker, or one a graceful stop
    handed back unfinished (its body may have acted). A recorded failure after a
    hand-back clears the doubt, as a local step's retry does."""

    async def failed(row: TaskRow, due: int) -> None:
        fence = TaskFence(row.task_id, row.lease_owner or "", row.lease_epoch)
        await store.append(
            f"wf-{row.workflow_id}", [ev()], fence=fence, runtime=[RetryTask(row.task_id, due)]
        )

    await put(store, task("a"))
    (a,) = await claim(store, "w1")
    await failed(a, NOW + 500)
    assert await store.withdraw_task("a/1") is True
    assert await store.list_tasks() == []

    await put(store, task("b"))
    (b,) = await claim(store, "w1")
    await failed(b, NOW)
    assert len(await claim(store, "w2")) == 1
    assert await store.withdraw_task("b/1") is False  # attempt 2 runs now
    await claim(store, "w3", now=NOW + LEASE + 1)
    assert await store.withdraw_task("b/1") is False  # attempt 2 was lost, attempt 3 runs
    await store.release_tasks("w3")
    assert await store.withdraw_task("b/1") is False  # attempt 2 is still in doubt

    await put(store, task("c", queue="billing"))
    (c,) = await claim(store, "w4", queues=("billing",))
    await failed(c, NOW)
    await claim(store, "w5", queues=("billing",))
    assert await store.release_tasks("w5") == 1
    (back,) = await store.list_tasks(workflow_id="c")
    assert (back.attempt, back.recorded_attempt, back.handed_back) == (1, 1, True)
    assert await store.withdraw_task("c/1") is False  # handed back: it may have acted
    (again,) = await claim(store, "w6", queues=("billing",))
    assert (again.task_id, again.attempt, again.handed_back) == ("c/1", 2, True)
    await failed(again, NOW + 500)
    assert await store.withdraw_task("c/1") is True
    assert [t.task_id for t in await store.list_tasks()] == ["b/1"]
