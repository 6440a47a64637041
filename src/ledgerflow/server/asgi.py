"""Plain ASGI pieces around the framework: the path fix-up every request passes
through, and a response written straight to the server."""

from __future__ import annotations

import re
from typing import Any, cast
from urllib.parse import unquote_to_bytes

import msgspec
from litestar import Litestar
from litestar.enums import ScopeType
from litestar.types import Receive, Scope, Send

from .problems import MEDIA_TYPE

__all__ = ["SlashSafe", "respond", "respond_problem"]

_ENCODED_SLASH = re.compile(rb"%2[fF]")
_STATIC = "/ui/static/"
"""Where the web UI's files are served (``ui.Ui.routes``)."""


class SlashSafe:
    """Lets an id with ``/`` travel in a path as ``%2F``: the router would decode it
    and see another path. The path is decoded here with such slashes turned into
    NUL (which no id holds), and ``Api`` turns them back."""

    def __init__(self, app: Litestar) -> None:
        self.app = app

    @property
    def litestar(self) -> Litestar:
        return self.app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.get("raw_path")
        http = scope["type"] == ScopeType.HTTP
        if http and raw and (b"%00" in raw or "\x00" in scope["path"]):
            await respond_problem(send, 400, "Bad Request", "a path may not hold NUL (%00)")
            return
        if scope["type"] == ScopeType.HTTP and scope["method"] == "HEAD":
            # Every GET route answers HEAD too (RFC 9110 9.3.2; load balancers and
            # uptime probes ask /health so): the same answer without its body.
            scope = cast("Scope", {**scope, "method": "GET"})
            send = _bodiless(send)
        if http and raw and _ENCODED_SLASH.search(raw):
            if scope["path"].startswith(_STATIC):
                # No file's name holds a slash; and the static files' router, which
                # knows nothing of the NUL below, failed on it (500).
                await respond_problem(send, 404, "Not Found", "no such file")
                return
            path = raw.split(b"?", 1)[0]
            parts = [unquote_to_bytes(p) for p in _ENCODED_SLASH.split(path)]
            path_ = b"\x00".join(parts).decode("utf-8", "replace")
            scope = cast("Scope", {**scope, "path": path_})
        await self.app(scope, receive, send)


def _bodiless(send: Send) -> Send:
    async def sending(message: Any) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return sending


async def respond_problem(
    send: Send, status: int, title: str, detail: str, headers: dict[str, str] | None = None
) -> None:
    """A problem (RFC 9457) answered without the framework."""
    body = msgspec.json.encode(
        {"type": "about:blank", "title": title, "status": status, "detail": detail}
    )
    await respond(send, status, body, MEDIA_TYPE, headers)


async def respond(
    send: Send,
    status: int,
    body: bytes,
    media_type: str,
    headers: dict[str, str] | None = None,
) -> None:
    """A whole response: status, content type and length, ``headers``, ``body``."""
    raw: list[tuple[bytes, bytes]] = [
        (b"content-type", media_type.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    raw.extend((k.lower().encode(), v.encode()) for k, v in (headers or {}).items())
    start: Any = {"type": "http.response.start", "status": status, "headers": raw}
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})
