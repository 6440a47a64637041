"""The web UI without a browser: sessions, forms made from a wait's type and read
back, operator actions, roles and tenants, escaping. (The browser test walks the
order example's approval in Chromium.)"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import msgspec
import pytest

import ledgerflow as lf
from ledgerflow.server import Role
from ledgerflow.server.forms import signal_form

from ._api_app import Api, serve


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    with serve(f"sqlite:///{tmp_path / 'ui.db'}") as running:
        yield running


def sign_in(api: Api, tenant: str = "acme", role: Role = Role.OPERATOR) -> str:
    answer = api.http.post(
        "/ui/sign-in", data={"key": api.keys[(tenant, role)]}, follow_redirects=False
    )
    assert answer.status_code == 303, answer.text
    assert "HttpOnly" in answer.headers["set-cookie"]
    assert "SameSite=strict" in answer.headers["set-cookie"]
    page = api.http.get("/ui/workflows").text
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert found is not None
    return found.group(1)


def start(api: Api, workflow_id: str, workflow: str = "approval", tenant: str = "acme") -> None:
    answer = api.post(
        "/api/v1/workflows",
        json={"workflow": workflow, "input": workflow_id, "id": workflow_id},
        tenant=tenant,
    )
    assert answer.status_code == 201, answer.text


def test_pages_need_a_session(api: Api) -> None:
    for path in ("/ui/workflows", "/ui/workflows/x", "/"):
        answer = api.http.get(path, follow_redirects=True)
        assert "Sign in" in answer.text, path
    refused = api.http.post("/ui/sign-in", data={"key": "lfk_nope"})
    assert refused.status_code == 401
    assert "not valid" in refused.text


def test_pages_may_not_be_framed_or_kept_in_a_cache(api: Api) -> None:
    """The UI sent no anti-framing or caching headers: any page could be framed by
    another site, and pages showing payloads could be kept by caches."""
    csrf = sign_in(api)
    start(api, "o-1")
    pages = [
        api.http.get("/ui/sign-in"),
        api.http.get("/ui/workflows"),
        api.http.get("/ui/workflows/o-1"),
        api.http.get("/ui/workflows/nobody"),
        api.http.post(
            "/ui/workflows/o-1/actions/cancel",
            data={"csrf": csrf, "reason": "r"},
            follow_redirects=False,
        ),
    ]
    for page in pages:
        assert page.headers.get("x-frame-options") == "DENY", (page.request.url, page.status_code)
        assert page.headers["content-security-policy"] == "frame-ancestors 'none'"
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["cache-control"] == "no-store"


def test_a_file_name_with_an_encoded_slash_is_not_found_not_a_defect(api: Api) -> None:
    """``%2F`` in any path became NUL for the ids of the API's routes, and the static
    files' router failed on it: 500, and a traceback logged, for anyone."""
    assert api.http.get("/ui/static/ui.js").status_code == 200
    for path in ("/ui/static/..%2Fui.py", "/ui/static/%2Fetc%2Fpasswd", "/ui/static/a%2Fb"):
        answer = api.http.get(path)
        assert answer.status_code == 404, (path, answer.text)
        assert answer.json()["title"] == "Not Found"
    revoked = api.post(
        "/api/v1/keys/a%2Fb/revoke", json={"reason": "r"}, tenant="*", role=Role.ADMIN
    )
    assert revoked.status_code == 404, revoked.text
    assert revoked.json()["detail"] == "no API key 'a/b'"


def test_sign_ins_are_limited_per_key_and_per_address(api: Api) -> None:
    """Sign-in had no limit: each records a session in the ledger and in every
    server's memory, and any key (a viewer's) could sign in hundreds of times a
    second."""
    from ledgerflow.server.sessions import SESSION_STREAM
    from ledgerflow.server.ui import SIGN_INS_PER_MINUTE

    key = api.keys[("acme", Role.VIEWER)]
    for _ in range(SIGN_INS_PER_MINUTE):
        answer = api.http.post("/ui/sign-in", data={"key": key}, follow_redirects=False)
        assert answer.status_code == 303, answer.text
    refused = api.http.post("/ui/sign-in", data={"key": key}, follow_redirects=False)
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    other = api.keys[("acme", Role.OPERATOR)]  # the same address: limited too
    assert api.http.post("/ui/sign-in", data={"key": other}).status_code == 429

    async def opened() -> int:
        async with lf.open_store(api.url, create=False) as store:
            return len(await store.read_stream(SESSION_STREAM))

    assert asyncio.run(opened()) == SIGN_INS_PER_MINUTE


def test_a_sign_in_posted_from_another_site_is_refused(api: Api) -> None:
    """It had no token and no origin check: another site could sign a visitor's
    browser in with the attacker's key (login CSRF)."""
    key = api.keys[("acme", Role.OPERATOR)]
    for headers in (
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
    ):
        refused = api.http.post(
            "/ui/sign-in", data={"key": key}, headers=headers, follow_redirects=False
        )
        assert refused.status_code == 403, headers
        assert "set-cookie" not in refused.headers
    same = api.http.post(
        "/ui/sign-in",
        data={"key": key},
        headers={"Sec-Fetch-Site": "same-origin", "Origin": "http://testserver"},
        follow_redirects=False,
    )
    assert same.status_code == 303


def test_an_approval_through_the_form(api: Api) -> None:
    start(api, "o/1")
    api.until("/api/v1/workflows/o%2F1", lambda b: bool(b["waiting_signals"]))
    csrf = sign_in(api)
    listing = api.http.get("/ui/workflows?status=running").text
    assert 'href="/ui/workflows/o%2F1"' in listing
    page = api.http.get("/ui/workflows/o%2F1").text
    assert "Send approval" in page
    assert 'name="f.approved"' in page and 'name="f.approver"' in page  # noqa: PT018

    url = "/ui/workflows/o%2F1/signals/approval"
    # Fields the form can check: named problems, nothing sent.
    bad = api.http.post(url, data={"csrf": csrf, "f.approved": "maybe", "f.approver": ""})
    assert bad.status_code == 422
    assert "choose yes or no" in bad.text and "required" in bad.text  # noqa: PT018
    # A form posted from elsewhere (no token from this session): refused.
    assert api.http.post(url, data={"f.approved": "true", "f.approver": "x"}).status_code == 403
    history = api.get("/api/v1/workflows/o%2F1/history").json()["items"]
    assert not [e for e in history if e["type"] == "wf.signal"]

    sent = api.http.post(
        url,
        data={"csrf": csrf, "f.approved": "true", "f.approver": "ana", "reason": "fine"},
        follow_redirects=False,
    )
    assert sent.status_code == 303
    assert sent.headers["location"] == "/ui/workflows/o%2F1?done=signal"
    api.until("/api/v1/workflows/o%2F1", lambda b: b["status"] == "completed")
    done = api.http.get(sent.headers["location"]).text
    assert "Signal sent." in done
    assert "o/1: approved by ana" in done
    assert "“fine”" in done
    live = api.http.get("/ui/workflows/o%2F1?fragment=live")
    assert live.headers["x-status"] == "completed"
    assert "<html" not in live.text


def test_operator_actions_need_a_reason_and_the_role(api: Api) -> None:
    start(api, "p-1", workflow="purchase")
    api.until("/api/v1/workflows/p-1", lambda b: b["status"] == "needs_attention")
    csrf = sign_in(api, role=Role.VIEWER)
    page = api.http.get("/ui/workflows/p-1").text
    assert "Retry the step" not in page  # a viewer sees no buttons...
    answer = api.http.post("/ui/workflows/p-1/actions/retry", data={"csrf": csrf, "reason": "x"})
    assert answer.status_code == 403  # ...and cannot post them either

    csrf = sign_in(api, role=Role.OPERATOR)
    page = api.http.get("/ui/workflows/p-1").text
    for title in ("Retry the step", "Skip the step", "Give the step up", "Cancel"):
        assert title in page
    missing = api.http.post("/ui/workflows/p-1/actions/retry", data={"csrf": csrf, "reason": ""})
    assert missing.status_code == 422
    assert "a reason is required" in missing.text
    not_json = api.http.post(
        "/ui/workflows/p-1/actions/skip", data={"csrf": csrf, "reason": "r", "result": "{"}
    )
    assert not_json.status_code == 422
    # Python's JSON reader takes NaN, which no JSON holds: recorded, it failed (500).
    for no_json in ("NaN", "Infinity", "[-Infinity]"):
        refused = api.http.post(
            "/ui/workflows/p-1/actions/skip",
            data={"csrf": csrf, "reason": "r", "result": no_json},
        )
        assert refused.status_code == 422, (no_json, refused.status_code)
    # The API's limit on a reason holds here too (900,000 characters were recorded).
    long = api.http.post(
        "/ui/workflows/p-1/actions/retry", data={"csrf": csrf, "reason": "x" * 2001}
    )
    assert long.status_code == 422
    assert "at most 2000 characters" in long.text
    # A page far past the end (2**63 and more) is an empty page, not a 500.
    assert api.http.get(f"/ui/workflows/p-1?after={2**64}").status_code == 200
    skipped = api.http.post(
        "/ui/workflows/p-1/actions/skip",
        data={"csrf": csrf, "reason": "made by hand", "result": '"po 9"'},
        follow_redirects=False,
    )
    assert skipped.status_code == 303
    assert (
        api.until("/api/v1/workflows/p-1", lambda b: b["status"] == "completed")["result"] == "po 9"
    )
    assert (
        api.http.post(
            "/ui/workflows/p-1/actions/explode", data={"csrf": csrf, "reason": "r"}
        ).status_code
        == 404
    )


def test_tenants_and_escaping(api: Api) -> None:
    evil = '<script>alert("x")</script>'
    start(api, evil, tenant="beta")
    start(api, "mine")
    sign_in(api, tenant="acme")
    listing = api.http.get("/ui/workflows").text
    assert "mine" in listing
    assert "alert" not in listing  # beta's instance is not listed to acme
    assert api.http.get("/ui/workflows/mine").status_code == 200
    assert api.http.get("/ui/workflows/..%2Fbeta%2Fx").status_code == 404

    sign_in(api, tenant="beta")
    page = api.http.get("/ui/workflows").text
    assert evil not in page
    assert "&lt;script&gt;" in page
    assert evil not in api.http.get(f"/ui/workflows/{evil.replace('/', '%2F')}").text


class Decision(msgspec.Struct):
    """A ``decision``."""

    approver: str
    verdict: Literal["yes", "no"]
    amount: int
    share: float
    urgent: bool
    note: str | None = None
    tags: list[str] = []


@pytest.mark.parametrize(
    ("form", "payload", "problems"),
    [
        (
            {
                "f.approver": "ana",
                "f.verdict": "yes",
                "f.amount": "12",
                "f.share": "0.5",
                "f.urgent": "false",
                "f.tags": '["a"]',
            },
            {
                "approver": "ana",
                "verdict": "yes",
                "amount": 12,
                "share": 0.5,
                "urgent": False,
                "tags": ["a"],
            },
            set(),
        ),
        (
            {"f.verdict": "perhaps", "f.amount": "1.5", "f.share": "x", "f.tags": "["},
            None,
            {"f.approver", "f.verdict", "f.amount", "f.share", "f.tags"},
        ),
    ],
)
def test_forms_are_made_from_a_waits_schema(
    form: dict[str, str], payload: Any, problems: set[str]
) -> None:
    made = signal_form("decide", msgspec.json.schema(Decision))
    kinds = {f.key: (f.kind, f.required) for f in made.fields}
    assert kinds == {
        "approver": ("string", True),
        "verdict": ("choice", True),
        "amount": ("integer", True),
        "share": ("number", True),
        "urgent": ("boolean", True),
        "note": ("string", False),
        "tags": ("json", False),
    }
    read, found = made.read(form)
    assert set(found) == problems
    if payload is not None:
        assert read == payload
        assert msgspec.convert(read, Decision).approver == "ana"

    one = signal_form("go", msgspec.json.schema(bool))
    assert one.whole
    assert one.read({"f.payload": "true"}) == (True, {})
    anything = signal_form("any", None)
    assert anything.read({"f.payload": '{"a": [1]}'}) == ({"a": [1]}, {})


def test_a_form_served_by_one_server_process_is_accepted_by_another(tmp_path: Path) -> None:
    """Behind `--processes N` a form may be posted to another process than the one
    that served it (or to a restarted one): its token must not be per process."""
    url = f"sqlite:///{tmp_path / 'two.db'}"
    with serve(url) as first:
        start(first, "o-2")
        first.until("/api/v1/workflows/o-2", lambda b: bool(b["waiting_signals"]))
        csrf = sign_in(first)
        cookie = first.http.cookies["lf_session"]
        with serve(url) as second:
            second.http.cookies.set("lf_session", cookie, path="/ui")
            sent = second.http.post(
                "/ui/workflows/o-2/signals/approval",
                data={"csrf": csrf, "f.approved": "false", "f.approver": "bo"},
                follow_redirects=False,
            )
            assert sent.status_code == 303, sent.text


def test_a_session_is_not_the_key_and_signing_out_ends_it(api: Api) -> None:
    """The cookie was the API key itself: signing out only asked the browser to
    forget it, a saved copy went on working (in the UI and as a Bearer key), and the
    form token, derived from the key, never changed."""
    key = api.keys[("acme", Role.OPERATOR)]
    first = sign_in(api)
    cookie = api.http.cookies.get("lf_session")
    assert cookie is not None
    assert cookie.startswith("lfs_")
    assert key not in cookie
    assert (
        api.http.get("/api/v1/workflows", headers={"Authorization": f"Bearer {cookie}"}).status_code
        == 401
    )
    api.http.cookies.clear()
    second = sign_in(api)
    assert second != first  # one form token per session
    saved = api.http.cookies.get("lf_session")
    out = api.http.post("/ui/sign-out", data={"csrf": second}, follow_redirects=False)
    assert out.status_code == 303
    api.http.cookies.clear()
    api.http.cookies.set("lf_session", saved or "", path="/ui")
    replayed = api.http.get("/ui/workflows", follow_redirects=True)
    assert "Sign in" in replayed.text  # the session is over, for every server


def test_revoking_its_key_ends_a_session(api: Api) -> None:
    sign_in(api, tenant="beta", role=Role.VIEWER)
    assert "Sign in" not in api.http.get("/ui/workflows", follow_redirects=True).text
    key_id = api.keys[("beta", Role.VIEWER)].split("_")[1]
    revoked = api.http.post(
        f"/api/v1/keys/{key_id}/revoke",
        json={"reason": "left the company"},
        headers=api.auth("*", Role.ADMIN),
    )
    assert revoked.status_code in (200, 202), revoked.text
    deadline = time.monotonic() + 5
    while "Sign in" not in api.http.get("/ui/workflows", follow_redirects=True).text:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_number_field_takes_finite_numbers_only() -> None:
    """float() reads "nan", "inf" and "1e999", which no JSON holds: the signal failed
    when recorded (500) instead of the field saying so."""
    form = signal_form("reading", {"type": "number"})
    (field,) = form.fields
    for given in ("nan", "inf", "-Infinity", "1e999"):
        _, problems = form.read({field.name: given})
        assert problems == {field.name: "a finite number"}, given
    assert form.read({field.name: "1.5"}) == (1.5, {})


def test_a_mistyped_filter_is_said_not_ignored(api: Api) -> None:
    """The list showed every instance for a status it does not know, or a filter
    misspelt: what the caller asked to narrow was silently widened (the API: 422)."""
    sign_in(api)
    start(api, "o-1")
    assert api.http.get("/ui/workflows?status=&order=id").status_code == 200
    assert api.http.get("/ui/workflows?status=running").status_code == 200
    for query in ("status=runing", "stauts=running"):
        answer = api.http.get(f"/ui/workflows?{query}")
        assert answer.status_code == 422, query
        assert "o-1" not in answer.text
