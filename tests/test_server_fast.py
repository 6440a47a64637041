"""``POST /api/v1/workflows`` answered by the fast path and by the framework's route
gives the same answers (status, body, content type) for the plain case and for
every refusal the fast path hands on: the same requests, sent to a server with it
and one without, each on a ledger of its own."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ledgerflow.server import Role, ServerSettings

from ._api_app import Api, serve

START = "/api/v1/workflows"


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Api, Api]]:
    with (
        serve(f"sqlite:///{tmp_path / 'fast.db'}", ServerSettings(rate=1e6, burst=10**6)) as fast,
        serve(
            f"sqlite:///{tmp_path / 'slow.db'}",
            ServerSettings(rate=1e6, burst=10**6, fast_start=False),
        ) as slow,
    ):
        yield fast, slow


def both(pair: tuple[Api, Api], *, same_body: bool = True, **request: Any) -> tuple[Any, Any]:
    answers = []
    for api in pair:
        given = dict(request)
        headers = given.pop("headers", None)
        if headers is None:
            headers = api.auth(given.pop("tenant", None), given.pop("role", None))
        headers = {**headers, **given.pop("more_headers", {})}
        answers.append(api.http.request("POST", given.pop("path", START), headers=headers, **given))
    fast, slow = answers
    assert fast.status_code == slow.status_code, (fast.text, slow.text)
    assert fast.headers.get("content-type") == slow.headers.get("content-type")
    if same_body:
        assert _body(fast) == _body(slow)
    return fast, slow


def _body(answer: Any) -> Any:
    try:
        return answer.json()
    except ValueError:
        return answer.text


def test_the_plain_case_and_what_the_route_refuses_answer_alike(pair: tuple[Api, Api]) -> None:
    order = {"workflow": "approval", "input": "o-1", "id": "f-1"}
    assert both(pair, json=order)[0].status_code == 201
    assert both(pair, json=order)[0].status_code == 200  # the same start again
    assert both(pair, json={**order, "input": "o-2"})[0].status_code == 409
    assert both(pair, json={**order, "workflow": "nope", "id": "f-2"})[0].status_code == 422
    assert both(pair, json={"workflow": "approval", "input": 5, "id": "f-3"})[0].status_code == 422
    assert both(pair, json={**order, "id": "a\x00b"})[0].status_code == 422
    both(pair, json={**order, "unknown": 1})
    both(pair, content=b"{", headers=None)
    both(pair, content=json.dumps(order).encode(), headers={"content-type": "text/plain"})
    both(pair, json={**order, "id": "f-4"}, path=f"{START}?limit=5")
    both(pair, json={**order, "id": "f-5"}, role=Role.VIEWER)
    both(pair, json={**order, "id": "f-6"}, headers={})
    both(pair, json={**order, "id": "f-7"}, headers={"Authorization": "Bearer lfk_nope"})
    both(pair, json={**order, "id": "f-8"}, headers={"Authorization": "Basic abc"})
    both(pair, content=b"[" + b"1," * 600_000 + b"1]", headers=None)  # over 1 MiB
    # Each was a 500 (nested too deep for the decoder: plain text on the fast
    # path; a body under 1 MiB whose event is over it), or a 422 saying "'data'".
    as_json = {"content-type": "application/json"}
    nested = b'{"workflow": "approval", "id": "f-deep", "input": ' + b"[" * 100_000
    deep = both(pair, content=nested, more_headers=as_json)[0]
    assert (deep.status_code, deep.json()["detail"]) == (
        400,
        "the body is nested too deeply to read",
    )
    empty = both(pair, content=b"", more_headers=as_json)[0]
    assert (empty.status_code, empty.json()["detail"]) == (
        400,
        "the body is empty: a JSON object is expected",
    )
    # msgspec calls a string ending in an escaped lone surrogate "truncated".
    for body in (
        b'{"workflow": "approval", "id": "f-sur", "input": "\\ud800"}',
        b'{"workflow": "approval", "id": "f-cut", "input": "o-',
    ):
        lone = both(pair, content=body, more_headers=as_json)[0]
        assert lone.status_code == 400
        assert "lone UTF-16 surrogate" in lone.json()["detail"], lone.json()
    paired = b'{"workflow": "approval", "id": "f-pair", "input": "a\\ud83d\\ude00"}'
    assert both(pair, content=paired, more_headers=as_json)[0].status_code == 201
    big = {"workflow": "approval", "input": "x" * 1_048_400, "id": "f-9"}
    large = both(pair, json=big, more_headers={"x-correlation-id": "c" * 100})[0]
    assert large.status_code == 413
    assert "is 1048644 bytes encoded; the limit is 1048576" in large.json()["detail"]


def test_keys_in_either_header_and_tenants_answer_alike(pair: tuple[Api, Api]) -> None:
    order = {"workflow": "approval", "input": "o-1", "id": "t-1"}
    for api in pair:
        key = api.keys[("acme", Role.OPERATOR)]
        assert api.http.post(START, json=order, headers={"X-API-Key": key}).status_code == 201
    # Another tenant's instance of the same id is another instance.
    answer, _ = both(pair, json=order, tenant="beta")
    assert answer.status_code == 201
    assert answer.json()["id"] == "t-1"


def test_an_exhausted_rate_bucket_answers_alike(tmp_path: Path) -> None:
    settings = {"rate": 0.001, "burst": 2}
    with (
        serve(f"sqlite:///{tmp_path / 'f.db'}", ServerSettings(**settings)) as fast,  # type: ignore[arg-type]
        serve(
            f"sqlite:///{tmp_path / 's.db'}",
            ServerSettings(**settings, fast_start=False),  # type: ignore[arg-type]
        ) as slow,
    ):
        for n in range(4):
            # (the wait it names is to the hundredth of a second: not compared)
            fast_answer, slow_answer = both(
                (fast, slow),
                same_body=n < 2,
                json={"workflow": "approval", "input": "o", "id": f"r-{n}"},
            )
        assert fast_answer.status_code == 429
        assert fast_answer.headers.get("retry-after") == slow_answer.headers.get("retry-after")


def test_a_correlation_id_is_recorded_and_a_bad_one_refused_alike(pair: tuple[Api, Api]) -> None:
    # Too long, a control character, empty, not ASCII (UTF-8 bytes).
    bad_ids = [b"x" * 201, b"tab\there", b"", "h\u00e9llo".encode()]
    for n, bad in enumerate(bad_ids):
        order = {"workflow": "approval", "input": "o-1", "id": f"c-bad-{n}"}
        fast, slow = (
            api.http.post(
                START,
                json=order,
                headers={
                    **{k.encode(): v.encode() for k, v in api.auth().items()},
                    b"X-Correlation-Id": bad,
                },
            )
            for api in pair
        )
        assert fast.status_code == slow.status_code == 422, (bad, fast.text, slow.text)
        assert fast.json() == slow.json()
        assert fast.json()["errors"][0]["field"] == "header.x-correlation-id"
    # Two of them: the framework joined them, the fast path took the last; refused.
    twice = [
        (
            api.http.post(
                START,
                json={"workflow": "approval", "input": "o-1", "id": "c-twice"},
                headers=[
                    *api.auth().items(),
                    ("X-Correlation-Id", "a"),
                    ("X-Correlation-Id", "b"),
                ],
            )
        )
        for api in pair
    ]
    assert [t.status_code for t in twice] == [422, 422], [t.text for t in twice]
    assert twice[0].json() == twice[1].json()
    assert twice[0].json()["errors"][0]["field"] == "header.x-correlation-id"
    for api in pair:
        order = {"workflow": "approval", "input": "o-1", "id": "c-1"}
        answer = api.http.post(
            START, json=order, headers={**api.auth(), "X-Correlation-Id": "cart-42"}
        )
        assert answer.status_code == 201, answer.text
        history = api.get("/api/v1/workflows/c-1/history").json()["items"]
        assert history[0]["metadata"]["correlation_id"] == "cart-42"


def test_a_key_lookup_that_fails_answers_503_on_either_path(
    pair: tuple[Api, Api], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path looked the key up outside its error handling: with the store
    out of reach it answered a plain-text 500 (seen through a network blackhole)."""
    from ledgerflow.errors import StoreUnavailableError
    from ledgerflow.server.keys import ApiKeys

    async def unreachable(self: ApiKeys, secret: str) -> Any:
        raise StoreUnavailableError("postgres", "connect: PoolTimeout")

    monkeypatch.setattr(ApiKeys, "authenticate", unreachable)
    order = {"workflow": "approval", "input": "o-1", "id": "u-1"}
    fast, _ = both(pair, json=order)
    assert fast.status_code == 503
    assert fast.headers["content-type"] == "application/problem+json"
    assert fast.headers["retry-after"] == "1"


def test_a_store_defect_answers_500_with_an_incident_not_503(
    pair: tuple[Api, Api], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A defect inside the store adapter is no outage to wait out: 500 naming an
    incident in the log, without the exception's text, on either path."""
    from ledgerflow.errors import StoreInternalError
    from ledgerflow.server.keys import ApiKeys

    async def broken(self: ApiKeys, secret: str) -> Any:
        raise StoreInternalError("sqlite", KeyError("secret head"))

    monkeypatch.setattr(ApiKeys, "authenticate", broken)
    order = {"workflow": "approval", "input": "o-1", "id": "u-2"}
    for answer in both(pair, same_body=False, json=order):
        assert answer.status_code == 500, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        assert "incident" in answer.json()["detail"]
        assert "secret head" not in answer.text


def test_credentials_sent_twice_are_refused_on_either_path(pair: tuple[Api, Api]) -> None:
    """Two Authorization headers: the fast path took the last, the route the first,
    so the same request was a viewer's or an operator's by its content type."""
    fast, _ = pair
    for api in pair:
        viewer = api.auth(None, Role.VIEWER)["Authorization"]
        operator = api.auth(None, Role.OPERATOR)["Authorization"]
        for kind in ("application/json", "application/json; charset=utf-8"):
            answer = api.http.post(
                START,
                content=b'{"workflow": "approval", "input": "o-1", "id": "twice"}',
                headers=[
                    ("content-type", kind),
                    ("authorization", viewer),
                    ("authorization", operator),
                ],
            )
            assert answer.status_code == 401, (api is fast, kind, answer.text)
            assert "more than one authorization header" in answer.json()["detail"]


def test_a_read_only_store_answers_503_not_500(
    pair: tuple[Api, Api], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database switched to read-only (a failover under way) answered 500 with a
    traceback in the log per request: it is an outage to wait out."""
    from ledgerflow.errors import StoreReadOnlyError
    from ledgerflow.server.keys import ApiKeys

    async def read_only(self: ApiKeys, secret: str) -> Any:
        raise StoreReadOnlyError("the ledger", "ReadOnlySqlTransaction (injected)")

    monkeypatch.setattr(ApiKeys, "authenticate", read_only)
    order = {"workflow": "approval", "input": "o-1", "id": "ro-1"}
    for answer in both(pair, json=order):
        assert answer.status_code == 503, answer.text
        assert answer.headers["retry-after"] == "1"
        assert answer.json()["title"] == "Store read-only"


def test_a_start_without_a_valid_key_is_refused_before_its_body_is_read(tmp_path: Path) -> None:
    """The fast path read the whole body (up to 1 MiB), from anyone, before it
    looked at the credentials: 200 uploads with no key held 190 MB of the server."""
    import asyncio

    import ledgerflow as lf
    from ledgerflow.server import create_app

    from ._api_app import WORKFLOWS

    async def run() -> list[dict[str, Any]]:
        engine = lf.Engine(f"sqlite:///{tmp_path / 'f.db'}", workflows=WORKFLOWS)
        app = create_app(engine)
        sent: list[dict[str, Any]] = []
        read = 0

        async def receive() -> dict[str, Any]:
            nonlocal read
            read += 1
            await asyncio.sleep(3600)  # a client uploading very slowly
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async with engine:
            for credential in (None, "Bearer lfk_not-a-key", "Basic dXNlcjpwdw=="):
                headers = [(b"content-type", b"application/json"), (b"content-length", b"1000000")]
                if credential is not None:
                    headers.append((b"authorization", credential.encode()))
                scope = {
                    "type": "http",
                    "asgi": {"version": "3.0"},
                    "http_version": "1.1",
                    "method": "POST",
                    "scheme": "http",
                    "path": "/api/v1/workflows",
                    "raw_path": b"/api/v1/workflows",
                    "query_string": b"",
                    "root_path": "",
                    "headers": headers,
                    "client": ("127.0.0.1", 5000),
                    "server": ("127.0.0.1", 8000),
                    "state": {},
                }
                await asyncio.wait_for(app(scope, receive, send), 5)  # type: ignore[arg-type]
            assert read == 0
        return [m for m in sent if m["type"] == "http.response.start"]

    answers = asyncio.run(run())
    assert [a["status"] for a in answers] == [401, 401, 401]
