"""Starting a workflow over HTTP without the framework's per-request machinery.

``POST /api/v1/workflows`` is the route users call in a loop; Litestar's routing,
middleware stack, kwargs model and response object cost more than the start itself
(ADR 017's figures). ``FastStart`` answers that one route when the request is the
plain, well-formed case: JSON body within the size limit, an API key that may start,
tokens left in its rate bucket, a body that decodes. It calls the same
``Service.start`` and maps its errors with the same ``to_problem``. Anything else
(no or bad credentials, another content type, a query string, a body that does not
decode, an exhausted bucket) goes to the Litestar app unchanged, with the body read
so far handed on, so every refusal is the one the documented route gives.
``tests/test_server_fast.py`` checks both paths answer alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec
from litestar.enums import ScopeType
from litestar.types import Receive, Scope, Send

from .asgi import SlashSafe, respond
from .keys import ApiKeys
from .limits import RateLimiter
from .principals import Principal, Role
from .problems import MEDIA_TYPE, problem_body, to_problem
from .schemas import StartWorkflow
from .service import Service

__all__ = ["START_PATH", "FastStart"]

START_PATH = "/api/v1/workflows"

_decode = msgspec.json.Decoder(StartWorkflow).decode
_encode = msgspec.json.Encoder().encode


class FastStart:
    def __init__(
        self,
        app: SlashSafe,
        service: Service,
        keys: ApiKeys,
        limiter: RateLimiter,
        max_body: int,
    ) -> None:
        self.app = app
        self.litestar = app.litestar
        """The framework's app underneath (its OpenAPI document, its state)."""
        self._service = service
        self._keys = keys
        self._limiter = limiter
        self._max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != ScopeType.HTTP
            or scope["method"] != "POST"
            or scope["path"] != START_PATH
            or scope.get("query_string")
        ):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if (
            headers.get(b"content-type") != b"application/json"
            or _credentials_twice(scope["headers"])
            or sum(name == b"x-correlation-id" for name, _ in scope["headers"]) > 1
        ):
            await self.app(scope, receive, send)  # the route refuses or reads it
            return
        # Who asks, before the body is read: a caller without a valid key had a whole
        # body (1 MiB) read first, from anyone, for its 401.
        try:
            who = await self._principal(headers)
        except Exception as exc:  # noqa: BLE001 - the key's lookup failed (the store): answered
            await self._refuse(send, exc)
            return
        if who is None or not who.may(Role.OPERATOR):
            await self.app(scope, receive, send)  # refused, or a JWT: the framework's path
            return
        body, complete = await self._read(receive)
        if not complete or not await self._start(scope, headers, who, body, send):
            await self.app(scope, _replaying(body, complete, receive), send)

    async def _read(self, receive: Receive) -> tuple[bytes, bool]:
        """The body, and whether it is all there (False: over the limit, or the
        client went away: the framework decides what that is)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks), False
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if size > self._max_body:
                return b"".join(chunks), False
            if not message.get("more_body", False):
                return b"".join(chunks), True

    async def _start(
        self, scope: Scope, headers: dict[bytes, bytes], who: Principal, body: bytes, send: Send
    ) -> bool:
        """Answer the request if it is the plain case; False to hand it on."""
        try:
            data = _decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            return False  # the route says what is wrong with it
        if self._limiter.take(who.subject) > 0:
            return False
        try:
            traceparent = headers.get(b"traceparent")
            correlation = headers.get(b"x-correlation-id")
            started, created = await self._service.start(
                who,
                data,
                None if traceparent is None else traceparent.decode("latin-1"),
                None if correlation is None else correlation.decode("latin-1"),
            )
        except Exception as exc:  # noqa: BLE001 - answered as the route answers it
            await self._refuse(send, exc)
            return True
        await respond(send, 201 if created else 200, _encode(started), "application/json")
        return True

    async def _refuse(self, send: Send, exc: Exception) -> None:
        problem = to_problem(exc)
        await respond(
            send,
            problem.status,
            _encode(problem_body(problem, START_PATH)),
            MEDIA_TYPE,
            problem.headers,
        )

    async def _principal(self, headers: dict[bytes, bytes]) -> Principal | None:
        header = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip().startswith("lfk_"):
            return None  # JWTs, X-API-Key and every refusal: the framework's path
        return await self._keys.authenticate(credential.strip())


def _replaying(body: bytes, complete: bool, receive: Receive) -> Receive:
    """``receive`` that gives the body read so far first, then what is left."""
    given = False

    async def again() -> Any:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": not complete}
        return await receive()

    return again


def _credentials_twice(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether credentials come in more than one header (two ``Authorization``, or
    two ``X-API-Key``): which one counts would depend on who reads them."""
    names = []
    for name, value in headers:
        if name in _CREDENTIALS:
            if b"," in value:  # joined by a proxy
                return True
            names.append(name)
    return len(names) != len(set(names))


_CREDENTIALS = frozenset({b"authorization", b"x-api-key"})
