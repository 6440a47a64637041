"""The HTTP API's request and response bodies, as msgspec structs: Litestar
validates requests against them and the OpenAPI document is generated from them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPI, Schema

from ..workflow.client import MAX_WORKFLOW_ID_LENGTH
from .problems import MEDIA_TYPE

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
TenantName = Annotated[str, msgspec.Meta(pattern=r"^(\*|[a-z0-9][a-z0-9-]{0,62})$")]
"""A tenant's name, or ``*`` for every tenant (``ledgerflow.tenants``)."""
WorkflowId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_WORKFLOW_ID_LENGTH)]
"""A caller's own id: a tenant's caller has ``len(tenant) + 1`` fewer (the ledger's id
is ``<tenant>/<id>``)."""


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
    tenant: TenantName | None = None
    """The key's tenant (``*``: every tenant); by default the caller's."""


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


class WorkflowDetail(WorkflowSummary):
    events: int
    waiting_for: str | None
    waiting_signals: list[SignalWaitOut]
    unconsumed_signals: list[str]
    result: Any = None
    error: str | None = None
    undo_failed: list[str] = msgspec.field(default_factory=list)
    """Compensations that gave up (step, last error), and children whose undo did."""


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


def strict_bodies(openapi: OpenAPI) -> OpenAPI:
    """``openapi`` saying what the server does with a body's unknown fields: it
    refuses them (``forbid_unknown_fields``), so their schemas allow none
    (``additionalProperties: false``); the framework's document left that out, and
    a client built from it sent fields the server answered 422."""
    components = openapi.components
    found = components.schemas if components is not None else None
    for name, schema in (found or {}).items():
        kind = globals().get(name)
        if (
            isinstance(kind, type)
            and issubclass(kind, msgspec.Struct)
            and kind.__struct_config__.forbid_unknown_fields
            and isinstance(schema, Schema)
        ):
            schema.additional_properties = False
    return openapi
