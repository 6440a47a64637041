"""The task-queue part of a workflow store: claiming, renewing and handing back
tasks, and the per-queue limits. Adapters supply the ``_`` hooks.

Tasks are written like the other runtime rows, with the events they summarize
(``PutTask``, ``RetryTask``, ``DropTask``, ``DropTasks`` in an append); what is
here only moves leases and reads.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Sequence

from ._checks import (
    _MAX_INT32,
    _check_int,
    _check_limit,
    _check_queues,
    _check_task_leases,
    _check_task_names,
    _check_text,
    _check_worker_now,
    _invalid,
)
from .runtime import QueueRow, TaskLease, TaskRow

__all__ = ["TaskQueues"]


class TaskQueues(abc.ABC):
    """Mixed into ``BaseEventStore``; see ``ports.WorkflowStore`` for the contract."""

    @abc.abstractmethod
    def _check_open(self) -> None: ...

    async def claim_tasks(
        self,
        owner: str,
        *,
        queues: Collection[str],
        now_us: int,
        lease_until_us: int,
        limit: int,
        names: Collection[str] | None = None,
    ) -> list[TaskRow]:
        """Lease up to ``limit`` tasks of ``queues`` due by ``now_us`` that nobody
        holds (or whose lease expired) to ``owner``: each at its next epoch and its
        next attempt, earliest due first. With ``names``, only tasks of those steps:
        a worker claims only what it can run. A queue with ``max_concurrent`` gives
        out only as many as leave its running tasks (across all workers) within it.
        The rows come back as leased."""
        self._check_open()
        _check_text(owner, "owner")
        wanted = _check_queues(queues)
        steps = _check_task_names(names)
        _check_worker_now(now_us)
        _check_worker_now(lease_until_us)
        _check_limit(limit)
        if limit < 1 or not wanted or steps == ():
            return []
        return await self._claim_tasks(owner, wanted, steps, now_us, lease_until_us, limit)

    async def renew_task_leases(
        self, owner: str, leases: Sequence[TaskLease], *, lease_until_us: int
    ) -> list[TaskLease]:
        """Extend ``owner``'s task leases that are still its own at their epoch; the
        ones it still holds."""
        self._check_open()
        checked = _check_task_leases(leases)
        _check_worker_now(lease_until_us)
        if not checked:
            return []
        return await self._renew_task_leases(owner, checked, lease_until_us)

    async def release_tasks(self, owner: str | None = None) -> int:
        """Give back the task leases of ``owner`` (every one if None), at once due
        again: an attempt handed back unfinished (a graceful shutdown) does not count
        as one. How many were held."""
        self._check_open()
        _check_text(owner, "owner", optional=True)
        return await self._release_tasks(owner)

    async def next_task_due(
        self, *, queues: Collection[str], names: Collection[str] | None = None
    ) -> int | None:
        """The earliest moment (µs) a task of ``queues`` (and ``names``) may become
        claimable; None if there is none."""
        self._check_open()
        wanted = _check_queues(queues)
        steps = _check_task_names(names)
        if not wanted or steps == ():
            return None
        return await self._next_task_due(wanted, steps)

    async def list_tasks(
        self,
        *,
        queue: str | None = None,
        workflow_id: str | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[TaskRow]:
        """Tasks in id order after ``after``, of one queue and/or one workflow."""
        self._check_open()
        _check_text(queue, "queue", optional=True)
        _check_text(workflow_id, "workflow_id", optional=True)
        _check_text(after, "after", optional=True)
        _check_limit(limit)
        return await self._list_tasks(queue, workflow_id, after, limit)

    async def withdraw_task(self, task_id: str) -> bool:
        """Delete the task if no worker has ever claimed it (its lease epoch is still
        0); True if it will not run: withdrawn now, or there is no such task. False
        if a worker claimed it at some point: it may have run, or run now, and its
        outcome will come. One statement, so no claim slips in between the look and
        the delete (a cancelled workflow decides by it whether to wait)."""
        self._check_open()
        _check_text(task_id, "task_id")
        return await self._withdraw_task(task_id)

    async def set_queue_limit(self, queue: str, max_concurrent: int | None) -> None:
        """At most ``max_concurrent`` tasks of ``queue`` run at once, across every
        worker on this store (None: no limit). Applies from the next claim."""
        self._check_open()
        _check_queues([queue])
        if max_concurrent is not None:
            _check_int(max_concurrent, "max_concurrent", 1, _MAX_INT32)
        await self._set_queue_limit(queue, max_concurrent)

    async def list_queues(self, now_us: int) -> list[QueueRow]:
        """Every queue that has tasks or a limit, in name order, with its counts as
        of ``now_us``."""
        self._check_open()
        if isinstance(now_us, bool) or not isinstance(now_us, int):
            raise _invalid(f"now_us must be an int, not {now_us!r:.40}")
        return await self._list_queues(now_us)

    # -- adapter hooks --------------------------------------------------------------

    @abc.abstractmethod
    async def _claim_tasks(
        self,
        owner: str,
        queues: tuple[str, ...],
        names: tuple[str, ...] | None,
        now_us: int,
        lease_until_us: int,
        limit: int,
    ) -> list[TaskRow]: ...

    @abc.abstractmethod
    async def _renew_task_leases(
        self, owner: str, leases: list[TaskLease], lease_until_us: int
    ) -> list[TaskLease]: ...

    @abc.abstractmethod
    async def _release_tasks(self, owner: str | None) -> int: ...

    @abc.abstractmethod
    async def _next_task_due(
        self, queues: tuple[str, ...], names: tuple[str, ...] | None
    ) -> int | None: ...

    @abc.abstractmethod
    async def _list_tasks(
        self, queue: str | None, workflow_id: str | None, after: str | None, limit: int
    ) -> list[TaskRow]: ...

    @abc.abstractmethod
    async def _withdraw_task(self, task_id: str) -> bool: ...

    @abc.abstractmethod
    async def _set_queue_limit(self, queue: str, max_concurrent: int | None) -> None: ...

    @abc.abstractmethod
    async def _list_queues(self, now_us: int) -> list[QueueRow]: ...
