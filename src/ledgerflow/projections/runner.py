"""Running projections: follow the global log from the checkpoint, in batches, one
runner per projection at a time (see ``docs/adr/015-projections.md``).

For each projection the runner claims its lease (or waits while another runner holds
it), makes its tables, and then, until stopped: reads the events after the
checkpoint (``read_all``, at most ``batch_size``), calls the handlers of those it
handles through a ``View``, and commits the writes with the new checkpoint in one
transaction, fenced by the lease. A handler that raises stops the projection there:
the events before it commit, the failure is recorded, and nothing more happens to the
projection until an operator retries or skips it (``ledgerflow projections retry|skip``).
A lease renewed too late, or a checkpoint moved under the runner (an operator's skip),
makes it step back and read its row again; a dead runner's lease expires and another
takes over from the committed checkpoint.

Each batch that read events is a ``projection <name>`` span (in no event's trace: a
batch mixes the events of many) and an observation of the batch metrics; an idle
poll is neither, so following a quiet log costs nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from .. import metrics, tracing
from .._waiting import cancel_and_wait, wait_at_most
from ..errors import (
    BusUnavailableError,
    ConfigurationError,
    InvalidEventDataError,
    PersonalDataErasedError,
    ProjectionHeldError,
    ProjectionLeaseLostError,
    StoreClosedError,
    StoreReadOnlyError,
    StoreUnavailableError,
)
from ..events import Metadata, RecordedEvent
from ..hashing import from_micros, to_micros
from ..store.ports import EventRow, row_event
from ..workflow.history import error_message, history_registry
from .definition import Projection, call
from .state import ProjectionFailure, ProjectionLease
from .view import View

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from ..store import WorkflowStore

__all__ = ["ProjectionRunner"]

log = logging.getLogger("ledgerflow.projections")


class ProjectionRunner:
    """Runs ``projections`` on ``store`` (see the module docstring).

    ``now_us``: the clock leases are judged by (an engine passes the database's);
    by default this host's. ``poll_interval`` bounds how long a new event, or an
    operator's retry, waits to be seen when no commit signal arrives."""

    def __init__(
        self,
        store: WorkflowStore,
        projections: Sequence[Projection],
        *,
        owner: str | None = None,
        lease: timedelta = timedelta(seconds=30),
        batch_size: int = 500,
        poll_interval: float = 1.0,
        now_us: Callable[[], int] | None = None,
    ) -> None:
        names = [p.name for p in projections]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"projections registered twice: {sorted(names)}")
        if batch_size < 1:
            raise ConfigurationError("batch_size must be >= 1")
        # The workflow events (wf.started, wf.finished...) read as their classes, as
        # under an engine: on a store opened alone they read as plain dicts, and
        # handlers written for the engine's projections failed on them.
        history_registry(store.registry)
        for projection in projections:
            # Else its events decode as plain data, no handler of it matches, and
            # the runner moves past every event as one it does not handle.
            unknown = projection.unknown_classes(store.registry.knows)
            if unknown:
                shown = ", ".join(sorted(cls.__qualname__ for cls in unknown))
                raise ConfigurationError(
                    f"projection {projection.name!r} handles {shown}, which the store's "
                    "event registry does not know: open the store (or the engine) with "
                    "the registry that registers them (ledgerflow worker --app finds "
                    "the registries defined at the top level of the app's module)"
                )
        self.store = store
        self.projections = list(projections)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease_us = int(lease.total_seconds() * 1_000_000)
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self._now_us = now_us or (lambda: time.time_ns() // 1_000)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._leases: dict[str, ProjectionLease] = {}
        self._made: set[tuple[str, int]] = set()
        """(projection, generation) whose tables this runner made sure of."""
        self._failures: dict[str, int] = {}
        """Failures in a row of each projection's runner (its backoff)."""

    # -- lifetime ---------------------------------------------------------------------

    def start(self) -> None:
        """Start following every projection (in tasks of the running loop)."""
        if self._tasks:
            return
        self._stopping.clear()
        self._tasks = [
            asyncio.create_task(self._follow(p), name=f"projection:{p.name}")
            for p in self.projections
        ]

    async def stop(self) -> None:
        """Stop after the batches under way, and give the leases back."""
        self._stopping.set()
        tasks, self._tasks = self._tasks, []
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.poll_interval + 5.0)
            await cancel_and_wait(pending)
        for lease in list(self._leases.values()):
            with contextlib.suppress(StoreUnavailableError, StoreClosedError):
                await self.store.release_projection(lease)
        self._leases.clear()

    async def catch_up(self, projection: Projection | str | None = None) -> int:
        """Apply what is in the log now to one projection (or every one), here and
        at once, without the background tasks (tests, scripts, a CLI's rebuild);
        the events applied. Takes the projection's lease like a runner, and gives it
        back when done unless this runner's tasks run the projection."""
        chosen = [
            p
            for p in self.projections
            if projection is None or p.name == projection or p is projection
        ]
        if not chosen:
            raise ConfigurationError(f"no projection {projection!r} here")
        applied = 0
        for p in chosen:
            running = p.name in self._leases and bool(self._tasks)
            lease = await self._claim(p)
            if lease is None:
                # Not a mistake of configuration (it was said to be one, not retryable):
                # a live runner has it, or a dead one until its lease runs out.
                row = await self.store.projection_row(p.name)
                until = row.lease_until_us if row is not None else None
                raise ProjectionHeldError(
                    p.name,
                    row.owner if row is not None else None,
                    from_micros(until) if until is not None else None,
                )
            try:
                while True:
                    count, more = await self._batch(p, lease)
                    applied += count
                    if not more:
                        break
            finally:
                if not running:  # a one-off: the lease goes back at once
                    self._leases.pop(p.name, None)
                    with contextlib.suppress(StoreUnavailableError, StoreClosedError):
                        await self.store.release_projection(lease)
        return applied

    # -- one projection ---------------------------------------------------------------

    async def _follow(self, projection: Projection) -> None:
        # Failures in a row, counted until a batch goes through: a claim that
        # succeeds proves only the store (a relay whose broker is down claims again
        # at once), so it does not end the backoff.
        failures = self._failures
        failures[projection.name] = 0
        while not self._stopping.is_set():
            try:
                lease = await self._claim(projection)
                if lease is None:
                    await self._pause(min(self.poll_interval, self.lease_us / 3e6))
                    continue
                await self._run(projection)
            except ProjectionLeaseLostError as exc:
                log.warning("%s; stepping back", exc)
                self._leases.pop(projection.name, None)
                await self._pause(self.poll_interval)
            except (
                StoreUnavailableError,
                StoreReadOnlyError,
                StoreClosedError,
                BusUnavailableError,
            ) as exc:
                if self._stopping.is_set() or isinstance(exc, StoreClosedError):
                    return
                failures[projection.name] += 1
                log.warning("projection %s: %s; retrying", projection.name, exc)
                await self._pause(min(5.0, 0.1 * 2 ** failures[projection.name]))
            except Exception:
                log.exception("projection %s: runner failed; starting again", projection.name)
                await self._pause(self.poll_interval)

    async def _claim(self, projection: Projection) -> ProjectionLease | None:
        now = self._now_us()
        lease = await self.store.claim_projection(
            projection.name, self.owner, now_us=now, until_us=now + self.lease_us
        )
        if lease is None:
            return None
        self._leases[projection.name] = lease
        return lease

    async def _tables(self, projection: Projection, generation: int) -> None:
        if (projection.name, generation) in self._made:
            return
        await self.store.ensure_tables(
            projection.name,
            list(projection.tables.values()),
            generation=generation,
            version=projection.version,
        )
        self._made.add((projection.name, generation))

    async def _run(self, projection: Projection) -> None:
        """Batches while the lease holds; the lease is renewed every third of it."""
        next_renewal = self._now_us() + self.lease_us // 3
        signal = await self.store.commits()
        while not self._stopping.is_set():
            if self._now_us() >= next_renewal:
                await self._renew(projection)
                next_renewal = self._now_us() + self.lease_us // 3
            wake = signal()  # before the read: a commit after it still wakes us
            lease = self._leases[projection.name]
            _count, more = await self._batch(projection, lease)
            self._failures[projection.name] = 0
            if not more:
                await self._pause(min(self.poll_interval, self.lease_us / 3e6), wake)

    async def _renew(self, projection: Projection) -> None:
        lease = self._leases[projection.name]
        now = self._now_us()
        if not await self.store.renew_projection(lease, until_us=now + self.lease_us):
            raise ProjectionLeaseLostError(projection.name, lease.owner, lease.epoch, "lease lost")

    @contextlib.contextmanager
    def _spanned(
        self, projection: Projection, events: Sequence[RecordedEvent], began: float
    ) -> Iterator[Span]:
        """The span of a batch that read ``events`` (opened once they are read: an
        idle poll makes none), and its metrics from ``began`` (``perf_counter``),
        recorded when it succeeds."""
        name = projection.name
        with tracing.span(
            f"projection {name}",
            {
                "ledgerflow.projection": name,
                "ledgerflow.events": len(events),
                "ledgerflow.from_position": events[0].position,
                "ledgerflow.to_position": events[-1].position,
            },
        ) as span:
            yield span
        metrics.projection_batch(name, len(events), time.perf_counter() - began)

    async def _batch(self, projection: Projection, lease: ProjectionLease) -> tuple[int, bool]:
        """One batch: the events applied, and whether more may be waiting."""
        began = time.perf_counter()
        row = await self.store.projection_row(projection.name)
        if row is None or row.owner != lease.owner or row.epoch != lease.epoch:
            raise ProjectionLeaseLostError(projection.name, lease.owner, lease.epoch, "lease lost")
        newest = max(row.version, row.rebuild.version if row.rebuild is not None else 0)
        if newest > projection.version:
            # Code of a later version built (or builds) these tables: this older code
            # must neither write into them (a rolling deploy's old runner took the
            # lease and filled the new version's rebuild with its own handlers, then
            # swapped that mixed model in) nor rebuild them back to its version.
            self._leases.pop(projection.name, None)
            with contextlib.suppress(StoreUnavailableError, StoreClosedError):
                await self.store.release_projection(lease)
            raise ProjectionLeaseLostError(
                projection.name,
                lease.owner,
                lease.epoch,
                f"version {newest} of it runs here, this code has version "
                f"{projection.version}: left to runners of the newer code",
            )
        await self._tables(projection, row.generation)
        if row.version == 0:  # made just now by this runner's version
            row = await self.store.projection_row(projection.name) or row
        if row.failure is not None:
            return 0, False  # stopped at a failed event until an operator acts
        if row.rebuild is None and row.version != projection.version:
            # New code: its read model is built anew beside the old one, which queries
            # keep reading until the new one has caught up.
            rebuild = await self.store.begin_rebuild(projection.name, version=projection.version)
            log.info(
                "projection %s: version %d -> %d, rebuilding into generation %d",
                projection.name,
                row.version,
                projection.version,
                rebuild.generation,
            )
            row = await self.store.projection_row(projection.name) or row
        rebuilding = row.rebuild is not None
        generation = row.rebuild.generation if row.rebuild is not None else row.generation
        position = row.rebuild.position if row.rebuild is not None else row.position
        await self._tables(projection, generation)
        events, unreadable = await self._read(projection, position)
        if unreadable is not None and not events:
            # The first event waiting cannot be decoded by this code and a handler
            # would want it: stop there, visibly, as for a handler that fails.
            await self._stop(projection, lease, unreadable)
            return 0, False
        if not events:
            if rebuilding:
                await self._finish(projection, lease, generation, position)
                return 0, True
            return 0, False
        with self._spanned(projection, events, began) as span:
            if rebuilding:
                span.set_attribute("ledgerflow.rebuild_generation", generation)
            return await self._apply(
                projection, lease, events, span, position, generation, rebuilding, unreadable
            )

    async def _read(
        self, projection: Projection, position: int
    ) -> tuple[list[RecordedEvent], ProjectionFailure | None]:
        """The batch after ``position``; if an event in it cannot be decoded (a newer
        schema version than this code registers, a type gone from the code), the
        events before it and, if a handler of ``projection`` may want it, the failure
        to stop at. One it has no handler for is passed over (a ``None`` in place of
        nothing: it is simply left out, and the checkpoint moves past it)."""
        try:
            return await self.store.read_all(
                from_position=position + 1, limit=self.batch_size
            ), None
        except (InvalidEventDataError, PersonalDataErasedError):
            pass  # find which, one by one (only now: a batch decodes whole normally)
        events: list[RecordedEvent] = []
        for row in await self.store.read_rows(from_position=position + 1, limit=self.batch_size):
            try:
                events.extend(await self.store.read_all(from_position=row.position, limit=1))
            except (InvalidEventDataError, PersonalDataErasedError) as exc:
                instead = await self._undecodable(projection, row, exc)
                if isinstance(instead, ProjectionFailure):
                    return events, instead
                events.append(instead)
        return events, None

    async def _undecodable(
        self,
        projection: Projection,
        row: EventRow,
        exc: InvalidEventDataError | PersonalDataErasedError,
    ) -> RecordedEvent | ProjectionFailure:
        """What stands in the batch for an event this code cannot decode: passed over
        (no handler of ``projection`` wants it, or its personal data was erased, which
        no handler may have: a read model built without it holds none of it, what a
        rebuild after ``gdpr erase`` is for), or the failure to stop at."""
        wanted = projection.may_handle(row.type, self.store.registry.class_of)
        if isinstance(exc, PersonalDataErasedError):
            if wanted:
                log.warning(
                    "projection %s passes over event %s at position %d: %s",
                    projection.name,
                    row.id,
                    row.position,
                    exc,
                )
        elif wanted:
            return ProjectionFailure(
                row.position, str(row.id), row.type, type(exc).__name__, str(exc)
            )
        return _passed_over(row)

    async def _stop(
        self, projection: Projection, lease: ProjectionLease, failure: ProjectionFailure
    ) -> None:
        await self.store.fail_projection(lease, failure, now_us=self._now_us())
        log.error(
            "projection %s stopped at position %d (%s %s): %s: %s; retry or skip it",
            projection.name,
            failure.position,
            failure.event_type,
            failure.event_id,
            failure.error_type,
            failure.message,
        )

    async def _apply(
        self,
        projection: Projection,
        lease: ProjectionLease,
        events: Sequence[RecordedEvent],
        span: Span,
        position: int,
        generation: int,
        rebuilding: bool,
        unreadable: ProjectionFailure | None = None,
    ) -> tuple[int, bool]:
        """Apply ``events`` (read after ``position``) to ``generation`` and commit
        the checkpoint; as ``_batch`` answers. ``unreadable``: the event after them
        could not be decoded, and the projection stops there."""

        async def read(table: str, key: Any) -> dict[str, Any] | None:
            # The generation being written (a rebuild's, not the live one).
            return await self.store.read_model_get(
                projection.name, projection.tables[table], key, generation=generation
            )

        view = View(projection, read)
        last, event_at, applied = position, None, 0
        failure: ProjectionFailure | None = None
        # The lease is renewed between batches: a batch whose handlers take longer
        # than a third of it ends early (what it did commits, the rest is the next
        # batch's). Slow handlers lost the lease mid-batch to a second runner, then
        # took it back, each throwing the other's work away, for ever.
        cut_at = time.monotonic() + self.lease_us / 3e6
        cut = False
        for index, event in enumerate(events):
            handlers = projection.handlers(event)
            if handlers:
                mark = view.mark()
                try:
                    for handler in handlers:
                        await call(handler, event, view)
                except Exception as exc:  # noqa: BLE001 - recorded; the projection stops
                    view.undo(mark)
                    failure = _failure(event, exc)
                    break
                applied += 1
            last, event_at = event.position, to_micros(event.recorded_at)
            if index + 1 < len(events) and time.monotonic() > cut_at:
                cut = True
                break
        if failure is None and not cut:
            failure = unreadable
        now = self._now_us()
        if last > position:
            await self.store.project(
                lease,
                projection.tables,
                from_position=position,
                to_position=last,
                event_at_us=event_at,
                writes=view.writes,
                now_us=now,
                generation=generation,
                rebuild=rebuilding,
            )
        span.set_attribute("ledgerflow.applied", applied)
        if failure is not None:
            # Handled, not raised (the projection stops there until an operator
            # acts), so the span is marked failed by hand.
            span.set_attribute("ledgerflow.failed_position", failure.position)
            tracing.fail(span, failure.error_type, failure.message)
            await self._stop(projection, lease, failure)
            return applied, False
        more = cut or len(events) == self.batch_size
        if rebuilding and not more:
            # Within a batch of the head: the new generation goes live now (its cursor
            # becomes the checkpoint: what came meanwhile is the next batch's).
            await self._finish(projection, lease, generation, last)
            return applied, True
        return applied, more

    async def _finish(
        self, projection: Projection, lease: ProjectionLease, generation: int, position: int
    ) -> None:
        await self.store.finish_rebuild(
            lease, list(projection.tables.values()), now_us=self._now_us()
        )
        log.info(
            "projection %s: generation %d caught up at position %d; it is live",
            projection.name,
            generation,
            position,
        )

    async def _pause(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        waits = [asyncio.ensure_future(self._stopping.wait())]
        if wake is not None:
            waits.append(asyncio.ensure_future(wake.wait()))
        try:
            await wait_at_most(asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED), seconds)
        finally:
            await cancel_and_wait([w for w in waits if not w.done()])


def _passed_over(row: EventRow) -> RecordedEvent:
    """An event this code cannot decode and no handler wants: it stands in the
    batch for its position (no handler matches ``None``)."""
    return row_event(row, None, Metadata())


def _failure(event: Any, exc: BaseException) -> ProjectionFailure:
    return ProjectionFailure(
        event.position, str(event.id), event.type, type(exc).__name__, error_message(exc)
    )
