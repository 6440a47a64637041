"""Every HTTP request is answered within the server's deadline, even by a store that
answers nothing: a PostgreSQL server that froze keeps its connections open (its
kernel acknowledges them), so no socket timeout ends a query sent to it, and every
request waited for as long as the freeze lasted."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from ledgerflow.server import ServerSettings
from ledgerflow.workflow.client import WorkflowClient

from ._api_app import serve
from .conftest import pg_url

PROBLEM = "application/problem+json"


def timed_out(answer: Any, within: float, began: float) -> dict[str, Any]:
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"].startswith(PROBLEM)
    assert answer.headers["retry-after"] == "5"
    assert time.monotonic() - began < within
    body: dict[str, Any] = answer.json()
    assert body["title"] == "Request timed out"
    assert "same id" in body["detail"]
    return body


def test_a_request_the_store_never_answers_is_503_at_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The work of the request is cancelled and not awaited (a cancel on a frozen
    connection waits out a connect timeout of its own)."""
    cleaned_up = threading.Event()

    async def frozen(self: WorkflowClient, *args: Any, **kwargs: Any) -> Any:
        try:
            await asyncio.sleep(600)
        except asyncio.CancelledError:
            await asyncio.sleep(3)  # a cancel request that takes its time
            cleaned_up.set()
            raise

    with serve(f"sqlite:///{tmp_path / 'd.db'}", ServerSettings(request_timeout=0.5)) as api:
        started = api.post(
            "/api/v1/workflows", json={"workflow": "approval", "input": "o-1", "id": "o-1"}
        )
        assert started.status_code == 201, started.text
        monkeypatch.setattr(WorkflowClient, "describe", frozen)
        began = time.monotonic()
        timed_out(api.get("/api/v1/workflows/o-1"), 2.5, began)
        assert not cleaned_up.is_set()  # answered without waiting for the cancel
        monkeypatch.undo()
        # Other requests, and the same one once the store answers, are served as ever.
        assert api.get("/api/v1/workflows/o-1").status_code == 200
        assert api.get("/health").status_code == 200


def test_a_server_without_a_deadline_waits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    answered = WorkflowClient.describe

    async def slow(self: WorkflowClient, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(1.0)
        return await answered(self, *args, **kwargs)

    with serve(f"sqlite:///{tmp_path / 'd.db'}", ServerSettings(request_timeout=None)) as api:
        started = api.post(
            "/api/v1/workflows", json={"workflow": "approval", "input": "o-1", "id": "o-1"}
        )
        assert started.status_code == 201, started.text
        monkeypatch.setattr(WorkflowClient, "describe", slow)
        began = time.monotonic()
        answer = api.get("/api/v1/workflows/o-1")
        assert answer.status_code == 200, answer.text  # however late
        assert time.monotonic() - began >= 1.0


class FreezingProxy:
    """Forwards TCP connections to a server until frozen; frozen, it holds every
    connection open and passes nothing either way, as a stopped server's kernel
    does (it acknowledges what is sent and answers keepalive probes)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                self.flowing.wait()
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.closed = True
        self.flowing.set()
        self.listener.close()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()


@pytest.fixture
def frozen_pg(pg_schema: str) -> Iterator[tuple[str, FreezingProxy]]:
    url = urlsplit(pg_url(pg_schema))
    proxy = FreezingProxy(url.hostname or "127.0.0.1", url.port or 5432)
    try:
        netloc = f"{url.username or 'postgres'}@127.0.0.1:{proxy.port}"
        yield url._replace(netloc=netloc).geturl(), proxy
    finally:
        proxy.close()


def test_requests_to_a_frozen_postgresql_are_answered_503_and_served_after(
    frozen_pg: tuple[str, FreezingProxy],
) -> None:
    url, proxy = frozen_pg
    with serve(url, ServerSettings(request_timeout=1.0)) as api:
        started = api.post(
            "/api/v1/workflows", json={"workflow": "approval", "input": "o-1", "id": "o-1"}
        )
        assert started.status_code == 201, started.text
        time.sleep(1.2)  # keys and sessions read since: the next request reads the store
        proxy.flowing.clear()
        try:
            began = time.monotonic()
            timed_out(api.get("/api/v1/workflows/o-1/history"), 4.0, began)
            began = time.monotonic()
            timed_out(
                api.post(
                    "/api/v1/workflows", json={"workflow": "approval", "input": "o-2", "id": "o-2"}
                ),
                4.0,
                began,
            )
        finally:
            proxy.flowing.set()
        # The database is back: the same requests are served, the start at most once.
        api.until("/api/v1/workflows/o-1/history", lambda b: bool(b["items"]))
        again = api.post(
            "/api/v1/workflows", json={"workflow": "approval", "input": "o-2", "id": "o-2"}
        )
        assert again.status_code in (200, 201), again.text
        listed = api.get("/api/v1/workflows").json()["items"]
        assert sorted(i["id"] for i in listed) == ["o-1", "o-2"]
