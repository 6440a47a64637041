"""The engine: a workflow client that also runs instances, in this process.

Work is found through the store's runtime rows (see ``store.runtime``): the engine
claims due instances with a lease, runs a pass over each (``run.py``), and records the
pass's outcome together with the instance's next wake-up in one append (through its
``Journal``). Starting an instance, a step's result, a timer, a signal and the end are
each one append, so concurrent instances share commits through the store's group
commit. Starting, signalling and reading instances is the client's part
(``client.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import socket
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, Self

from .. import metrics, tracing
from .._waiting import cancel_and_wait
from ..clock import Clock, DatabaseClock
from ..errors import (
    ConcurrencyError,
    ConfigurationError,
    LeaseLostError,
    LedgerflowError,
    StoreClosedError,
    StoreReadOnlyError,
    StoreUnavailableError,
    UnknownWorkflowError,
    WorkflowError,
)
from ..hashing import from_micros
from ..projections.definition import Projection
from ..projections.runner import ProjectionRunner
from ..registry import EventRegistry
from ..resilience.book import REFRESH_S
from ..resilience.guards import Guards
from ..resilience.policy import Policy, check_policy, check_policy_name
from ..store import WorkflowStore
from ..store.runtime import (
    DropTasks,
    Fence,
    InstanceRow,
    Lease,
    Nudge,
    PutInstance,
    RuntimeWrite,
    Schedule,
    Unschedule,
)
from .client import WorkflowClient
from .executors import Definition, executor, other_kind
from .handles import WorkflowDescription, WorkflowHandle
from .history import (
    TERMINAL,
    ChildFinished,
    History,
    Resumed,
    Stuck,
    WorkflowStatus,
    error_message,
)
from .host import (
    Abandon,
    EngineHost,
    Executor,
    Park,
    PassResult,
    Relinquish,
    ReplayHost,
    Restart,
)
from .journal import Journal
from .membership import Membership
from .step_threads import StepThreads
from .steps import _current_workflow
from .tasks import StepRegistry, TaskRunner

__all__ = ["Engine", "WorkflowDescription", "WorkflowHandle"]

log = logging.getLogger("ledgerflow.engine")

MAX_PASS_RETRIES = 8
CLOSE_BOOKKEEPING_S = 5.0
"""What closing may spend telling the store it stops (beyond the passes' grace)."""


async def _within(deadline: float, call: Awaitable[Any], what: str) -> bool:
    """Await ``call`` until ``deadline`` (loop time); False, logged, if the store
    did not answer in time or refused (closing goes on without it)."""
    left = deadline - asyncio.get_running_loop().time()
    try:
        async with asyncio.timeout(max(0.0, left)):
            await call
        return True
    except (TimeoutError, LedgerflowError) as exc:
        log.warning(
            "ledgerflow engine: closing without waiting to %s (%s); what it holds "
            "expires with its lease",
            what,
            exc or "the store did not answer in time",
        )
        return False


"""Store faults in a row after which a pass waits for its lease to expire."""


class Engine(WorkflowClient):
    """Runs durable workflows in this process on one store.

    ``store`` is a URL (``sqlite:///ledgerflow.db``, ``postgresql://...``) or an open
    store. ``concurrency`` bounds the instances running a pass at once.
    ``step_threads`` bounds the sync (``def``) step bodies that run, or have finished
    and wait for their result to be recorded, at once: a crash re-runs at most that
    many finished bodies. Their threads start as bodies need them.

    The engine registers itself in the store's registry of workers (see
    ``WorkflowClient.workers``) and heartbeats there every third of ``lease``. With
    ``takeover`` (the default) it reaps, at start and on every heartbeat, the workers
    whose heartbeat is older than their lease (a crash, a kill, a vanished host),
    releasing their leases so that their unfinished instances resume here or on
    another engine. Liveness is that heartbeat alone, never host and pid: a pid
    means nothing across PID namespaces (containers) or hosts.

    ``queues`` names the task queues the engine serves and ``steps`` the step
    functions (or step objects) it can run for them: it claims the tasks of those
    queues whose step it has, at most ``task_concurrency`` at once, and records
    their outcomes in their workflows' histories (see ``workflow.tasks``). An
    engine may serve queues without running any workflow, or the reverse.

    ``policies`` declares the application's named resilience policies (steps name
    them: ``policy="erp"``): each is recorded in the ledger as version 1 unless the
    ledger has it already, so changes made at run time (``engine.policies.update``,
    ``ledgerflow policy set``) outlive a deploy. Every engine on the store uses the
    version in force, checked at most every ``policy_refresh`` seconds.

    ``projections`` are run here too (``ledgerflow.Projection``): each is followed by
    one runner at a time across every engine on the store (a lease, renewed while this
    engine lives), its read-model writes and checkpoint committed together.

    ``workflows`` may hold state machines (``ledgerflow.Machine``) too: they run on
    the same claims, leases, timers, queues and policies. Each is verified when
    registered: ``verify_machines="refuse"`` (the default) refuses one with
    findings, ``"warn"`` logs them, ``"off"`` skips verification.
    """

    def __init__(
        self,
        store: str | WorkflowStore,
        *,
        workflows: Sequence[Definition] = (),
        concurrency: int = 200,
        clock: Clock | None = None,
        lease: timedelta = timedelta(seconds=60),
        step_threads: int = 64,
        takeover: bool = True,
        poll_interval: float = 1.0,
        cache_size: int = 10_000,
        keep_waiting: int = 1_000,
        snapshot_every: int | None = 1_000,
        registry: EventRegistry | None = None,
        queues: Sequence[str] = (),
        steps: Sequence[Any] = (),
        task_concurrency: int = 16,
        policies: Mapping[str, Policy] | None = None,
        policy_refresh: float = REFRESH_S,
        verify_machines: str = "refuse",
        projections: Sequence[Projection] = (),
    ) -> None:
        if concurrency < 1:
            raise ConfigurationError("Engine concurrency must be >= 1")
        if task_concurrency < 1:
            raise ConfigurationError("Engine task_concurrency must be >= 1")
        if step_threads < 1:
            raise ConfigurationError("Engine step_threads must be >= 1")
        if keep_waiting < 0:
            raise ConfigurationError("Engine keep_waiting must be >= 0")
        if not policy_refresh >= 0:
            raise ConfigurationError("Engine policy_refresh must be >= 0 seconds")
        declared = {
            check_policy_name(name): check_policy(name, policy)
            for name, policy in (policies or {}).items()
        }
        if isinstance(queues, str) or not all(isinstance(q, str) and q for q in queues):
            raise ConfigurationError("Engine queues must be a sequence of non-empty names")
        try:
            registered = StepRegistry(steps)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"Engine steps: {exc}") from None
        if queues and not registered:
            raise ConfigurationError(
                f"Engine serves task queues {list(queues)} but has no steps to run: "
                "pass steps=[...] (ledgerflow worker: --app naming them)"
            )
        # Unless told otherwise, time is the database's: workers on hosts whose clocks
        # disagree still agree on leases, due times and what they record.
        clock = clock or DatabaseClock()
        super().__init__(
            store,
            workflows=workflows,
            clock=clock,
            poll_interval=poll_interval,
            registry=registry,
            verify_machines=verify_machines,
        )
        self.policies.refresh_s = policy_refresh
        self._declared = declared
        self.concurrency = concurrency
        self._lease_us = int(lease.total_seconds() * 1_000_000)
        self._hostname = socket.gethostname()
        # host:pid names the process for people reading leases and the registry; the
        # random tag makes the name unique (several engines in one process, a pid
        # reused in another PID namespace). Nothing parses it.
        self.owner = f"{self._hostname}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._owner = self.owner
        self.takeover = takeover
        self.queues: tuple[str, ...] = tuple(queues)
        self._membership = Membership(
            self.store,
            self.owner,
            host=self._hostname,
            queues=self.queues,
            lease_us=self._lease_us,
            workflows=self._definitions.keys,
            in_flight=lambda: len(self._active) + (self._tasks.in_flight if self._tasks else 0),
            stopping=self._stopping,
        )
        self.step_threads = StepThreads(step_threads)
        self.guards = Guards(
            self.store, owner=self.owner, now_us=self._now_us, permit_us=lambda: self._lease_us
        )
        """The shared state of the resources named policies guard (breakers, rate
        limits, bulkheads)."""
        self._journal = Journal(
            self.store,
            cache_size=cache_size,
            snapshot_every=snapshot_every,
            fence_of=self._fence,
        )
        self._keep_waiting = keep_waiting
        self._kept: OrderedDict[str, tuple[Executor, Definition]] = OrderedDict()
        """Runs whose body waits alive, by instance (``run._Run``: resumed where they
        wait rather than replayed), least recently kept first."""
        self._active: dict[str, asyncio.Task[None]] = {}
        self._held_slots = 0  # reserved by starts and claims in flight
        self._fences: dict[str, Fence] = {}
        """This engine's lease on each instance it runs (owner and epoch): the fence of
        its appends. One object per lease, not one per append."""
        self._heartbeat: asyncio.Task[None] | None = None
        self._unwatch: Callable[[], None] | None = None
        self._rerun: set[str] = set()
        self._watchers: weakref.WeakValueDictionary[str, asyncio.Event] = (
            weakref.WeakValueDictionary()
        )
        """Callers waiting for an instance this engine runs to record something
        (``execute``): set after each append of its passes."""
        self._saturated = False
        self._sleeping_until: int | None = None
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None
        self._closing = False
        self._store_opened = False
        self._host = EngineHost(self)
        self.projections: ProjectionRunner | None = None
        """The runner of ``projections`` (None without them)."""
        if projections:
            self.projections = ProjectionRunner(
                self.store,
                projections,
                owner=self.owner,
                lease=lease,
                poll_interval=poll_interval,
                now_us=self._now_us,
            )
        self._tasks: TaskRunner | None = None
        if self.queues:
            self._tasks = TaskRunner(
                self.store,
                owner=self.owner,
                queues=self.queues,
                steps=registered,
                threads=self.step_threads,
                lease_us=self._lease_us,
                now_us=self._now_us,
                stream_id=self.stream_id,
                concurrency=task_concurrency,
                poll_interval=poll_interval,
                policies=self.policies,
                guards=self.guards,
            )

    @property
    def lease_us(self) -> int:
        return self._lease_us

    async def open(self) -> Self:
        await self.start_engine()
        return self

    # -- hooks of the client ----------------------------------------------------------

    def _free_slots(self) -> int:
        # Slots held for a start or a claim still in flight count as taken: else a
        # claim that read the free count before a start's await ran one more pass
        # than ``concurrency`` (seen on PostgreSQL, whose claim round trip is long).
        return self.concurrency - len(self._active) - self._held_slots

    def _reserve_slot(self) -> bool:
        if self._closing or self._free_slots() <= 0:
            return False
        self._held_slots += 1
        return True

    def _release_slot(self) -> None:
        self._held_slots -= 1
        if self._saturated:
            self._wake.set()  # a claim held back for this slot looks again

    def _run_here(self, history: History) -> None:
        # Started with a lease to this engine on a new wake-up row: its first epoch.
        self._fences[history.workflow_id] = Fence(history.workflow_id, self.owner, 1)
        self._journal.remember(history, fresh=True)
        self._spawn(history.workflow_id)

    def _fence(self, workflow_id: str) -> Fence | None:
        return self._fences.get(workflow_id)

    def _poke(self) -> None:
        self._wake.set()
        if self._tasks is not None:
            self._tasks.poke()

    async def start_engine(self) -> None:
        """Open the store, recover unfinished instances and start running them."""
        await self.store.open()
        self._store_opened = True
        # What checks signals is imported now, not by the first signal's sender (the
        # CLI and plain clients do not load it at all: ~70 ms a process).
        await asyncio.to_thread(importlib.import_module, "jsonschema")
        await self._sync_clock()
        now = self._now_us()
        await self._membership.join(now)
        if self.takeover:
            # The leases of workers that died (and of pre-registry engines whose
            # leases ran out) are released now, so their instances resume at once.
            await self._reap(now)
        await self._resume_stuck()
        await self.policies.declare(self._declared, actor=f"engine {self.owner}")
        # Work made due by other writers (a client's start, a signal, another worker's
        # child ending) wakes the scheduler at once, not at its next poll: on
        # PostgreSQL from any process (LISTEN/NOTIFY), elsewhere from this one.
        self._unwatch = await self.store.watch_work(self._poke)
        self._scheduler = asyncio.create_task(self._schedule(), name="ledgerflow-scheduler")
        self._heartbeat = asyncio.create_task(self._renew(), name="ledgerflow-heartbeat")
        if self._tasks is not None:
            self._tasks.start()
        if self.projections is not None:
            self.projections.start()

    async def close(self, *, grace: float = 5.0) -> None:
        """Stop claiming work, let running passes finish (up to ``grace`` seconds),
        give back leases and close the store if the engine opened it."""
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        self._drop_kept()
        if not self._store_opened:
            # Its start failed opening the store: it holds nothing to give back,
            # and saying otherwise (as each step below would) misleads.
            await _within(asyncio.get_running_loop().time() + 1.0, super().close(), "close")
            return
        if self._unwatch is not None:
            self._unwatch()
        # What touches the store here has CLOSE_BOOKKEEPING_S in all beyond the grace
        # period: with the store out of reach each call would wait out its own
        # timeouts (a worker told to stop took a minute), and the leases expire by
        # themselves anyway.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_BOOKKEEPING_S * 0.4
        # Say so first: the registry shows a worker that is stopping, not one that
        # went quiet. The heartbeat keeps saying it while running passes finish.
        await _within(deadline, self._membership.beat(self._now_us()), "say it is stopping")
        if self._scheduler is not None and not await _within(
            deadline, asyncio.shield(self._scheduler), "stop claiming"
        ):
            await cancel_and_wait([self._scheduler])
        await asyncio.gather(
            self._finish_passes(grace), self._stop_tasks(grace), self._stop_projections()
        )
        self._drop_kept()  # runs kept by passes that ended meanwhile
        if self._heartbeat is not None:
            # Stopped only now: the leases of passes finishing within the grace
            # period stay renewed, and this worker alive in the registry.
            await cancel_and_wait([self._heartbeat])
        # Bodies of cancelled passes not started yet never start; running ones end
        # in their own time, waited for while their leases (renewed a third of a
        # lease ago at most) surely hold.
        self.step_threads.shutdown()
        returned = await self._bodies_returned(loop.time() + self.lease_us / 2_000_000)
        deadline = loop.time() + CLOSE_BOOKKEEPING_S * 0.6
        if returned:
            await _within(deadline, self.store.release_wakeups(self.owner), "give leases back")
            if self._tasks is not None:
                await _within(deadline, self._tasks.release(), "give task leases back")
            await _within(deadline, self.guards.release(), "give permits back")
        else:
            # A sync step's body cannot be stopped: given back, its instance (or
            # task) would run the step again in another worker while this one still
            # runs it. Left to expire, it is taken over once this process is gone.
            log.warning(
                "ledgerflow engine: %d step bodies still run and cannot be stopped: "
                "the leases of what they run expire (in at most %.0f s) rather than "
                "being given back",
                self.step_threads.running,
                self.lease_us / 1_000_000,
            )
        await _within(deadline, self._membership.leave(), "leave the registry")  # last
        # The store too (a SQLite writer stuck in a busy wait, a pool that cannot
        # reach its server): what is left of it ends with the process.
        await _within(max(deadline, loop.time() + 1.0), super().close(), "close the store")

    async def _bodies_returned(self, deadline: float) -> bool:
        """Whether every sync step body handed to the threads has come back, waiting
        for them up to ``deadline`` (loop time): cancelled passes do not stop them."""
        left = deadline - asyncio.get_running_loop().time()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, left)):
                await self.step_threads.returned()
        return not self.step_threads.running

    def _stopping(self) -> bool:
        # A method, not the attribute: close() flips it while loops await.
        return self._closing

    async def _finish_passes(self, grace: float) -> None:
        active = list(self._active.values())
        if active:
            _, pending = await asyncio.wait(active, timeout=grace)
            await cancel_and_wait(pending)

    async def _stop_projections(self) -> None:
        if self.projections is not None:
            await self.projections.stop()

    async def _stop_tasks(self, grace: float) -> None:
        if self._tasks is not None:
            await self._tasks.stop(grace)

    async def _schedule(self) -> None:
        failures = 0
        while not self._closing:
            try:
                claimed = await self._claim()
                failures = 0
            except (StoreUnavailableError, StoreReadOnlyError) as exc:
                failures += 1
                log.warning("ledgerflow engine: cannot claim work (%s)", exc)
                await asyncio.sleep(min(5.0, 0.1 * 2**failures))
                continue
            except Exception:
                # A bug, or a refusal no retry cures: say so loudly and keep going. A
                # scheduler that ended under a live heartbeat would be a worker that
                # looks alive, that nobody reaps, and that runs nothing.
                failures += 1
                log.exception("ledgerflow engine: claiming work failed")
                await asyncio.sleep(min(5.0, 0.1 * 2**failures))
                continue
            if claimed:
                continue
            self._wake.clear()
            if self._stopping():
                break
            if self._free_slots() <= 0:
                # Every slot is busy: a pass ending frees one and wakes us; looking at
                # due times now would only find the backlog due and spin.
                self._saturated = True
                cap = self.clock.now() + timedelta(seconds=self.poll_interval)
                await self.clock.sleep_until(cap, self._wake)
                continue
            try:
                due = await self.store.next_wakeup(workflows=self._definitions.keys())
            except (StoreUnavailableError, StoreReadOnlyError):
                due = None
            # Other processes (the CLI, other engines) nudge rows without telling us;
            # poll_interval bounds how long that goes unseen.
            # Compared in µs: a due time far in the future need not fit a datetime.
            cap_us = self._now_us() + int(self.poll_interval * 1_000_000)
            when_us = cap_us if due is None else min(cap_us, due)
            self._sleeping_until = when_us
            await self.clock.sleep_until(from_micros(when_us), self._wake)
            self._sleeping_until = None

    async def _claim(self) -> bool:
        free = self._free_slots()
        if free <= 0:
            self._saturated = True
            return False
        now = self._now_us()
        self._held_slots += free
        try:
            # Only instances of workflows registered here: a worker that cannot run
            # an instance leaves it to one that can, instead of parking it.
            leases = await self.store.claim_wakeups(
                self.owner,
                now_us=now,
                lease_until_us=now + self.lease_us,
                limit=free,
                workflows=self._definitions.keys(),
            )
        finally:
            self._held_slots -= free
        if leases:
            metrics.claimed("workflow", [now - (lease.due_at_us or now) for lease in leases])
        for lease in leases:
            self._fences[lease.workflow_id] = Fence(lease.workflow_id, self.owner, lease.epoch)
            if lease.workflow_id in self._active:
                self._rerun.add(lease.workflow_id)
            else:
                self._spawn(lease.workflow_id)
        self._saturated = len(leases) == free
        return self._saturated

    async def _sync_clock(self) -> None:
        if not isinstance(self.clock, DatabaseClock):
            return
        try:
            await self.clock.sync(self.store.database_now_us)
        except (StoreUnavailableError, StoreReadOnlyError, StoreClosedError) as exc:
            log.warning("ledgerflow engine: cannot read the database's clock (%s)", exc)

    async def _reap(self, now: int) -> None:
        if await self._membership.reap(now):
            self._poke()  # their instances and tasks are claimable now

    async def _renew(self) -> None:
        """The heartbeat: tell the registry this engine lives, reap workers that do
        not (with ``takeover``), and extend the leases of the instances running here,
        so a pass that outlives one lease period (slow steps, retries, a busy pool)
        is not taken over while this engine lives. A lease found lost is only logged:
        the pass's next append fails its fence and it steps back."""
        every = max(0.05, self.lease_us / 3 / 1_000_000)
        while True:
            await asyncio.sleep(every)
            await self._sync_clock()
            # Only after a heartbeat the store heard, and as of its time: then this
            # engine cannot reap itself, and one cut off from the store judges nobody.
            now = self._now_us()
            if await self._membership.beat(now) and self.takeover:
                await self._reap(now)
            if self._tasks is not None:
                await self._tasks.renew()
            try:
                await self.guards.renew()
            except (StoreUnavailableError, StoreReadOnlyError, StoreClosedError) as exc:
                log.warning("ledgerflow engine: cannot renew bulkhead permits (%s)", exc)
            held = [
                Lease(wid, fence.epoch)
                for wid, fence in self._fences.items()
                if wid in self._active
            ]
            if not held:
                continue
            try:
                kept = await self.store.renew_leases(
                    self.owner, held, lease_until_us=self._now_us() + self.lease_us
                )
            except (StoreUnavailableError, StoreReadOnlyError, StoreClosedError) as exc:
                log.warning("ledgerflow engine: cannot renew leases (%s)", exc)
                continue
            for lost in set(held) - set(kept):
                await self._lost(lost)

    async def _lost(self, lease: Lease) -> None:
        """A lease a renewal did not find: say so if another runner holds it now. A
        pass that just ended gives its lease back before it leaves ``_active``, so a
        renewal in between finds it gone: that is no takeover, and says nothing."""
        try:
            row = await self.store.get_wakeup(lease.workflow_id)
        except (StoreUnavailableError, StoreReadOnlyError, StoreClosedError):
            return
        if row is not None and row.lease_owner not in (None, self.owner):
            log.warning(
                "workflow %s: lease %d was taken over by %s; this engine steps back",
                lease.workflow_id,
                lease.epoch,
                row.lease_owner,
                extra={"workflow_id": lease.workflow_id},
            )

    def _runs_here(self, workflow_id: str) -> bool:
        return workflow_id in self._active

    def _moved(self, workflow_id: str) -> asyncio.Event:
        event = self._watchers.get(workflow_id)
        if event is None:
            event = self._watchers[workflow_id] = asyncio.Event()
        return event

    def _appended(self, workflow_id: str) -> None:
        event = self._watchers.get(workflow_id)
        if event is not None:
            event.set()

    def _spawn(self, workflow_id: str) -> None:
        task = asyncio.create_task(self._drive(workflow_id), name=f"wf:{workflow_id}")
        self._active[workflow_id] = task

    async def _drive(self, workflow_id: str) -> None:
        failures = 0
        try:
            while not self._closing:
                try:
                    again = await self._pass(workflow_id)
                except (
                    StoreUnavailableError,
                    StoreReadOnlyError,
                    StoreClosedError,
                    Abandon,
                ) as exc:
                    # Infrastructure, not the workflow: what is recorded stands, and
                    # the pass is tried again from there.
                    self._journal.forget(workflow_id)
                    failures += 1
                    if self._stopping():
                        return
                    if failures > MAX_PASS_RETRIES:
                        log.error(
                            "workflow %s: store unavailable %d times in a row (%s); "
                            "leaving it until its lease expires",
                            workflow_id,
                            failures,
                            exc,
                            extra={"workflow_id": workflow_id},
                        )
                        return
                    log.warning(
                        "workflow %s: pass abandoned, retrying: %s",
                        workflow_id,
                        exc,
                        extra={"workflow_id": workflow_id},
                    )
                    await asyncio.sleep(min(5.0, 0.05 * 2**failures))
                    continue
                except (LeaseLostError, Relinquish) as exc:
                    # Another runner holds the instance now: nothing more from us.
                    if isinstance(exc, LeaseLostError):
                        metrics.lease_lost("workflow")
                    log.warning(
                        "workflow %s: stepping back: %s",
                        workflow_id,
                        exc,
                        extra={"workflow_id": workflow_id},
                    )
                    self._journal.forget(workflow_id)
                    return
                failures = 0
                if not again and workflow_id not in self._rerun:
                    return
                self._rerun.discard(workflow_id)
        except Exception:
            # A bug or an unexpected failure: the lease runs out and the instance is
            # tried again then; nothing recorded is lost.
            log.exception(
                "workflow %s: pass failed", workflow_id, extra={"workflow_id": workflow_id}
            )
            self._journal.forget(workflow_id)
        finally:
            self._active.pop(workflow_id, None)
            self._fences.pop(workflow_id, None)  # each pass ends giving the lease back
            self._journal.settled(workflow_id)
            if self._saturated or self._closing:
                self._wake.set()  # a slot is free for work left unclaimed

    async def _pass(self, workflow_id: str) -> bool:
        """Run one pass; True if another pass is needed at once."""
        history = await self._journal.current(workflow_id)
        try:
            return await self._pass_over(history)
        except ConcurrencyError:
            # Someone wrote under a runtime-row update: look again at what is there.
            self._journal.forget(workflow_id)
            return True

    async def _pass_over(self, history: History) -> bool:
        began = time.perf_counter()
        started = history.started
        token = _current_workflow.set((history.workflow_id, history.correlation_id))
        try:
            with (
                tracing.joined(history.traceparent),
                tracing.span(
                    f"workflow {started.name}",
                    kind=tracing.SpanKind.CONSUMER,
                    # Handled by the engine: another look (someone wrote meanwhile),
                    # or stepping back (another runner holds it). Not failures.
                    expected=(ConcurrencyError, LeaseLostError, Relinquish),
                    attributes={
                        "ledgerflow.workflow_id": history.workflow_id,
                        "ledgerflow.workflow": started.name,
                        "ledgerflow.version": history.definition_version,
                    },
                ),
            ):
                if history.traceparent is None:
                    # Started outside any trace: this first pass is its root, and
                    # the commands it records name it for every later pass.
                    history.traceparent = tracing.current_traceparent()
                return await self._pass_over_timed(history)
        finally:
            _current_workflow.reset(token)
            metrics.pass_seconds(started.name, time.perf_counter() - began)

    async def _pass_over_timed(self, history: History) -> bool:
        workflow_id = history.workflow_id
        if history.finished is not None:
            # Ended, but the last steps of ending (telling the parent, dropping the
            # wake-up) were cut short: finish them.
            await self._after_end(history)
            return False
        if history.stuck is not None:
            # Parked: a signal may have nudged it; it runs again only when resumed.
            await self._journal.guarded(history, [Unschedule(workflow_id)])
            return False
        started = history.started
        version = history.definition_version
        definition = self._definitions.get((started.name, version))
        if definition is None:
            await self._get_stuck(history, UnknownWorkflowError(started.name, version))
            return False
        mismatch = other_kind(definition, history)
        if mismatch is not None:
            await self._get_stuck(history, mismatch)
            return False
        run = self._resumed(history, definition) or executor(
            definition, self._host, history, keep=self._keep_waiting > 0
        )
        kept = False
        try:
            try:
                result = await run.execute()
            except Restart:
                self._journal.forget(workflow_id)
                return True
            except Park as park:
                # Steps that ran before it parked (their results wait to ride with
                # the pass's end) are recorded with the parking: else a resume would
                # run them again.
                await self._get_stuck(history, park.error, run.unrecorded())
                return False
            again = await self._conclude(history, result)
            if (
                result.kept
                and not self._closing  # closing drops every kept run: keep no new one
                and not history.personal
                and self._journal.holds(history)
            ):
                # Its waits are recorded (or, with news that came meanwhile, the pass
                # to run at once looks again): the next pass may go on from where it
                # waits. Personal data is never kept (read again each pass: Journal).
                self._keep(workflow_id, run, definition)
                kept = True
            return again
        finally:
            if not kept:
                run.drop()
            run.released()  # step threads whose results went with the pass's end

    def _resumed(self, history: History, definition: Definition) -> Executor | None:
        """The kept run of the instance, resumed for this pass, if it may go on over
        ``history``; else None (a kept one is dropped: this pass replays)."""
        found = self._kept.pop(history.workflow_id, None)
        if found is None:
            return None
        run, ran = found
        if ran is definition and run.resumable(history):
            run.resume()
            return run
        run.drop()
        return None

    def _keep(self, workflow_id: str, run: Executor, definition: Definition) -> None:
        run.kept()
        self._kept[workflow_id] = (run, definition)
        while len(self._kept) > self._keep_waiting:
            _, (dropped, _) = self._kept.popitem(last=False)
            dropped.drop()

    def _drop_kept(self) -> None:
        while self._kept:
            _, (dropped, _) = self._kept.popitem()
            dropped.drop()

    async def _conclude(self, history: History, result: PassResult) -> bool:
        workflow_id = history.workflow_id
        if result.finished is not None:
            finished = result.finished
            now = self._now_us()
            parent = history.started.parent_id
            runtime: list[RuntimeWrite] = [
                PutInstance(
                    InstanceRow(
                        workflow_id,
                        history.started.name,
                        history.definition_version,
                        finished.status,
                        parent,
                        now,
                        now,
                    )
                )
            ]
            if parent is None:
                runtime.append(Unschedule(workflow_id))
            if history.sent_to_queues():
                runtime.append(DropTasks(workflow_id))  # steps it no longer waits for
            # A signal or cancellation that landed meanwhile fails this append: the
            # pass runs again and decides with it in view.
            if await self._append_keeping(history, result.buffered, [finished], runtime):
                return True
            self._stuck.pop(workflow_id, None)
            metrics.workflow_finished(history.started.name, finished.status)
            if finished.status != WorkflowStatus.COMPLETED:
                log.warning(
                    "workflow %s ended %s: %s: %s",
                    workflow_id,
                    finished.status,
                    finished.error_type,
                    finished.message,
                    extra={"workflow_id": workflow_id},
                )
            self._tell(history, finished)
            if parent is not None:
                await self._after_end(history)
            self._journal.forget(workflow_id)
            return False
        suspend = result.suspend
        assert suspend is not None
        schedule = Schedule(workflow_id, suspend.due_at_us)
        events = [*result.buffered, *suspend.events]
        if suspend.stale:
            # A wait may have missed news folded in meanwhile: as when news fails
            # the append, keep what the pass buffered (step results), keep the
            # lease (no schedule) and let another pass wait, with the news in view.
            if result.buffered:
                await self._append_keeping(history, result.buffered, [], [])
            return True
        if events:
            if await self._append_keeping(history, result.buffered, suspend.events, [schedule]):
                return True
        else:
            await self._journal.guarded(history, [schedule])
        due = suspend.due_at_us
        if due is not None and (self._sleeping_until is None or due < self._sleeping_until):
            self._wake.set()  # due before the scheduler means to look again
        return False

    async def _append_keeping(
        self,
        history: History,
        buffered: list[Any],
        events: list[Any],
        runtime: list[RuntimeWrite],
    ) -> bool:
        """Append the pass's conclusion; True if another pass must decide instead.

        A signal, cancellation or child's news that landed meanwhile fails the append:
        the pass runs again with it in view, but the step results it buffered are
        appended past those events first, so no step runs twice for it. Anything
        else recorded meanwhile means another runner: nothing is kept.
        """
        try:
            await self._journal.append(history, [*buffered, *events], runtime)
            self._appended(history.workflow_id)
            return False
        except ConcurrencyError:
            pass
        while buffered:
            stream = self.stream_id(history.workflow_id)
            newer = await self.store.read_stream(stream, from_version=history.version + 1)
            if not newer or not all(history.from_outside(e.data) for e in newer):
                # Another runner's records (or none yet): read the history afresh.
                self._journal.forget(history.workflow_id)
                break
            history.extend(newer)
            try:
                await self._journal.append(history, buffered, [])
                self._appended(history.workflow_id)
                break
            except ConcurrencyError:
                continue
        # Otherwise what is cached is still the stream's beginning: the next pass
        # reads the rest (and a kept run may go on over it).
        return True

    async def _after_end(self, history: History) -> None:
        """Tell the parent (if any) how this instance ended, then drop its wake-up.

        The child keeps its wake-up until the news is in the parent's stream (one
        append carries the news, the parent's nudge and the child's unschedule), so
        a crash in between delivers it on the next claim, never loses it.
        """
        workflow_id = history.workflow_id
        parent = history.started.parent_id
        finished = history.finished
        assert finished is not None
        if parent is None:
            await self._journal.guarded(history, [Unschedule(workflow_id)])
            return
        news = ChildFinished(
            child_id=workflow_id,
            status=finished.status,
            result=finished.result,
            error_type=finished.error_type,
            message=finished.message,
        )
        stream = self.stream_id(parent)
        while True:
            version = await self.store.stream_version(stream)
            row = await self.store.get_instance(parent)
            if row is None or row.status in TERMINAL:
                await self._journal.guarded(history, [Unschedule(workflow_id)])
                return
            try:
                await self.store.append(
                    stream,
                    [news],
                    version,
                    runtime=[Nudge(parent, self._now_us()), Unschedule(workflow_id)],
                    fence=self._fence(workflow_id),
                )
            except ConcurrencyError:
                continue  # the parent moved on meanwhile: look again
            self._wake.set()  # the parent is due now: claim it
            return

    async def _get_stuck(
        self, history: History, error: WorkflowError, done: Sequence[Any] = ()
    ) -> None:
        workflow_id = history.workflow_id
        log.error(
            "workflow %s is stuck: %s", workflow_id, error, extra={"workflow_id": workflow_id}
        )
        metrics.workflow_stuck(history.started.name)
        now = self._now_us()
        row = InstanceRow(
            workflow_id,
            history.started.name,
            history.definition_version,
            WorkflowStatus.STUCK,
            history.started.parent_id,
            now,
            now,
        )
        stuck = Stuck(error_type=type(error).__name__, message=error_message(error))
        while True:
            try:
                await self._journal.append(
                    history, [*done, stuck], [PutInstance(row), Unschedule(workflow_id)]
                )
                break
            except ConcurrencyError:
                # Signals may land meanwhile; anything else means another runner.
                newer = await self.store.read_stream(
                    self.stream_id(workflow_id), from_version=history.version + 1
                )
                if not all(history.from_outside(e.data) for e in newer):
                    self._journal.forget(workflow_id)
                    return
                history.extend(newer)
        self._stuck[workflow_id] = error
        self._journal.forget(workflow_id)
        self._tell(history, error)

    async def _would_go_on(self, row: InstanceRow) -> bool:
        """Whether this engine's code replays a stuck instance's history without
        parking it again (a pass that only replays: it acts on nothing)."""
        definition = self._definitions[(row.name, row.version)]
        try:
            events = await self.store.read_stream(self.stream_id(row.workflow_id))
            history = History.of(row.workflow_id, events)
            if other_kind(definition, history) is not None:
                return False
            run = executor(definition, ReplayHost(self._now_us()), history, query=True)
            await run.execute()
        except Park:
            return False
        except Exception:  # noqa: BLE001 - not a verdict on the code: resume, and see
            return True
        return True

    async def _resume_stuck(self) -> None:
        after: str | None = None
        while True:
            rows = await self.store.list_instances(
                status=WorkflowStatus.STUCK, after=after, limit=500
            )
            if not rows:
                return
            for row in rows:
                if (row.name, row.version) not in self._definitions:
                    continue
                if not await self._would_go_on(row):
                    # This code parks it again where it is: leave it so, recording
                    # nothing (each start of a crash-looping worker added two events).
                    continue
                now = self._now_us()
                stream = self.stream_id(row.workflow_id)
                version = await self.store.stream_version(stream)
                running = InstanceRow(
                    row.workflow_id,
                    row.name,
                    row.version,
                    WorkflowStatus.RUNNING,
                    row.parent_id,
                    now,
                    now,
                )
                with contextlib.suppress(ConcurrencyError):
                    await self.store.append(
                        stream,
                        [Resumed(by=self.owner)],
                        version,
                        runtime=[PutInstance(running), Schedule(row.workflow_id, now)],
                    )
            after = rows[-1].workflow_id
