"""The HTTP API's routes under ``/api/v1``: workflows (start, list, describe,
history, query, signal, cancel, operator actions) and API keys; and health. Each
route declares its least role (``opt``) and hands the work to ``Service``.

Ids in paths are the caller's: a tenant's caller names ``ord-1`` where the ledger
holds ``acme/ord-1``; a ``/`` inside an id travels as ``%2F``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any, Literal

from litestar import Request, Response, Router, get, post
from litestar.datastructures import State
from litestar.middleware import ASGIMiddleware
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIFormat
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from .. import tracing
from .._version import running_version
from ..errors import StoreError, StoreReadOnlyError
from .principals import Principal, Role
from .problems import Problem, invalid
from .schemas import (
    MAX_PAGE,
    PROBLEMS,
    Accepted,
    Act,
    CreateKey,
    Health,
    HistoryPage,
    KeyCreatedOut,
    KeyOut,
    QueryOut,
    SendSignal,
    Skip,
    Started,
    StartWorkflow,
    Status,
    WithReason,
    WorkflowDetail,
    WorkflowPage,
)
from .service import Service, parse_moment

log = logging.getLogger("ledgerflow.server")

__all__ = ["api_router", "health_routes"]

Call = Request[Any, Any, State]


def _context(request: Call) -> tuple[Service, Principal]:
    """The service and the authenticated caller (the guard put it in the request's
    state). Read here rather than injected: Litestar resolves several dependencies
    in a task group of their own, which cost a fifth of a start's time over HTTP."""
    service: Service = request.app.state.service
    who: Principal = request.state.principal
    return service, who


Moment = Annotated[
    str | None,
    QueryParameter(
        format=OpenAPIFormat.DATE_TIME, max_length=64, description="RFC 3339, with offset"
    ),
]


@get("/workflows", opt={"role": Role.VIEWER}, responses=PROBLEMS, summary="List workflow instances")
async def list_workflows(
    request: Call,
    status: FromQuery[Status | None] = None,
    name: Annotated[str | None, QueryParameter(min_length=1, max_length=200)] = None,
    text: Annotated[
        str | None,
        QueryParameter(
            min_length=1, max_length=200, description="A substring of the id or the name"
        ),
    ] = None,
    created_from: Moment = None,
    created_before: Moment = None,
    order: FromQuery[Literal["newest", "id"]] = "newest",
    after: Annotated[
        str | None,
        QueryParameter(min_length=1, max_length=400, description="The last id of the page before"),
    ] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 50,
) -> WorkflowPage:
    api, who = _context(request)
    return await api.list_workflows(
        who,
        status=status,
        name=name,
        text=text,
        created_from=parse_moment(created_from, "query.created_from"),
        created_before=parse_moment(created_before, "query.created_before"),
        newest_first=order == "newest",
        after=after,
        limit=limit,
    )


@post(
    "/workflows",
    opt={"role": Role.OPERATOR},
    responses={
        **PROBLEMS,
        200: ResponseSpec(Started, description="Started before, the same way (idempotent)"),
    },
    summary="Start an instance",
    description="201 when this call started it; 200 when an instance with this id was "
    "started before with the same workflow and input; 409 when it holds another start.",
)
async def start_workflow(request: Call, data: JSONBody[StartWorkflow]) -> Response[Started]:
    api, who = _context(request)
    if sum(name == b"x-correlation-id" for name, _ in request.scope["headers"]) > 1:
        # Joined by the framework (the fast path took the last): which one is meant?
        raise invalid("header.x-correlation-id", "send one X-Correlation-Id header")
    started, created = await api.start(
        who,
        data,
        request.headers.get("traceparent"),
        request.headers.get("x-correlation-id"),
    )
    return Response(started, status_code=201 if created else 200)


@get(
    "/workflows/{workflow_id:str}",
    opt={"role": Role.VIEWER},
    responses=PROBLEMS,
    summary="Describe an instance",
)
async def describe_workflow(request: Call, workflow_id: FromPath[str]) -> WorkflowDetail:
    api, who = _context(request)
    return await api.describe(who, workflow_id)


@get(
    "/workflows/{workflow_id:str}/history",
    opt={"role": Role.VIEWER},
    responses=PROBLEMS,
    summary="An instance's events, oldest first",
)
async def workflow_history(
    request: Call,
    workflow_id: FromPath[str],
    after: Annotated[
        int, QueryParameter(ge=0, le=2**62, description="The last version of the page before")
    ] = 0,
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 100,
) -> HistoryPage:
    api, who = _context(request)
    return await api.history(who, workflow_id, after=after, limit=limit)


@get(
    "/workflows/{workflow_id:str}/query",
    opt={"role": Role.VIEWER},
    responses=PROBLEMS,
    summary="The state the workflow last exposed",
)
async def query_workflow(request: Call, workflow_id: FromPath[str]) -> QueryOut:
    api, who = _context(request)
    return await api.query(who, workflow_id)


@post(
    "/workflows/{workflow_id:str}/signals/{signal:str}",
    opt={"role": Role.OPERATOR},
    responses=PROBLEMS,
    status_code=202,
    summary="Send a signal",
)
async def send_signal(
    request: Call,
    workflow_id: FromPath[str],
    signal: FromPath[str],
    data: JSONBody[SendSignal],
) -> Accepted:
    api, who = _context(request)
    # Sent in the caller's trace (its traceparent header), as a start is.
    with tracing.joined(request.headers.get("traceparent")):
        return await api.signal(who, workflow_id, signal, data)


@post(
    "/workflows/{workflow_id:str}/cancel",
    opt={"role": Role.OPERATOR},
    responses=PROBLEMS,
    status_code=202,
    summary="Cancel an instance (its compensations run)",
)
async def cancel_workflow(
    request: Call, workflow_id: FromPath[str], data: JSONBody[WithReason]
) -> Accepted:
    api, who = _context(request)
    return await api.act(who, workflow_id, "cancel", data.reason)


@post(
    "/workflows/{workflow_id:str}/retry",
    opt={"role": Role.OPERATOR},
    responses=PROBLEMS,
    status_code=200,
    summary="Try a parked step again",
)
async def retry_step(request: Call, workflow_id: FromPath[str], data: JSONBody[Act]) -> Accepted:
    api, who = _context(request)
    return await api.act(who, workflow_id, "retry", data.reason, seq=data.seq)


@post(
    "/workflows/{workflow_id:str}/skip",
    opt={"role": Role.OPERATOR},
    responses=PROBLEMS,
    status_code=200,
    summary="Give a parked step a result",
)
async def skip_step(request: Call, workflow_id: FromPath[str], data: JSONBody[Skip]) -> Accepted:
    api, who = _context(request)
    return await api.act(who, workflow_id, "skip", data.reason, seq=data.seq, result=data.result)


@post(
    "/workflows/{workflow_id:str}/compensate",
    opt={"role": Role.OPERATOR},
    responses=PROBLEMS,
    status_code=200,
    summary="Give a parked step up: the workflow compensates",
)
async def compensate_step(
    request: Call, workflow_id: FromPath[str], data: JSONBody[Act]
) -> Accepted:
    api, who = _context(request)
    return await api.act(who, workflow_id, "compensate", data.reason, seq=data.seq)


@post(
    "/workflows/{workflow_id:str}/resume",
    opt={"role": Role.OPERATOR},
    responses=PROBLEMS,
    status_code=200,
    summary="Take a stuck instance up again",
)
async def resume_workflow(
    request: Call, workflow_id: FromPath[str], data: JSONBody[WithReason]
) -> Accepted:
    api, who = _context(request)
    return await api.act(who, workflow_id, "resume", data.reason)


@get("/keys", opt={"role": Role.ADMIN}, responses=PROBLEMS, summary="List API keys (never secrets)")
async def list_keys(request: Call) -> list[KeyOut]:
    api, who = _context(request)
    return await api.list_keys(who)


@post("/keys", opt={"role": Role.ADMIN}, responses=PROBLEMS, summary="Create an API key")
async def create_key(request: Call, data: JSONBody[CreateKey]) -> KeyCreatedOut:
    api, who = _context(request)
    return await api.create_key(who, data)


@post(
    "/keys/{key_id:str}/revoke",
    opt={"role": Role.ADMIN},
    responses=PROBLEMS,
    status_code=200,
    summary="Revoke an API key",
)
async def revoke_key(request: Call, key_id: FromPath[str], data: JSONBody[WithReason]) -> KeyOut:
    api, who = _context(request)
    return await api.revoke_key(who, key_id, data.reason)


def api_router(gate: ASGIMiddleware) -> Router:
    """``/api/v1``: every route behind ``gate`` (authentication, role, rate); the
    app's state holds the ``service``."""
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
        middleware=[gate],
        security=[{"bearer": []}],
    )


_unawaited: set[asyncio.Future[None]] = set()
"""Readiness checks given up on, still ending (kept so they are not collected)."""


def health_routes(service: Service) -> list[Any]:
    @get("/health", summary="The server is up", tags=["health"])
    async def health() -> Health:
        return Health("ok", running_version())

    @get(
        "/ready",
        summary="The server can reach its store, and the store takes writes",
        tags=["health"],
        responses={503: PROBLEMS[503]},
    )
    async def ready() -> Health:
        # Not awaited past the 2 s: a query cancelled on a dead connection sends the
        # server a cancel request, which waits out its own connect timeout (an
        # answer came after 12 s through a network blackhole).
        asked = asyncio.ensure_future(service.client.store.check_ready())
        done, _ = await asyncio.wait({asked}, timeout=2)
        if not done:
            asked.cancel()
            _unawaited.add(asked)
            asked.add_done_callback(_unawaited.discard)
            raise Problem(
                503,
                "Store unavailable",
                "the store did not answer within 2 s",
                headers={"Retry-After": "1"},
            )
        try:
            asked.result()
        except StoreReadOnlyError as exc:
            # Anyone may ask: the detail names no server, user or database (the log
            # does, for the operator).
            log.warning("not ready: %s", exc)
            raise Problem(
                503,
                "Store read-only",
                "the store takes no writes (a standby, or read-only sessions)",
                headers={"Retry-After": "5"},
            ) from None
        except StoreError as exc:
            log.warning("not ready: %s", exc)
            raise Problem(
                503, "Store unavailable", "the store did not answer", headers={"Retry-After": "1"}
            ) from None
        return Health("ready", running_version())

    return [health, ready]
