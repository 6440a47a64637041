"""A deadline on every HTTP request: an answer within ``seconds``, even when the
store does not answer at all.

A PostgreSQL server that froze (a stopped process, a VM pause, a storage stall)
keeps its connections open and its kernel acknowledging them, so no socket timeout
ends a query sent to it: without a deadline every request waited for as long as the
freeze lasted, and a client's or proxy's own timeout cut it without a word. Past
the deadline the caller gets 503 with ``Retry-After``. The request's work is
cancelled in the background and not awaited: cancelling a query on such a
connection sends the server a cancel request, which waits out its own connect
timeout.

What a request had asked for may still be done after its 503 (a start whose event
commits once the server wakes): the answer says so, and a start or signal sent
again with the same id does it at most once.
"""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Litestar
from litestar.enums import ScopeType
from litestar.types import Message, Receive, Scope, Send

from .asgi import SlashSafe, respond_problem
from .fast import FastStart

__all__ = ["DEFAULT_REQUEST_TIMEOUT", "Deadline"]

DEFAULT_REQUEST_TIMEOUT = 30.0
"""Seconds a request may take before its caller hears 503 (``--request-timeout``)."""

_given_up: set[asyncio.Future[Any]] = set()
"""Requests answered 503, still ending (kept so they are not collected)."""


class Deadline:
    """Answers 503 for an HTTP request whose response has not started within
    ``seconds``; one that has started (its status is sent) goes on to its end."""

    def __init__(self, app: FastStart | SlashSafe, seconds: float | None) -> None:
        self.app = app
        self.seconds = seconds

    @property
    def litestar(self) -> Litestar:
        return self.app.litestar

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or not self.seconds:
            await self.app(scope, receive, send)
            return
        state = _Exchange(send)
        work = asyncio.ensure_future(self.app(scope, receive, state.send))
        done, _ = await asyncio.wait({work}, timeout=self.seconds)
        if done or state.started:
            await work  # finished, or streaming its body: its own end (and errors)
            return
        state.given_up = True
        work.cancel()
        _given_up.add(work)
        work.add_done_callback(_forget)
        detail = (
            f"the request did not finish within {self.seconds:g} s (the store did "
            "not answer in time); what it asked for may still be done: send it again "
            "with the same id to be sure, at most once"
        )
        await respond_problem(send, 503, "Request timed out", detail, {"Retry-After": "5"})


class _Exchange:
    """The ASGI ``send`` a request's work uses: notes when its response starts, and
    drops what it sends after the deadline answered for it."""

    __slots__ = ("_send", "given_up", "started")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.given_up = False

    async def send(self, message: Message) -> None:
        if self.given_up:
            return
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


def _forget(work: asyncio.Future[Any]) -> None:
    _given_up.discard(work)
    if not work.cancelled():
        work.exception()  # retrieved: a late failure is not "never retrieved"
