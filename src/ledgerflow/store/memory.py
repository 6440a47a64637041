"""In-memory EventStore: for unit tests; held to the same contract as the others."""

from __future__ import annotations

import bisect
import os
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from uuid import UUID

from ..errors import LedgerNotFoundError, StoreError
from ..events import AppendResult, Snapshot
from ..hashing import from_micros
from ..personal import SubjectKey
from ._base import BaseEventStore
from ._memory_projections import MemoryProjections
from ._plan import (
    AppendRequest,
    EventRow,
    LeaseState,
    StreamHead,
    fenced_ids,
    fenced_tasks,
    plan_batch,
)
from ._resources import moved, refill, tallied, token_wait_us
from ._runtime_rows import matches
from .runtime import (
    DropPermit,
    DropTask,
    DropTasks,
    InstanceQuery,
    InstanceRow,
    Lease,
    MoveBreaker,
    Nudge,
    PutInstance,
    PutTask,
    QueueRow,
    ResourceRow,
    RetryTask,
    RuntimeWrite,
    Schedule,
    Tally,
    TaskLease,
    TaskRow,
    Unschedule,
    WakeupRow,
    WorkerRow,
    nudged,
)
from .tiles import Checkpoint, LeafRow, MerkleTile

__all__ = ["MemoryEventStore"]


class MemoryEventStore(MemoryProjections, BaseEventStore):
    backend = "memory"

    async def _open(self) -> None:
        if not self.create:
            # Each memory store starts empty: there is never a ledger to open.
            raise LedgerNotFoundError(self.location, "a memory store starts empty")
        self._rows: list[EventRow] = []
        self._by_id: dict[UUID, EventRow] = {}
        self._streams: dict[str, list[EventRow]] = {}
        self._heads: dict[str, StreamHead] = {}
        self._snapshots: dict[str, Snapshot] = {}
        self._instances: dict[str, InstanceRow] = {}
        self._wakeups: dict[str, WakeupRow] = {}
        self._workers: dict[str, WorkerRow] = {}
        self._tasks: dict[str, TaskRow] = {}
        self._limits: dict[str, int] = {}
        self._resources: dict[str, ResourceRow] = {}
        self._permits: dict[tuple[str, str], tuple[str, int]] = {}
        """(resource, holder) -> (owner, until)"""
        self._tiles: dict[int, MerkleTile] = {}
        self._subject_keys: dict[str, SubjectKey] = {}
        self._tree_heads: dict[int, Checkpoint] = {}
        self._init_projections()

    async def _close(self) -> None:
        pass

    async def _write_batch(
        self, requests: list[AppendRequest], recorded_at_us: int
    ) -> list[AppendResult | StoreError]:
        ids = {event.id for request in requests for event in request.events}
        plan = plan_batch(
            requests,
            {r.stream_id: self._heads[r.stream_id] for r in requests if r.stream_id in self._heads},
            {i: self._by_id[i] for i in ids if i in self._by_id},
            len(self._rows),
            recorded_at_us,
            {
                wid: LeaseState(w.lease_owner, w.lease_epoch)
                for wid in fenced_ids(requests)
                if (w := self._wakeups.get(wid)) is not None
            },
            {
                tid: LeaseState(t.lease_owner, t.lease_epoch)
                for tid in fenced_tasks(requests)
                if (t := self._tasks.get(tid)) is not None
            },
        )
        for row in plan.rows:
            self._rows.append(row)
            self._by_id[row.id] = row
            self._streams.setdefault(row.stream_id, []).append(row)
        self._heads.update(plan.heads)
        for write in plan.runtime:
            self._apply(write)
        return plan.outcomes

    def _apply(self, write: RuntimeWrite) -> None:
        match write:
            case PutInstance(row):
                kept = self._instances.get(row.workflow_id)
                if kept is not None:
                    row = InstanceRow(
                        row.workflow_id,
                        row.name,
                        row.version,
                        row.status,
                        row.parent_id,
                        kept.created_at_us,
                        row.updated_at_us,
                    )
                self._instances[row.workflow_id] = row
            case Schedule(wid, due, owner, until):
                old = self._wakeups.get(wid)
                epoch = 0 if old is None else old.lease_epoch
                self._wakeups[wid] = WakeupRow(
                    wid, due, owner, until, epoch if owner is None else epoch + 1
                )
            case Nudge(wid, due):
                old = self._wakeups.get(wid)
                if old is None:
                    self._wakeups[wid] = WakeupRow(wid, due, None, None)
                else:
                    self._wakeups[wid] = WakeupRow(
                        wid,
                        nudged(old.due_at_us, due),
                        old.lease_owner,
                        old.lease_until_us,
                        old.lease_epoch,
                    )
            case Unschedule(wid):
                self._wakeups.pop(wid, None)
            case PutTask(task):
                self._tasks.setdefault(task.task_id, task)
            case RetryTask(tid, due, refund):
                if (t := self._tasks.get(tid)) is not None:
                    self._tasks[tid] = replace(
                        t,
                        due_at_us=due,
                        attempt=t.attempt - int(refund),
                        recorded_attempt=t.attempt - int(refund),
                        lease_owner=None,
                        lease_until_us=None,
                        handed_back=False,
                    )
            case DropTask(tid):
                self._tasks.pop(tid, None)
            case DropTasks(wid):
                for tid in [t.task_id for t in self._tasks.values() if t.workflow_id == wid]:
                    del self._tasks[tid]
            case Tally(resource, failed, at, window):
                found = self._resources.get(resource)
                self._resources[resource] = tallied(found, resource, failed, at, window)
            case MoveBreaker(resource, state, at, transitions):
                found = self._resources.get(resource)
                self._resources[resource] = moved(found, resource, state, at, transitions)
            case DropPermit(resource, holder):
                self._permits.pop((resource, holder), None)

    async def _claim_wakeups(
        self,
        owner: str,
        now_us: int,
        lease_until_us: int,
        limit: int,
        workflows: tuple[tuple[str, int], ...] | None,
    ) -> list[Lease]:
        due = sorted(
            (
                w
                for w in self._wakeups.values()
                if _claimable(w, now_us) and self._of(w.workflow_id, workflows)
            ),
            key=lambda w: (w.due_at_us, w.workflow_id),
        )[:limit]
        for w in due:
            self._wakeups[w.workflow_id] = WakeupRow(
                w.workflow_id, w.due_at_us, owner, lease_until_us, w.lease_epoch + 1
            )
        return [Lease(w.workflow_id, w.lease_epoch + 1, w.due_at_us) for w in due]

    async def _renew_leases(
        self, owner: str, leases: list[Lease], lease_until_us: int
    ) -> list[Lease]:
        kept = []
        for lease in leases:
            w = self._wakeups.get(lease.workflow_id)
            if w is not None and w.lease_owner == owner and w.lease_epoch == lease.epoch:
                self._wakeups[w.workflow_id] = WakeupRow(
                    w.workflow_id, w.due_at_us, owner, lease_until_us, w.lease_epoch
                )
                kept.append(lease)
        return kept

    async def _next_wakeup(self, workflows: tuple[tuple[str, int], ...] | None) -> int | None:
        times = [
            w.due_at_us if w.lease_owner is None else max(w.due_at_us, (w.lease_until_us or 0) + 1)
            for w in self._wakeups.values()
            if w.due_at_us is not None and self._of(w.workflow_id, workflows)
        ]
        return min(times, default=None)

    def _of(self, workflow_id: str, workflows: tuple[tuple[str, int], ...] | None) -> bool:
        if workflows is None:
            return True
        row = self._instances.get(workflow_id)
        return row is not None and (row.name, row.version) in workflows

    async def _release_wakeups(self, owner: str | None) -> int:
        held = [
            w
            for w in self._wakeups.values()
            if w.lease_owner is not None and (owner is None or w.lease_owner == owner)
        ]
        for w in held:
            self._wakeups[w.workflow_id] = WakeupRow(
                w.workflow_id, w.due_at_us, None, None, w.lease_epoch
            )
        return len(held)

    async def _register_worker(self, row: WorkerRow) -> None:
        self._workers[row.worker_id] = row

    async def _heartbeat_worker(
        self, worker_id: str, now_us: int, in_flight: int, stopping: bool
    ) -> bool:
        row = self._workers.get(worker_id)
        if row is None:
            return False
        self._workers[worker_id] = replace(
            row, heartbeat_at_us=now_us, in_flight=in_flight, stopping=stopping
        )
        return True

    async def _deregister_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    async def _list_workers(self) -> list[WorkerRow]:
        return [self._workers[wid] for wid in sorted(self._workers)]

    async def _reap_workers(self, now_us: int) -> list[str]:
        # No await between the reads and the writes: one transaction, as on SQL.
        dead = {wid for wid, w in self._workers.items() if w.heartbeat_at_us + w.lease_us < now_us}
        for w in list(self._wakeups.values()):
            owner = w.lease_owner
            if owner is None:
                continue
            expired = w.lease_until_us is not None and w.lease_until_us < now_us
            ownerless = expired and owner not in self._workers
            if owner in dead or ownerless:
                self._wakeups[w.workflow_id] = WakeupRow(
                    w.workflow_id, w.due_at_us, None, None, w.lease_epoch
                )
        for t in list(self._tasks.values()):
            owner = t.lease_owner
            if owner is None:
                continue
            expired = t.lease_until_us is not None and t.lease_until_us < now_us
            if owner in dead or (expired and owner not in self._workers):
                self._tasks[t.task_id] = replace(t, lease_owner=None, lease_until_us=None)
        for wid in dead:
            del self._workers[wid]
        return sorted(dead)

    # -- task queues ------------------------------------------------------------------

    def _running(self, queue: str, now_us: int) -> int:
        return sum(
            1
            for t in self._tasks.values()
            if t.queue == queue and t.lease_owner is not None and (t.lease_until_us or 0) >= now_us
        )

    async def _claim_tasks(
        self,
        owner: str,
        queues: tuple[str, ...],
        names: tuple[str, ...] | None,
        now_us: int,
        lease_until_us: int,
        limit: int,
    ) -> list[TaskRow]:
        claimed: list[TaskRow] = []
        for queue in queues:
            room = limit - len(claimed)
            if queue in self._limits:
                room = min(room, self._limits[queue] - self._running(queue, now_us))
            if room <= 0:
                continue
            due = sorted(
                (
                    t
                    for t in self._tasks.values()
                    if t.queue == queue
                    and (names is None or t.name in names)
                    and _task_claimable(t, now_us)
                ),
                key=lambda t: (t.due_at_us, t.task_id),
            )[:room]
            for t in due:
                leased = replace(
                    t,
                    attempt=t.attempt + 1,
                    lease_owner=owner,
                    lease_until_us=lease_until_us,
                    lease_epoch=t.lease_epoch + 1,
                )
                self._tasks[t.task_id] = leased
                claimed.append(leased)
        return sorted(claimed, key=lambda t: (t.due_at_us, t.task_id))

    async def _renew_task_leases(
        self, owner: str, leases: list[TaskLease], lease_until_us: int
    ) -> list[TaskLease]:
        kept = []
        for lease in leases:
            t = self._tasks.get(lease.task_id)
            if t is not None and t.lease_owner == owner and t.lease_epoch == lease.epoch:
                self._tasks[t.task_id] = replace(t, lease_until_us=lease_until_us)
                kept.append(lease)
        return kept

    async def _withdraw_task(self, task_id: str) -> bool:
        found = self._tasks.get(task_id)
        if found is not None and found.lease_epoch > 0:
            quiet = found.lease_owner is None and found.recorded_attempt >= found.attempt
            if not quiet or found.handed_back:
                return False
        self._tasks.pop(task_id, None)
        return True

    async def _release_tasks(self, owner: str | None) -> int:
        held = [
            t
            for t in self._tasks.values()
            if t.lease_owner is not None and (owner is None or t.lease_owner == owner)
        ]
        for t in held:
            self._tasks[t.task_id] = replace(
                t,
                lease_owner=None,
                lease_until_us=None,
                attempt=max(0, t.attempt - 1),
                handed_back=True,
            )
        return len(held)

    async def _next_task_due(
        self, queues: tuple[str, ...], names: tuple[str, ...] | None
    ) -> int | None:
        times = [
            t.due_at_us if t.lease_owner is None else max(t.due_at_us, (t.lease_until_us or 0) + 1)
            for t in self._tasks.values()
            if t.queue in queues and (names is None or t.name in names)
        ]
        return min(times, default=None)

    async def _list_tasks(
        self, queue: str | None, workflow_id: str | None, after: str | None, limit: int
    ) -> list[TaskRow]:
        rows = sorted(
            (
                t
                for t in self._tasks.values()
                if (queue is None or t.queue == queue)
                and (workflow_id is None or t.workflow_id == workflow_id)
                and (after is None or t.task_id > after)
            ),
            key=lambda t: t.task_id,
        )
        return rows[:limit]

    async def _set_queue_limit(self, queue: str, max_concurrent: int | None) -> None:
        if max_concurrent is None:
            self._limits.pop(queue, None)
        else:
            self._limits[queue] = max_concurrent

    async def _list_queues(self, now_us: int) -> list[QueueRow]:
        names = sorted({t.queue for t in self._tasks.values()} | set(self._limits))
        rows = []
        for queue in names:
            tasks = [t for t in self._tasks.values() if t.queue == queue]
            running = self._running(queue, now_us)
            ready = sum(1 for t in tasks if _task_claimable(t, now_us))
            rows.append(
                QueueRow(
                    queue,
                    self._limits.get(queue),
                    ready,
                    sum(1 for t in tasks if t.lease_owner is None and t.due_at_us > now_us),
                    running,
                )
            )
        return rows

    # -- guarded resources --------------------------------------------------------------

    def _resource(self, resource: str) -> ResourceRow:
        found = self._resources.get(resource)
        if found is None:
            found = ResourceRow(resource, "closed", 0, 0, 0, 0, 0, 0, 0, None, None)
        return found

    def _held(self, resource: str, now_us: int) -> int:
        return sum(
            1 for (r, _), (_, until) in self._permits.items() if r == resource and until >= now_us
        )

    async def _resource_state(self, resource: str, now_us: int) -> ResourceRow | None:
        found = self._resources.get(resource)
        return None if found is None else replace(found, permits=self._held(resource, now_us))

    async def _list_resources(self, now_us: int) -> list[ResourceRow]:
        return [
            replace(self._resources[r], permits=self._held(r, now_us))
            for r in sorted(self._resources)
        ]

    async def _take_probe(self, resource: str, transitions: int, max_probes: int) -> bool:
        r = self._resources.get(resource)
        if r is None or r.state != "half_open" or r.transitions != transitions:
            return False
        if r.probes >= max_probes:
            return False
        self._resources[resource] = replace(r, probes=r.probes + 1)
        return True

    async def _take_token(self, resource: str, rate: float, burst: int, now_us: int) -> int:
        r = self._resource(resource)
        level = refill(r.tokens, r.tokens_at_us, rate, burst, now_us)
        if level < 1.0:
            return token_wait_us(level, rate)
        at = now_us if r.tokens_at_us is None else max(r.tokens_at_us, now_us)
        self._resources[resource] = replace(r, tokens=level - 1.0, tokens_at_us=at)
        return 0

    async def _acquire_permit(
        self,
        resource: str,
        holder: str,
        owner: str,
        max_concurrent: int,
        now_us: int,
        until_us: int,
    ) -> bool:
        key = (resource, holder)
        if key in self._permits:  # kept, and now its worker's (a taken-over call)
            self._permits[key] = (owner, until_us)
            return True
        if self._held(resource, now_us) >= max_concurrent:
            return False
        self._resources.setdefault(resource, self._resource(resource))
        self._permits[key] = (owner, until_us)
        return True

    async def _renew_permits(self, owner: str, until_us: int) -> int:
        mine = [k for k, (o, _) in self._permits.items() if o == owner]
        for key in mine:
            self._permits[key] = (owner, until_us)
        return len(mine)

    async def _release_permits(self, owner: str) -> int:
        mine = [k for k, (o, _) in self._permits.items() if o == owner]
        for key in mine:
            del self._permits[key]
        return len(mine)

    async def _lease_owners(self) -> list[str]:
        return sorted({w.lease_owner for w in self._wakeups.values() if w.lease_owner})

    async def _get_wakeup(self, workflow_id: str) -> WakeupRow | None:
        return self._wakeups.get(workflow_id)

    async def _get_instance(self, workflow_id: str) -> InstanceRow | None:
        return self._instances.get(workflow_id)

    async def _get_instances(self, workflow_ids: list[str]) -> list[InstanceRow]:
        return [row for w in workflow_ids if (row := self._instances.get(w)) is not None]

    async def _count_instances(self, statuses: list[str]) -> dict[str, int]:
        counted: dict[str, int] = {}
        for row in self._instances.values():
            if row.status in statuses:
                counted[row.status] = counted.get(row.status, 0) + 1
        return counted

    async def _list_instances(
        self, query: InstanceQuery, after: str | None, limit: int
    ) -> list[InstanceRow]:
        rows = [r for r in self._instances.values() if matches(r, query)]
        if query.newest_first:
            rows.sort(key=lambda r: (r.created_at_us, r.workflow_id), reverse=True)
            if after is not None:
                mark = self._instances.get(after)
                if mark is None:
                    return []
                key = (mark.created_at_us, mark.workflow_id)
                rows = [r for r in rows if (r.created_at_us, r.workflow_id) < key]
        else:
            rows.sort(key=lambda r: r.workflow_id)
            if after is not None:
                rows = [r for r in rows if r.workflow_id > after]
        return rows[:limit]

    async def _read_stream_rows(
        self, stream_id: str, from_version: int | None, limit: int | None, backwards: bool
    ) -> list[EventRow]:
        rows = self._streams.get(stream_id, [])
        if backwards:
            end = len(rows) if from_version is None else max(0, min(from_version, len(rows)))
            selected = rows[:end][::-1]
        else:
            start = 0 if from_version is None else max(0, from_version - 1)
            selected = rows[start:]
        return selected if limit is None else selected[:limit]

    async def _read_all_rows(self, from_position: int, limit: int | None) -> list[EventRow]:
        start = bisect.bisect_left(self._rows, max(from_position, 1), key=lambda r: r.position)
        end = len(self._rows) if limit is None else start + limit
        return self._rows[start:end]

    async def _read_leaves(self, from_position: int, limit: int) -> list[LeafRow]:
        rows = await self._read_all_rows(from_position, limit)
        return [(r.position, r.stream_id, r.version, r.hash) for r in rows]

    async def _stream_head(self, stream_id: str) -> StreamHead | None:
        return self._heads.get(stream_id)

    async def _stream_heads(self, after: str | None, limit: int) -> list[tuple[str, StreamHead]]:
        names = sorted(s for s in self._heads if after is None or s > after)[:limit]
        return [(name, self._heads[name]) for name in names]

    async def _read_snapshot(
        self, visit: Callable[[list[EventRow]], None], batch_size: int
    ) -> dict[str, StreamHead]:
        # No await in here: no append can land in between.
        rows = self._rows
        for start in range(0, len(rows), batch_size):
            visit(rows[start : start + batch_size])
        return dict(self._heads)

    async def _head_position(self) -> int:
        return len(self._rows)

    async def _save_snapshot(self, snapshot: Snapshot, recorded_at_us: int) -> None:
        kept = self._snapshots.get(snapshot.stream_id)
        if kept is not None and kept.version > snapshot.version:
            return
        self._snapshots[snapshot.stream_id] = Snapshot(
            snapshot.stream_id,
            snapshot.version,
            snapshot.type,
            snapshot.schema_version,
            snapshot.state,
            from_micros(recorded_at_us),
        )

    async def _load_snapshot(self, stream_id: str) -> Snapshot | None:
        return self._snapshots.get(stream_id)

    async def _save_checkpoint(
        self, tiles: Sequence[MerkleTile], checkpoint: Checkpoint
    ) -> Checkpoint:
        for tile in tiles:
            kept = self._tiles.get(tile.tile)
            if kept is None or tile.size > kept.size:
                self._tiles[tile.tile] = tile
        return self._tree_heads.setdefault(checkpoint.tree_size, checkpoint)

    async def _merkle_tiles(self, first: int, limit: int, entries: bool) -> list[MerkleTile]:
        found = [self._tiles[t] for t in sorted(self._tiles) if t >= first][:limit]
        return found if entries else [replace(t, entries=()) for t in found]

    async def _merkle_tile_of(self, position: int) -> MerkleTile | None:
        for tile in self._tiles.values():
            if tile.first_position <= position <= tile.last_position:
                return tile
        return None

    async def _checkpoints(self, after_size: int, limit: int) -> list[Checkpoint]:
        return [self._tree_heads[n] for n in sorted(self._tree_heads) if n > after_size][:limit]

    async def _vault_keys(self, subjects: Collection[str]) -> dict[str, SubjectKey]:
        for subject in subjects:
            if subject not in self._subject_keys:
                self._subject_keys[subject] = SubjectKey(str(uuid.uuid4()), os.urandom(32))
        return {s: self._subject_keys[s] for s in subjects}

    async def _vault_keys_by_id(self, key_ids: Collection[str]) -> dict[str, bytes]:
        wanted = set(key_ids)
        return {k.key_id: k.key for k in self._subject_keys.values() if k.key_id in wanted}

    async def _vault_key_id(self, subject: str) -> str | None:
        key = self._subject_keys.get(subject)
        return None if key is None else key.key_id

    async def _vault_destroy(self, subject: str) -> str | None:
        key = self._subject_keys.pop(subject, None)
        return None if key is None else key.key_id

    async def _purge_snapshots(self, mentioning: str) -> int:
        needle = mentioning.encode()
        streams = {r.stream_id for r in self._rows if needle in r.data}
        gone = [s for s in streams if s in self._snapshots]
        for stream in gone:
            del self._snapshots[stream]
        return len(gone)

    async def _latest_checkpoint(self) -> Checkpoint | None:
        return self._tree_heads[max(self._tree_heads)] if self._tree_heads else None


def _claimable(w: WakeupRow, now_us: int) -> bool:
    if w.due_at_us is None or w.due_at_us > now_us:
        return False
    return w.lease_owner is None or (w.lease_until_us is not None and w.lease_until_us < now_us)


def _task_claimable(t: TaskRow, now_us: int) -> bool:
    if t.due_at_us > now_us:
        return False
    return t.lease_owner is None or (t.lease_until_us is not None and t.lease_until_us < now_us)
