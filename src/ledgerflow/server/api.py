"""The HTTP API's resources: workflows (start, list, describe, history, query,
signal, cancel, operator actions), API keys, health. Request and response bodies
are msgspec structs, so the OpenAPI document says exactly what is accepted.

Ids in paths are the caller's: a tenant's caller names ``ord-1`` where the ledger
holds ``acme/ord-1``; a ``/`` inside an id travels as ``%2F``.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, Router, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIFormat
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from .._version import running_version
from ..errors import WorkflowNotFoundError
from ..events import RecordedEvent
from ..store.runtime import InstanceRow
from ..tenants import tenant_prefix
from ..workflow.client import WorkflowClient
from ..workflow.handles import WorkflowDescription
from .keys import ApiKey, ApiKeys
from .principals import Principal, Role
from .problems import MEDIA_TYPE, Problem, field_errors, invalid

__all__ = ["Api", "api_router", "health_routes"]

MAX_PAGE = 500
Status = Literal[
    "running",
    "needs_attention",
    "stuck",
    "completed",
    "failed",
    "compensated",
    "compensation_failed",
    "cancelled",
]
Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=2000)]
ShortText = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
WorkflowId = Annotated[str, msgspec.Meta(min_length=1, max_length=400)]


@dataclass(frozen=True, slots=True)
class Api:
    """What the routes work with, given to them by dependency injection."""

    client: WorkflowClient
    keys: ApiKeys

    def internal(self, who: Principal, workflow_id: str) -> str:
        """The ledger's id of the caller's ``workflow_id`` (a ``/`` sent in a path as
        ``%2F`` arrives as NUL: see ``app.SlashSafe``)."""
        workflow_id = workflow_id.replace("\x00", "/")
        if not workflow_id or "\x00" in workflow_id or len(workflow_id) > 400:
            raise invalid("path.workflow_id", "an id is 1-400 characters without NUL")
        return workflow_id if who.everywhere else tenant_prefix(who.tenant) + workflow_id

    def external(self, who: Principal, workflow_id: str | None) -> str | None:
        """The caller's id of a ledger id (None for one outside the caller's tenant)."""
        if workflow_id is None or who.everywhere:
            return workflow_id
        prefix = tenant_prefix(who.tenant)
        return workflow_id[len(prefix) :] if workflow_id.startswith(prefix) else None

    def mine(self, who: Principal, workflow_id: str) -> str:
        found = self.external(who, workflow_id)
        assert found is not None  # every id the API reads for a tenant is under its prefix
        return found


ApiDep = NamedDependency[Api]
Who = NamedDependency[Principal]
"""The authenticated caller (the guard put it in the request's state)."""


class FieldError(msgspec.Struct):
    field: str
    """Where: ``body.input``, ``query.limit``, ``path.workflow_id``..."""
    message: str


class ProblemDetails(msgspec.Struct):
    """RFC 9457 problem details: every answer other than success."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[FieldError] | None = None
    """For bad input: the fields at fault."""


PROBLEMS = {
    status: ResponseSpec(
        data_container=ProblemDetails,
        media_type=MEDIA_TYPE,
        description=description,
        generate_examples=False,
    )
    for status, description in [
        (400, "Malformed request (e.g. JSON that does not parse)"),
        (401, "No valid credentials"),
        (403, "The caller's role or tenant does not allow this"),
        (404, "No such instance (in the caller's tenant)"),
        (409, "The instance is not in a state that allows this"),
        (413, "Request body over 1 MiB"),
        (422, "Invalid input: the fields at fault are named"),
        (429, "Over the caller's rate limit: see Retry-After"),
        (503, "The store is unavailable: retry (see Retry-After)"),
    ]
}


# -- bodies ---------------------------------------------------------------------------


class StartWorkflow(msgspec.Struct, forbid_unknown_fields=True):
    workflow: ShortText
    """The workflow's name (its latest version starts)."""
    input: Any = None
    id: WorkflowId | None = None
    """Starting is idempotent on the id: the same workflow and input return it."""
    reason: Reason | None = None


class SendSignal(msgspec.Struct, forbid_unknown_fields=True):
    payload: Any = None
    """Checked against the type the instance waits for before anything is recorded."""
    id: ShortText | None = None
    """An idempotency key: the same signal sent again with it is recorded once."""
    reason: Reason | None = None


class Act(msgspec.Struct, forbid_unknown_fields=True):
    """An operator action: why (recorded with who), and which step when several wait."""

    reason: Reason
    seq: Annotated[int, msgspec.Meta(ge=1, le=2**31)] | None = None


class Skip(msgspec.Struct, forbid_unknown_fields=True):
    reason: Reason
    result: Any = None
    """Recorded as the step's result; it must fit the step's return type."""
    seq: Annotated[int, msgspec.Meta(ge=1, le=2**31)] | None = None


class WithReason(msgspec.Struct, forbid_unknown_fields=True):
    reason: Reason


class CreateKey(msgspec.Struct, forbid_unknown_fields=True):
    name: ShortText
    role: Literal["viewer", "operator", "admin"]
    tenant: ShortText | None = None
    """The key's tenant; by default the caller's."""


# -- answers --------------------------------------------------------------------------


class WorkflowSummary(msgspec.Struct):
    id: str
    name: str
    version: int
    status: str
    parent_id: str | None
    created_at: datetime
    updated_at: datetime


class WorkflowPage(msgspec.Struct):
    items: list[WorkflowSummary]
    next: str | None
    """Pass as ``after`` for the next page; null on the last."""


class SignalWaitOut(msgspec.Struct):
    name: str
    schema: dict[str, Any] | None
    deadline: datetime | None


class WorkflowDetail(msgspec.Struct):
    id: str
    name: str
    version: int
    status: str
    parent_id: str | None
    created_at: datetime
    updated_at: datetime
    events: int
    waiting_for: str | None
    waiting_signals: list[SignalWaitOut]
    unconsumed_signals: list[str]
    result: Any = None
    error: str | None = None


class EventOut(msgspec.Struct):
    version: int
    position: int
    id: str
    type: str
    data: Any
    metadata: dict[str, Any]
    recorded_at: datetime


class HistoryPage(msgspec.Struct):
    items: list[EventOut]
    next: int | None
    """Pass as ``after`` for the next page; null on the last."""


class Started(msgspec.Struct):
    id: str
    name: str
    version: int
    status: str


class Accepted(msgspec.Struct):
    id: str
    action: str
    seq: int | None = None


class QueryOut(msgspec.Struct):
    id: str
    state: Any


class KeyOut(msgspec.Struct):
    key_id: str
    name: str
    role: str
    tenant: str
    created_by: str
    created_at: datetime
    revoked: bool
    revoked_by: str | None = None
    revoked_reason: str | None = None


class KeyCreatedOut(msgspec.Struct):
    key: KeyOut
    secret: str
    """The whole key, shown this once: send it as ``Authorization: Bearer <secret>``."""


class Health(msgspec.Struct):
    status: str
    version: str


# -- routes ---------------------------------------------------------------------------


def _principal(request: Request[Any, Any, State]) -> Principal:
    found: Principal = request.state.principal
    return found


def _summary(api: ApiDep, who: Who, row: InstanceRow) -> WorkflowSummary:
    return WorkflowSummary(
        id=api.mine(who, row.workflow_id),
        name=row.name,
        version=row.version,
        status=row.status,
        parent_id=api.external(who, row.parent_id),
        created_at=_moment(row.created_at_us),
        updated_at=_moment(row.updated_at_us),
    )


def _moment(us: int) -> datetime:
    from ..hashing import from_micros

    return from_micros(us)


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,6})?([Zz]|[+-]\d{2}:\d{2})")


def _moment_in(value: str | None, field: str) -> datetime | None:
    """An RFC 3339 time with its offset (what ``format: date-time`` means)."""
    if value is None:
        return None
    if not _RFC3339.fullmatch(value):
        raise invalid(field, "expected an RFC 3339 time with offset, e.g. 2026-12-01T10:00:00Z")
    try:
        return datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError as exc:
        raise invalid(field, str(exc)) from None


@get("/workflows", opt={"role": Role.VIEWER}, responses=PROBLEMS, summary="List workflow instances")
async def list_workflows(
    api: ApiDep,
    who: Who,
    status: FromQuery[Status | None] = None,
    name: Annotated[str | None, QueryParameter(max_length=200)] = None,
    text: Annotated[
        str | None,
        QueryParameter(max_length=200, description="A substring of the id or the name"),
    ] = None,
    created_from: Annotated[
        str | None,
        QueryParameter(
            format=OpenAPIFormat.DATE_TIME,
            max_length=64,
            description="Created at or after (RFC 3339, with offset)",
        ),
    ] = None,
    created_before: Annotated[
        str | None,
        QueryParameter(
            format=OpenAPIFormat.DATE_TIME,
            max_length=64,
            description="Created before (RFC 3339, with offset)",
        ),
    ] = None,
    order: FromQuery[Literal["newest", "id"]] = "newest",
    after: Annotated[
        str | None, QueryParameter(max_length=400, description="The last id of the page before")
    ] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 50,
) -> WorkflowPage:
    for field, value in (("name", name), ("text", text), ("after", after)):
        if value is not None and "\x00" in value:
            raise invalid(f"query.{field}", "NUL is not allowed")
    rows = await api.client.list_workflows(
        status=status,
        name=name,
        text=text,
        id_prefix=None if who.everywhere else tenant_prefix(who.tenant),
        created_from=_moment_in(created_from, "query.created_from"),
        created_before=_moment_in(created_before, "query.created_before"),
        newest_first=order == "newest",
        after=None if after is None else api.internal(who, after),
        limit=limit,
    )
    items = [_summary(api, who, row) for row in rows]
    return WorkflowPage(items, items[-1].id if len(items) == limit else None)


@post(
    "/workflows",
    opt={"role": Role.OPERATOR},
    responses=PROBLEMS,
    summary="Start a workflow instance",
)
async def start_workflow(api: ApiDep, who: Who, data: JSONBody[StartWorkflow]) -> Started:
    if data.id is not None and "\x00" in data.id:
        raise invalid("body.id", "NUL is not allowed")
    with field_errors("body.workflow"):
        definition = api.client._definition(data.workflow)
    with field_errors("body.input"):
        handle = await api.client.start(
            definition,
            data.input,
            id=data.id,
            tenant=None if who.everywhere else who.tenant,
            actor=who.subject,
            reason=data.reason,
        )
    row = await api.client.store.get_instance(handle.id)
    status = row.status if row is not None else "running"
    return Started(api.mine(who, handle.id), definition.name, definition.version, status)


async def _row(api: Api, who: Principal, workflow_id: str) -> tuple[str, InstanceRow]:
    internal = api.internal(who, workflow_id)
    row = await api.client.store.get_instance(internal)
    if row is None:
        raise WorkflowNotFoundError(api.mine(who, internal))
    return internal, row


@get(
    "/workflows/{workflow_id:str}",
    opt={"role": Role.VIEWER},
    responses=PROBLEMS,
    summary="Describe an instance",
)
async def describe_workflow(api: ApiDep, who: Who, workflow_id: FromPath[str]) -> WorkflowDetail:
    internal, _ = await _row(api, who, workflow_id)
    workflow_id = api.mine(who, internal)
    described: WorkflowDescription = await api.client.describe(internal)
    return WorkflowDetail(
        id=workflow_id,
        name=described.name,
        version=described.version,
        status=described.status,
        parent_id=api.external(who, described.parent_id),
        created_at=described.created_at,
        updated_at=described.updated_at,
        events=described.events,
        waiting_for=described.waiting_for,
        waiting_signals=[
            SignalWaitOut(w.name, w.schema, w.deadline) for w in described.waiting_signals
        ],
        unconsumed_signals=list(described.unconsumed_signals),
        result=described.result,
        error=described.error,
    )


def _event(event: RecordedEvent) -> EventOut:
    return EventOut(
        version=event.version,
        position=event.position,
        id=str(event.id),
        type=event.type,
        data=msgspec.to_builtins(event.data),
        metadata=msgspec.to_builtins(event.metadata),
        recorded_at=event.recorded_at,
    )


@get(
    "/workflows/{workflow_id:str}/history",
    opt={"role": Role.VIEWER},
    responses=PROBLEMS,
    summary="An instance's events, oldest first",
)
async def workflow_history(
    api: ApiDep,
    who: Who,
    workflow_id: FromPath[str],
    after: Annotated[
        int, QueryParameter(ge=0, le=2**62, description="The last version of the page before")
    ] = 0,
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 100,
) -> HistoryPage:
    internal, _ = await _row(api, who, workflow_id)
    workflow_id = api.mine(who, internal)
    events = await api.client.store.read_stream(
        api.client.stream_id(internal), from_version=after + 1, limit=limit
    )
    items = [_event(e) for e in events]
    return HistoryPage(items, items[-1].version if len(items) == limit else None)


@get(
    "/workflows/{workflow_id:str}/query",
    opt={"role": Role.VIEWER},
    responses=PROBLEMS,
    summary="The state the workflow last exposed",
)
async def query_workflow(api: ApiDep, who: Who, workflow_id: FromPath[str]) -> QueryOut:
    internal, _ = await _row(api, who, workflow_id)
    workflow_id = api.mine(who, internal)
    state = await api.client.query(internal)
    return QueryOut(workflow_id, msgspec.to_builtins(state))


@post(
    "/workflows/{workflow_id:str}/signals/{signal:str}",
    opt={"role": Role.OPERATOR},
    responses=PROBLEMS,
    status_code=202,
    summary="Send a signal",
)
async def send_signal(
    api: ApiDep,
    who: Who,
    workflow_id: FromPath[str],
    signal: FromPath[str],
    data: JSONBody[SendSignal],
) -> Accepted:
    if not signal or len(signal) > 200 or "\x00" in signal:
        raise invalid("path.signal", "a signal name is 1-200 characters without NUL")
    internal, _ = await _row(api, who, workflow_id)
    workflow_id = api.mine(who, internal)
    with field_errors("body.payload"):
        await api.client.signal(
            internal, signal, data.payload, id=data.id, actor=who.subject, reason=data.reason
        )
    return Accepted(workflow_id, "signal")


@post(
    "/workflows/{workflow_id:str}/cancel",
    opt={"role": Role.OPERATOR},
    responses=PROBLEMS,
    status_code=202,
    summary="Cancel an instance (its compensations run)",
)
async def cancel_workflow(
    api: ApiDep, who: Who, workflow_id: FromPath[str], data: JSONBody[WithReason]
) -> Accepted:
    internal, _ = await _row(api, who, workflow_id)
    workflow_id = api.mine(who, internal)
    await api.client.cancel(internal, data.reason, actor=who.subject)
    return Accepted(workflow_id, "cancel")


@post(
    "/workflows/{workflow_id:str}/retry",
    opt={"role": Role.OPERATOR},
    responses=PROBLEMS,
    status_code=200,
    summary="Try a parked step again",
)
async def retry_step(
    api: ApiDep, who: Who, workflow_id: FromPath[str], data: JSONBody[Act]
) -> Accepted:
    internal, _ = await _row(api, who, workflow_id)
    workflow_id = api.mine(who, internal)
    with field_errors("body.reason"):
        seq = await api.client.retry_step(
            internal, reason=data.reason, actor=who.subject, seq=data.seq
        )
    return Accepted(workflow_id, "retry", seq)


@post(
    "/workflows/{workflow_id:str}/skip",
    opt={"role": Role.OPERATOR},
    responses=PROBLEMS,
    status_code=200,
    summary="Give a parked step a result",
)
async def skip_step(
    api: ApiDep, who: Who, workflow_id: FromPath[str], data: JSONBody[Skip]
) -> Accepted:
    internal, _ = await _row(api, who, workflow_id)
    workflow_id = api.mine(who, internal)
    with field_errors("body.result"):
        seq = await api.client.skip_step(
            internal, data.result, reason=data.reason, actor=who.subject, seq=data.seq
        )
    return Accepted(workflow_id, "skip", seq)


@post(
    "/workflows/{workflow_id:str}/compensate",
    opt={"role": Role.OPERATOR},
    responses=PROBLEMS,
    status_code=200,
    summary="Give a parked step up: the workflow compensates",
)
async def compensate_step(
    api: ApiDep, who: Who, workflow_id: FromPath[str], data: JSONBody[Act]
) -> Accepted:
    internal, _ = await _row(api, who, workflow_id)
    workflow_id = api.mine(who, internal)
    with field_errors("body.reason"):
        seq = await api.client.compensate(
            internal, reason=data.reason, actor=who.subject, seq=data.seq
        )
    return Accepted(workflow_id, "compensate", seq)


@post(
    "/workflows/{workflow_id:str}/resume",
    opt={"role": Role.OPERATOR},
    responses=PROBLEMS,
    status_code=200,
    summary="Take a stuck instance up again",
)
async def resume_workflow(
    api: ApiDep, who: Who, workflow_id: FromPath[str], data: JSONBody[WithReason]
) -> Accepted:
    internal, _ = await _row(api, who, workflow_id)
    workflow_id = api.mine(who, internal)
    with field_errors("body.reason"):
        await api.client.resume(internal, reason=data.reason, actor=who.subject)
    return Accepted(workflow_id, "resume")


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


@get(
    "/keys",
    opt={"role": Role.ADMIN},
    responses=PROBLEMS,
    summary="List API keys (never their secrets)",
)
async def list_keys(api: ApiDep, who: Who) -> list[KeyOut]:
    return [_key(k) for k in await api.keys.list(who.tenant)]


@post("/keys", opt={"role": Role.ADMIN}, responses=PROBLEMS, summary="Create an API key")
async def create_key(api: ApiDep, who: Who, data: JSONBody[CreateKey]) -> KeyCreatedOut:
    tenant = data.tenant or who.tenant
    if not who.everywhere and tenant != who.tenant:
        raise Problem(403, "Forbidden", "a tenant's admin creates keys of its own tenant only")
    with field_errors("body.tenant"):
        created = await api.keys.create(data.name, Role.parse(data.role), tenant, by=who.subject)
    return KeyCreatedOut(_key(created.key), created.secret)


@post(
    "/keys/{key_id:str}/revoke",
    opt={"role": Role.ADMIN},
    responses=PROBLEMS,
    status_code=200,
    summary="Revoke an API key",
)
async def revoke_key(
    api: ApiDep, who: Who, key_id: FromPath[str], data: JSONBody[WithReason]
) -> KeyOut:
    try:
        key = await api.keys.revoke(key_id, by=who.subject, reason=data.reason, tenant=who.tenant)
    except KeyError:
        raise Problem(404, "Key not found", f"no API key {key_id!r}") from None
    return _key(key)


def api_router(api: Api, guards: list[Any]) -> Router:
    """``/api/v1``: every route behind ``guards`` (authentication, role, rate)."""
    return Router(
        "/api/v1",
        route_handlers=[
            list_workflows,
            start_workflow,
            describe_workflow,
            workflow_history,
            query_workflow,
            send_signal,
            cancel_workflow,
            retry_step,
            skip_step,
            compensate_step,
            resume_workflow,
            list_keys,
            create_key,
            revoke_key,
        ],
        guards=guards,
        dependencies={
            "api": Provide(lambda: api, use_cache=True, sync_to_thread=False),
            "who": Provide(_principal, sync_to_thread=False),
        },
        security=[{"bearer": []}],
    )


def health_routes(api: Api) -> list[Any]:
    @get("/health", summary="The server is up", tags=["health"])
    async def health() -> Health:
        return Health("ok", running_version())

    @get(
        "/ready",
        summary="The server can reach its store",
        tags=["health"],
        responses={503: PROBLEMS[503]},
    )
    async def ready() -> Health:
        try:
            async with asyncio.timeout(2):
                await api.client.store.database_now_us()
        except TimeoutError:
            raise Problem(
                503,
                "Store unavailable",
                "the store did not answer within 2 s",
                headers={"Retry-After": "1"},
            ) from None
        return Health("ready", running_version())

    return [health, ready]
