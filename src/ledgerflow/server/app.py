"""The ASGI application: the API under ``/api/v1``, health, the OpenAPI document at
``/openapi.json``; authentication, roles and rate limits in one guard."""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from litestar import Litestar, Request, get
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.enums import ScopeType
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import ASGIMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.types import (
    ASGIApp,
    Receive,
    Scope,
    Send,
)
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .._version import running_version
from ..gauges import StoreGauges
from ..workflow.client import WorkflowClient
from .api import api_router, health_routes
from .asgi import SlashSafe
from .deadline import DEFAULT_REQUEST_TIMEOUT, Deadline
from .fast import FastStart
from .keys import ApiKeys
from .limits import RateLimiter, too_many
from .principals import Principal, Role
from .problems import Problem, problem_response
from .schemas import strict_bodies
from .service import Service
from .sessions import Sessions
from .tokens import TokenError, TokenVerifier
from .ui import Ui, template_config

__all__ = ["ServerSettings", "create_app"]

MAX_BODY = 1 << 20
"""Largest request body accepted (1 MiB): a workflow's input or a signal's payload
is recorded in one event, whose size the store limits anyway."""


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """How the server authenticates and limits callers."""

    tokens: TokenVerifier | None = None
    """Verifies OIDC/JWT bearer tokens; None: API keys only."""
    rate: float = 50.0
    """Requests a second each principal may make on average..."""
    burst: int = 100
    """...and at once."""
    fast_start: bool = True
    """Answer plain ``POST /api/v1/workflows`` requests without the framework's
    per-request machinery (``fast.FastStart``); off only to compare the two."""
    gauges_every: float | None = 15.0
    """Seconds between reads of the store's gauges served at ``/metrics`` (queue
    depth, breakers, lag: ``ledgerflow.gauges``); None: not read."""
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT
    """Seconds a request may take before its caller hears 503 (a store that froze
    answers nothing, and no socket timeout notices: ``deadline.Deadline``); None:
    no deadline."""


def create_app(client: WorkflowClient, settings: ServerSettings | None = None) -> Deadline:
    """The server's ASGI application over ``client`` (its store and registered
    workflows). The client is opened and closed with the application."""
    settings = settings or ServerSettings()
    keys = ApiKeys(client.store)
    service = Service(client, keys)
    limiter = RateLimiter(settings.rate, settings.burst)

    async def authenticate(connection: ASGIConnection[Any, Any, Any, Any]) -> None:
        principal = await _principal(connection, keys, settings.tokens)
        wait = limiter.take(principal.subject)
        if wait > 0:
            raise too_many(wait, f"over {settings.rate:g} requests a second: retry in {wait:.2f} s")
        # The framework's own OPTIONS answer (the methods a route takes) is no
        # route of ours and has no role: any caller may ask it.
        default = Role.VIEWER if connection.scope.get("method") == "OPTIONS" else Role.ADMIN
        needed: Role = connection.route_handler.opt.get("role", default)
        if not principal.may(needed):
            raise Problem(
                403,
                "Forbidden",
                f"this needs the {needed.label} role; the caller has {principal.role.label}",
            )
        connection.state.principal = principal
        unknown = sorted(set(connection.query_params) - _query_names(connection.route_handler))
        if unknown:
            # A mistyped filter must not widen a listing to everything silently.
            raise Problem(
                422,
                "Invalid input",
                f"query.{unknown[0]}: not a parameter of this route",
                errors=[
                    {"field": f"query.{name}", "message": "not a parameter of this route"}
                    for name in unknown
                ],
            )

    gauges = (
        None
        if settings.gauges_every is None
        else StoreGauges(client.store, every=settings.gauges_every)
    )

    async def opening() -> None:
        await client.open()
        if gauges is not None:
            gauges.start()

    async def closing() -> None:
        if gauges is not None:
            await gauges.stop()
        await client.close()

    @get("/metrics", include_in_schema=False, media_type=CONTENT_TYPE_LATEST)
    async def metrics() -> bytes:
        """Prometheus metrics of this process (the engine's, the store's, and the
        application's own in the default registry)."""
        return generate_latest()

    @get("/openapi.json", include_in_schema=False, media_type="application/json")
    async def openapi(request: Request[Any, Any, Any]) -> dict[str, Any]:
        schema: dict[str, Any] = strict_bodies(request.app.openapi_schema).to_schema()
        return schema

    app = Litestar(
        route_handlers=[
            api_router(Gate(authenticate)),
            openapi,
            metrics,
            *health_routes(service),
            *Ui(service, limiter, Sessions(client.store, keys)).routes(),
        ],
        template_config=template_config(),
        state=State({"service": service}),
        exception_handlers={Exception: problem_response},
        request_max_body_size=MAX_BODY,
        # The process's logging is ledgerflow's (logs.configure, as every command's):
        # Litestar's default config would replace the root handler with its own.
        logging_config=None,
        on_startup=[opening],
        on_shutdown=[closing],
        openapi_config=OpenAPIConfig(
            title="ledgerflow",
            version=running_version(),
            description="Durable workflows: start, watch and operate them.",
            path="/_openapi",
            render_plugins=[JsonRenderPlugin()],
            components=Components(
                security_schemes={
                    "bearer": SecurityScheme(
                        type="http",
                        scheme="bearer",
                        description="An API key (lfk_...) or an OIDC access token (JWT).",
                    )
                }
            ),
        ),
        debug=False,
    )
    served = SlashSafe(app)
    if not settings.fast_start:
        return Deadline(served, settings.request_timeout)
    return Deadline(FastStart(served, service, keys, limiter, MAX_BODY), settings.request_timeout)


async def _principal(
    connection: ASGIConnection[Any, Any, Any, Any],
    keys: ApiKeys,
    tokens: TokenVerifier | None,
) -> Principal:
    # Raw: the framework's headers join repeated ones into one value; a proxy may
    # have joined them already, with a comma (which no key or token holds).
    sent = [(n, v) for n, v in connection.scope["headers"] if n in _CREDENTIALS]
    for name in {n for n, _ in sent}:
        values = [v for n, v in sent if n == name]
        if len(values) > 1 or b"," in values[0]:
            raise _unauthorized(f"more than one {name.decode()} header: send one")
    header = connection.headers.get("authorization", "")
    scheme, _, credential = header.partition(" ")
    credential = credential.strip()
    if not header:
        credential = connection.headers.get("x-api-key", "").strip()
    elif scheme.lower() != "bearer":
        raise _unauthorized("use Authorization: Bearer <API key or token>")
    if not credential:
        raise _unauthorized("no credentials: send Authorization: Bearer <API key or token>")
    if credential.startswith("lfk_"):
        principal = await keys.authenticate(credential)
        if principal is None:
            raise _unauthorized("the API key is not valid (unknown, revoked or mistyped)")
        return principal
    if tokens is None:
        raise _unauthorized("this server accepts API keys only")
    try:
        return await tokens.verify(credential)
    except TokenError as exc:
        if exc.forbidden:
            raise Problem(403, "Forbidden", exc.reason) from None
        raise _unauthorized(exc.reason) from None


_NOT_QUERY = frozenset({"api", "who", "data", "request"})
_PATH_PARAMETER = re.compile(r"\{(\w+)(?::\w+)?\}")


@functools.cache
def _query_names(handler: BaseRouteHandler) -> frozenset[str]:
    """The query parameters ``handler`` takes: its parameters less the path's, the
    body and what is injected."""
    in_path = {name for path in handler.paths for name in _PATH_PARAMETER.findall(path)}
    return frozenset(handler.parsed_fn_signature.parameters) - _NOT_QUERY - in_path


class Gate(ASGIMiddleware):
    """Runs ``check`` (authentication, role, rate, parameters) before every route of
    the router it is on. A middleware rather than a guard: Litestar copies the route
    handler for each guard call, a tenth of a start's time over HTTP."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, check: Callable[[ASGIConnection[Any, Any, Any, Any]], Awaitable[None]]):
        self.check = check

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        await self.check(ASGIConnection(scope, receive, send))
        await next_app(scope, receive, send)


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "Unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})


_CREDENTIALS = frozenset({b"authorization", b"x-api-key"})
"""Headers that carry credentials: each may come once."""
