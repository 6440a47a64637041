"""What the API and the web UI do for a caller, in one place: each method takes the
principal and the caller's ids, maps them into the ledger's (tenants are id
namespaces: see ``ledgerflow.tenants``), calls the engine's client, and answers with
the bodies of ``schemas``. Refusals are ``Problem``s naming the field at fault."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import msgspec

from .. import tracing
from ..errors import LedgerflowError, WorkflowNotFoundError
from ..events import RecordedEvent
from ..hashing import from_micros
from ..statemachine.instance import MachineState
from ..store.runtime import InstanceRow
from ..tenants import tenant_prefix
from ..workflow.client import MAX_WORKFLOW_ID_LENGTH, WorkflowClient
from ..workflow.history import ChildStarted, WorkflowStatus
from ..workflow.journal import load_history
from .ids import CallerIds
from .keys import ApiKey, ApiKeys
from .principals import Principal, Role
from .problems import Problem, field_errors, invalid
from .schemas import (
    Accepted,
    CreateKey,
    EventOut,
    HistoryPage,
    KeyCreatedOut,
    KeyOut,
    QueryOut,
    SendSignal,
    SignalWaitOut,
    Started,
    StartWorkflow,
    WorkflowDetail,
    WorkflowPage,
    WorkflowSummary,
)

__all__ = ["Action", "Service", "parse_moment"]

Action = Literal["cancel", "retry", "skip", "compensate", "resume"]

_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,6})?([Zz]|[+-]\d{2}:\d{2})")


def parse_moment(value: str | None, field: str) -> datetime | None:
    """An RFC 3339 time with its offset (what ``format: date-time`` means)."""
    if value is None:
        return None
    # An empty value is no time (schemathesis sent ?created_before= and got every
    # instance back, as if no filter had been given).
    if not _RFC3339.fullmatch(value):
        raise invalid(field, "expected an RFC 3339 time with offset, e.g. 2026-12-01T10:00:00Z")
    try:
        return datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        # Python's own words name its types (a timedelta's repr for an offset of
        # +99:00): say what is wrong in the caller's terms.
        raise invalid(
            field,
            "not a valid time: the date must exist, the time be at most 23:59:59 and "
            "the offset within -23:59..+23:59",
        ) from None


def _no_nul(field: str, value: str | None) -> None:
    if value is not None and "\x00" in value:
        raise invalid(field, "NUL is not allowed")


@dataclass(frozen=True, slots=True)
class Service:
    client: WorkflowClient
    keys: ApiKeys

    # -- ids ------------------------------------------------------------------------------

    def internal(self, who: Principal, workflow_id: str, field: str = "path.workflow_id") -> str:
        """The ledger's id of the caller's ``workflow_id`` (a ``/`` sent in a path as
        ``%2F`` arrives as NUL: see ``app.SlashSafe``); ``field`` names where it came
        from when it is refused."""
        workflow_id = workflow_id.replace("\x00", "/")
        if not workflow_id or len(workflow_id) > MAX_WORKFLOW_ID_LENGTH:
            raise invalid(field, f"an id is 1-{MAX_WORKFLOW_ID_LENGTH} characters without NUL")
        return workflow_id if who.everywhere else tenant_prefix(who.tenant) + workflow_id

    def external(self, who: Principal, workflow_id: str | None) -> str | None:
        """The caller's id of a ledger id (None for one outside the caller's tenant)."""
        return self.ids(who).id(workflow_id)

    def ids(self, who: Principal) -> CallerIds:
        """How the caller reads the ledger's ids (in fields, and in the engine's words)."""
        return CallerIds(None if who.everywhere else tenant_prefix(who.tenant))

    @contextlib.contextmanager
    def _in_callers_ids(self, who: Principal) -> Iterator[None]:
        """The engine's refusals, quoting the instance as the caller names it (it
        quotes the ledger's id, ``acme/o-1``, which the caller cannot use)."""
        try:
            yield
        except LedgerflowError as exc:
            self.ids(who).recast(exc)
            raise

    def mine(self, who: Principal, workflow_id: str) -> str:
        found = self.external(who, workflow_id)
        assert found is not None  # every id read for a tenant is under its prefix
        return found

    async def _row(self, who: Principal, workflow_id: str) -> tuple[str, InstanceRow]:
        internal = self.internal(who, workflow_id)
        row = await self.client.store.get_instance(internal)
        if row is None:
            raise WorkflowNotFoundError(self.mine(who, internal))
        return internal, row

    # -- reading ----------------------------------------------------------------------

    async def list_workflows(
        self,
        who: Principal,
        *,
        status: str | None = None,
        name: str | None = None,
        text: str | None = None,
        created_from: datetime | None = None,
        created_before: datetime | None = None,
        newest_first: bool = True,
        after: str | None = None,
        limit: int = 50,
    ) -> WorkflowPage:
        for field, value in (("name", name), ("text", text), ("after", after)):
            _no_nul(f"query.{field}", value)
        rows = await self.client.list_workflows(
            status=status,
            name=name,
            text=text,
            id_prefix=None if who.everywhere else tenant_prefix(who.tenant),
            created_from=created_from,
            created_before=created_before,
            newest_first=newest_first,
            after=None if after is None else self.internal(who, after, "query.after"),
            limit=limit,
        )
        items = [self._summary(who, row) for row in rows]
        return WorkflowPage(items, items[-1].id if len(items) == limit else None)

    def _summary(self, who: Principal, row: InstanceRow) -> WorkflowSummary:
        return WorkflowSummary(
            id=self.mine(who, row.workflow_id),
            name=row.name,
            version=row.version,
            status=row.status,
            parent_id=self.external(who, row.parent_id),
            created_at=from_micros(row.created_at_us),
            updated_at=from_micros(row.updated_at_us),
        )

    async def describe(self, who: Principal, workflow_id: str) -> WorkflowDetail:
        internal, _ = await self._row(who, workflow_id)
        with self._in_callers_ids(who):
            described = await self.client.describe(internal)
        ids = self.ids(who)
        waiting_for, undo_failed = described.waiting_for, list(described.undo_failed)
        if ids.prefix is not None and (
            "child " in (waiting_for or "") or any(s.startswith("child ") for s in undo_failed)
        ):
            # Both name children by the ledger's ids: which words are ids is told by
            # the instance's children, not guessed from the text.
            children = await self._children(internal)
            waiting_for = ids.waiting_for(waiting_for, children)
            undo_failed = ids.undo_failed(undo_failed, children)
        return WorkflowDetail(
            id=self.mine(who, internal),
            name=described.name,
            version=described.version,
            status=described.status,
            parent_id=ids.id(described.parent_id),
            created_at=described.created_at,
            updated_at=described.updated_at,
            events=described.events,
            waiting_for=waiting_for,
            waiting_signals=[
                SignalWaitOut(w.name, w.schema, w.deadline) for w in described.waiting_signals
            ],
            unconsumed_signals=list(described.unconsumed_signals),
            result=described.result,
            error=ids.error(described.error),
            undo_failed=undo_failed,
        )

    async def _children(self, internal: str) -> list[str]:
        """The ids of the children the instance started."""
        history = await load_history(self.client.store, internal)
        started = [
            e.child_id
            for events in history.commands.values()
            for e in events
            if isinstance(e, ChildStarted)
        ]
        return list(dict.fromkeys([*started, *history.children]))

    async def history(
        self, who: Principal, workflow_id: str, *, after: int = 0, limit: int = 100
    ) -> HistoryPage:
        internal, _ = await self._row(who, workflow_id)
        events = await self.client.store.read_stream(
            self.client.stream_id(internal), from_version=after + 1, limit=limit
        )
        ids = self.ids(who)
        items: list[EventOut] = []
        size = 0
        for event in events:
            item = _event(event, ids)
            size += len(_ENCODER.encode(item.data))
            if items and size > PAGE_BYTES:
                # Events of up to 1 MiB each: 500 a page made answers (and UI pages)
                # of hundreds of MB. The page ends here; ``next`` goes on from it.
                return HistoryPage(items, items[-1].version)
            items.append(item)
        return HistoryPage(items, items[-1].version if len(items) == limit else None)

    async def query(self, who: Principal, workflow_id: str) -> QueryOut:
        internal, _ = await self._row(who, workflow_id)
        with self._in_callers_ids(who):
            state = await self.client.query(internal)
        mine = self.mine(who, internal)
        if isinstance(state, MachineState):  # the engine's; a workflow's own is the user's
            state = msgspec.structs.replace(state, instance_id=mine)
        return QueryOut(mine, msgspec.to_builtins(state))

    # -- acting -----------------------------------------------------------------------

    async def start(
        self,
        who: Principal,
        body: StartWorkflow,
        traceparent: str | None = None,
        correlation_id: str | None = None,
    ) -> tuple[Started, bool]:
        """The instance, and whether this call started it (False: it was started
        the same way before; starting is idempotent on the id). ``traceparent``: the
        caller's W3C trace context (the request's header): the instance joins it.
        ``correlation_id`` (the ``X-Correlation-Id`` header): recorded with the
        start; the instance's log lines carry it."""
        _no_nul("body.id", body.id)
        if body.id is not None and not who.everywhere:
            room = MAX_WORKFLOW_ID_LENGTH - len(tenant_prefix(who.tenant))
            if len(body.id) > room:
                raise invalid(
                    "body.id",
                    f"an id of this tenant's is at most {room} characters "
                    f"({MAX_WORKFLOW_ID_LENGTH} with the tenant and the /)",
                )
        if correlation_id is not None and not (
            0 < len(correlation_id) <= 200
            and correlation_id.isascii()
            and correlation_id.isprintable()
        ):
            # ASCII: a header's bytes are not text of a known encoding (UTF-8 sent
            # would be stored as Latin-1 mojibake).
            raise invalid("header.x-correlation-id", "1-200 printable ASCII characters")
        if correlation_id is not None and "," in correlation_id:
            # Two headers joined (by a proxy, or the framework): which one is meant?
            raise invalid("header.x-correlation-id", "send one X-Correlation-Id, without commas")
        with field_errors("body.workflow"):
            definition = self.client._definition(body.workflow)
        with field_errors("body.input"), tracing.joined(traceparent), self._in_callers_ids(who):
            handle, created = await self.client._begin(
                definition,
                body.input,
                id=body.id,
                tenant=None if who.everywhere else who.tenant,
                actor=who.subject,
                reason=body.reason,
                correlation_id=correlation_id,
            )
        status: str = WorkflowStatus.RUNNING
        if not created:  # it may have moved on since
            row = await self.client.store.get_instance(handle.id)
            status = row.status if row is not None else status
        started = Started(self.mine(who, handle.id), definition.name, definition.version, status)
        return started, created

    async def signal(
        self, who: Principal, workflow_id: str, signal: str, body: SendSignal
    ) -> Accepted:
        signal = signal.replace("\x00", "/")  # sent as %2F: see asgi.SlashSafe
        if not 0 < len(signal) <= 200:
            raise invalid("path.signal", "a signal name is 1-200 characters")
        internal, _ = await self._row(who, workflow_id)
        with field_errors("body.payload"), self._in_callers_ids(who):
            await self.client.signal(
                internal, signal, body.payload, id=body.id, actor=who.subject, reason=body.reason
            )
        return Accepted(self.mine(who, internal), "signal")

    async def act(
        self,
        who: Principal,
        workflow_id: str,
        action: Action,
        reason: str,
        *,
        seq: int | None = None,
        result: Any = None,
    ) -> Accepted:
        """An operator's action on an instance, with the reason recorded."""
        internal, _ = await self._row(who, workflow_id)
        client = self.client
        done: int | None = None
        with (
            field_errors("body.result" if action == "skip" else "body.reason"),
            self._in_callers_ids(who),
        ):
            if action == "cancel":
                await client.cancel(internal, reason, actor=who.subject)
            elif action == "retry":
                done = await client.retry_step(internal, reason=reason, actor=who.subject, seq=seq)
            elif action == "skip":
                done = await client.skip_step(
                    internal, result, reason=reason, actor=who.subject, seq=seq
                )
            elif action == "compensate":
                done = await client.compensate(internal, reason=reason, actor=who.subject, seq=seq)
            else:
                await client.resume(internal, reason=reason, actor=who.subject)
        return Accepted(self.mine(who, internal), action, done)

    # -- keys -------------------------------------------------------------------------

    async def list_keys(self, who: Principal) -> list[KeyOut]:
        return [_key(k) for k in await self.keys.list(who.tenant)]

    async def create_key(self, who: Principal, body: CreateKey) -> KeyCreatedOut:
        tenant = body.tenant or who.tenant
        if not who.everywhere and tenant != who.tenant:
            raise Problem(403, "Forbidden", "a tenant's admin creates keys of its own tenant only")
        with field_errors("body.tenant"):
            created = await self.keys.create(
                body.name, Role.parse(body.role), tenant, by=who.subject
            )
        return KeyCreatedOut(_key(created.key), created.secret)

    async def revoke_key(self, who: Principal, key_id: str, reason: str) -> KeyOut:
        key_id = key_id.replace("\x00", "/")  # sent as %2F: see asgi.SlashSafe
        try:
            key = await self.keys.revoke(key_id, by=who.subject, reason=reason, tenant=who.tenant)
        except KeyError:
            raise Problem(404, "Key not found", f"no API key {key_id!r}") from None
        return _key(key)


PAGE_BYTES = 4 << 20
"""About how much event data one page of a history holds (at least one event)."""
_ENCODER = msgspec.json.Encoder()


def _event(event: RecordedEvent, ids: CallerIds) -> EventOut:
    return EventOut(
        version=event.version,
        position=event.position,
        id=str(event.id),
        type=event.type,
        data=ids.event_data(event.data, msgspec.to_builtins(event.data)),
        metadata=msgspec.to_builtins(event.metadata),
        recorded_at=event.recorded_at,
    )


def _key(key: ApiKey) -> KeyOut:
    return KeyOut(
        key.key_id,
        key.name,
        key.role.label,
        key.tenant,
        key.created_by,
        key.created_at,
        key.revoked,
        key.revoked_by,
        key.revoked_reason,
    )
