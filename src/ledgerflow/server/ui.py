"""The web UI: server-rendered pages over the same ``Service`` as the API, signed
in with an API key (kept in an HttpOnly, SameSite=Strict cookie; every form carries
a token derived from it, so another site cannot post in the user's name). It works
without JavaScript; ``static/ui.js`` (30 lines, no framework) only refreshes the
live parts of a page."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import msgspec
from jinja2 import Environment, FileSystemLoader, select_autoescape
from litestar import Request, Response, Router, get, post
from litestar.datastructures import Cookie
from litestar.params import FromPath
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig

from ..workflow.history import TERMINAL, WorkflowStatus
from .forms import signal_form
from .limits import RateLimiter, too_many
from .principals import Principal, Role
from .problems import Problem, to_problem
from .schemas import SendSignal, WorkflowDetail
from .service import Action, Service, parse_moment
from .sessions import SESSION_HOURS, Sessions

__all__ = ["Ui", "template_config"]

HERE = Path(__file__).parent
COOKIE = "lf_session"
PAGE = 50
HISTORY_PAGE = 500


class SignIn(Exception):
    """No valid session: the page sends the user to sign in."""


@dataclass(frozen=True, slots=True)
class _Action:
    name: Action
    title: str
    help: str


_ACTIONS = {
    "retry": _Action("retry", "Retry the step", "Try the parked step again now."),
    "skip": _Action("skip", "Skip the step", "Record a result for it, as if it had returned."),
    "compensate": _Action(
        "compensate", "Give the step up", "It fails; the workflow's compensations run."
    ),
    "resume": _Action("resume", "Resume", "Take the stuck instance up again."),
    "cancel": _Action("cancel", "Cancel", "Stop the instance; its compensations run."),
}


def _actions(status: str) -> list[_Action]:
    if status in TERMINAL:
        return []
    if status == WorkflowStatus.NEEDS_ATTENTION:
        names = ["retry", "skip", "compensate", "cancel"]
    elif status == WorkflowStatus.STUCK:
        names = ["resume", "cancel"]
    else:
        names = ["cancel"]
    return [_ACTIONS[n] for n in names]


def _path(value: str) -> str:
    return quote(value, safe="")


def _when(moment: datetime | None) -> str:
    if moment is None:
        return ""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def _plain(docstring: str) -> str:
    """A type's docstring without its reStructuredText literals' backquotes."""
    return docstring.replace("``", "")


def _kind(event_type: str) -> str:
    if "compensat" in event_type:
        return "ev-compensation"
    if any(w in event_type for w in ("failed", "stuck", "timed_out", "refused", "parked")):
        return "ev-failure"
    if any(w in event_type for w in ("retried", "resumed", "cancel")):
        return "ev-operator"
    if "signal" in event_type:
        return "ev-signal"
    return "ev-plain"


def template_config() -> TemplateConfig[JinjaTemplateEngine]:
    environment = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
    )
    environment.filters.update(path=_path, when=_when, pretty=_pretty, kind=_kind, plain=_plain)
    return TemplateConfig(instance=JinjaTemplateEngine.from_environment(environment))


SIGN_INS_PER_MINUTE = 10
"""Sign-ins a key, or a client address, may make a minute (as many at once): each
records a session in the ledger and in every server's memory, and a person signs
in a few times a day."""


class Ui:
    def __init__(self, service: Service, limiter: RateLimiter, sessions: Sessions) -> None:
        self.service = service
        self.limiter = limiter
        self.sessions = sessions
        self.sign_ins = RateLimiter(SIGN_INS_PER_MINUTE / 60, SIGN_INS_PER_MINUTE)

    def admit_sign_in(self, request: Request[Any, Any, Any], key: str) -> None:
        """429 once the key, or the address it comes from, signed in too often: the
        API's limit never applied here, and any key (a viewer's) could grow the
        session stream and every server's memory at the rate it could send."""
        client = request.client.host if request.client is not None else "?"
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        for who in (f"address:{client}", f"key:{digest}"):
            wait = self.sign_ins.take(who)
            if wait > 0:
                raise too_many(wait, f"too many sign-ins: retry in {wait:.0f} s")

    # -- sessions ---------------------------------------------------------------------

    async def who(self, request: Request[Any, Any, Any], need: Role = Role.VIEWER) -> Principal:
        token = request.cookies.get(COOKIE)
        principal = await self.sessions.principal(token, now_us=_now_us()) if token else None
        if principal is None:
            raise SignIn
        wait = self.limiter.take(principal.subject)
        if wait > 0:
            raise Problem(429, "Too many requests", f"retry in {wait:.1f} s")
        if not principal.may(need):
            raise Problem(403, "Forbidden", f"this needs the {need.label} role")
        return principal

    def csrf(self, request: Request[Any, Any, Any]) -> str:
        # Derived from the session's token alone (random, one per sign-in), so every
        # server process (and a restarted one) accepts the forms it served; another
        # site can read neither the HttpOnly cookie nor the page, so it cannot make one.
        token = request.cookies.get(COOKIE, "")
        return hmac.new(token.encode(), b"ledgerflow ui form", hashlib.sha256).hexdigest()[:32]

    async def form(self, request: Request[Any, Any, Any]) -> dict[str, str]:
        data = await request.form()
        form = {k: v for k, v in data.items() if isinstance(v, str)}
        if not hmac.compare_digest(form.get("csrf", ""), self.csrf(request)):
            raise Problem(403, "Forbidden", "the form is stale or from elsewhere: reload the page")
        return form

    def render(
        self,
        request: Request[Any, Any, Any],
        name: str,
        who: Principal | None,
        status: int = 200,
        **context: Any,
    ) -> Template:
        return Template(
            template_name=name,
            context={"who": who, "csrf": self.csrf(request), **context},
            status_code=status,
        )

    # -- routes -----------------------------------------------------------------------

    def router(self) -> Router:
        ui = self

        @get("/sign-in")
        async def sign_in_page(request: Request[Any, Any, Any]) -> Template:
            return ui.render(request, "sign_in.html", None)

        @post("/sign-in", status_code=303)
        async def sign_in(request: Request[Any, Any, Any]) -> Response[Any]:
            if _cross_site(request):
                # No session yet to tie a form token to: another site could sign
                # a visitor's browser in with the attacker's key (login CSRF).
                raise Problem(403, "Forbidden", "sign in from this server's own page")
            data = await request.form()
            key = str(data.get("key", "")).strip()
            ui.admit_sign_in(request, key)
            # The cookie holds a session of its own, never the key: a cookie taken
            # from a browser is worth that session only, which signing out ends.
            opened = await ui.sessions.open(key, now_us=_now_us())
            if opened is None:
                error = {"title": "Not signed in", "detail": "that key is not valid"}
                return ui.render(request, "sign_in.html", None, status=401, error=error)
            token, _ = opened
            secure = request.url.scheme == "https"
            return Redirect(
                "/ui/workflows",
                status_code=303,
                cookies=[
                    Cookie(
                        key=COOKIE,
                        value=token,
                        path="/ui",
                        max_age=SESSION_HOURS * 3600,
                        httponly=True,
                        samesite="strict",
                        secure=secure,
                    )
                ],
            )

        @post("/sign-out", status_code=303)
        async def sign_out(request: Request[Any, Any, Any]) -> Response[Any]:
            await ui.form(request)
            await ui.sessions.close(request.cookies.get(COOKIE, ""))
            return Redirect(
                "/ui/sign-in",
                status_code=303,
                cookies=[
                    Cookie(
                        key=COOKIE,
                        value="",
                        path="/ui",
                        max_age=0,
                        httponly=True,
                        samesite="strict",
                    )
                ],
            )

        @get("/workflows")
        async def workflows(request: Request[Any, Any, Any]) -> Template:
            who = await ui.who(request)
            query = request.query_params
            filters = {
                k: query.get(k) or None
                for k in ("status", "name", "text", "created_from", "created_before", "after")
            }
            filters["order"] = query.get("order") or "newest"
            # A mistyped filter must not widen the list to everything silently (as
            # the API refuses it, 422).
            unknown = sorted(set(query) - _LIST_PARAMETERS)
            if unknown:
                raise Problem(422, "Invalid input", f"{unknown[0]!r} is not a filter of this list")
            if filters["status"] is not None and filters["status"] not in _STATUSES:
                raise Problem(
                    422,
                    "Invalid input",
                    f"unknown status {filters['status']!r}: one of {', '.join(_STATUSES)}",
                )
            page = await ui.service.list_workflows(
                who,
                status=filters["status"],
                name=filters["name"],
                text=filters["text"],
                created_from=_local(filters["created_from"], "created_from"),
                created_before=_local(filters["created_before"], "created_before"),
                newest_first=filters["order"] != "id",
                after=filters["after"],
                limit=PAGE,
            )
            shown = {k: v for k, v in filters.items() if v and k != "after"}
            next_url = "/ui/workflows?" + urlencode({**shown, "after": page.next or ""})
            context: dict[str, Any] = {
                "page": page,
                "filters": filters,
                "after": filters["after"],
                "statuses": _STATUSES,
                "names": sorted({d.name for d in ui.service.client._latest.values()}),
                "next_url": next_url,
                "now": _when(datetime.now(UTC)),
                "live_url": "/ui/workflows?" + urlencode({**shown, "fragment": "rows"}),
            }
            if query.get("fragment") == "rows":
                return ui.render(request, "_rows.html", who, **context)
            return ui.render(request, "workflows.html", who, **context)

        @get("/workflows/{workflow_id:str}")
        async def workflow(request: Request[Any, Any, Any], workflow_id: FromPath[str]) -> Template:
            who = await ui.who(request)
            detail = await ui.service.describe(who, workflow_id)
            if request.query_params.get("fragment") == "live":
                template = ui.render(request, "_workflow_live.html", who, w=detail)
                template.headers["x-status"] = detail.status
                return template
            notice = {
                "signal": "Signal sent.",
                "cancel": "Cancellation requested.",
                "retry": "The step will be tried again.",
                "skip": "The step's result was recorded.",
                "compensate": "The step was given up.",
                "resume": "The instance was taken up again.",
            }.get(request.query_params.get("done", ""))
            return await ui.workflow_page(request, who, detail, notice=notice)

        @post("/workflows/{workflow_id:str}/signals/{signal:str}", status_code=303)
        async def send(
            request: Request[Any, Any, Any], workflow_id: FromPath[str], signal: FromPath[str]
        ) -> Response[Any]:
            who = await ui.who(request, Role.OPERATOR)
            form = await ui.form(request)
            detail = await ui.service.describe(who, workflow_id)
            wait = next((w for w in detail.waiting_signals if w.name == signal), None)
            reads = signal_form(signal, wait.schema if wait else None)
            payload, problems = reads.read(form)
            if not problems:
                try:
                    body = _checked(
                        SendSignal, {"payload": payload, "reason": form.get("reason") or None}
                    )
                    await ui.service.signal(who, workflow_id, signal, body)
                except Problem as refused:
                    if refused.status != 422:
                        raise
                    error = {"title": "Not sent", "detail": refused.detail}
                    return await ui.workflow_page(
                        request, who, detail, error=error, values=form, status=422
                    )
                return Redirect(_back(detail.id, "signal"), status_code=303)
            error = {"title": "Not sent", "detail": "some fields need fixing"}
            return await ui.workflow_page(
                request, who, detail, error=error, values=form, problems=problems, status=422
            )

        @post("/workflows/{workflow_id:str}/actions/{action:str}", status_code=303)
        async def act(
            request: Request[Any, Any, Any], workflow_id: FromPath[str], action: FromPath[str]
        ) -> Response[Any]:
            who = await ui.who(request, Role.OPERATOR)
            form = await ui.form(request)
            if action not in _ACTIONS:
                raise Problem(404, "Not Found", f"no action {action!r}")
            reason = form.get("reason", "").strip()
            detail = await ui.service.describe(who, workflow_id)
            try:
                if not reason:
                    raise Problem(422, "Invalid input", "a reason is required")
                if len(reason) > MAX_REASON:
                    raise Problem(
                        422, "Invalid input", f"a reason is at most {MAX_REASON} characters"
                    )
                result = None
                if action == "skip":
                    try:  # msgspec: no NaN or Infinity, which json.loads takes
                        result = msgspec.json.decode((form.get("result") or "null").encode())
                    except msgspec.DecodeError as exc:
                        raise Problem(
                            422, "Invalid input", f"the result is not JSON: {exc}"
                        ) from None
                await ui.service.act(who, workflow_id, _ACTIONS[action].name, reason, result=result)
            except Problem as refused:
                if refused.status not in (409, 422):
                    raise
                error = {"title": refused.title, "detail": refused.detail}
                return await ui.workflow_page(
                    request, who, detail, error=error, status=refused.status
                )
            return Redirect(_back(detail.id, action), status_code=303)

        # A plain function, not the bound method: routers are deep-copied when
        # registered, and a method would take this object (and its store) along.
        def failed(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
            return ui.failed(request, exc)

        return Router(
            "/ui",
            route_handlers=[sign_in_page, sign_in, sign_out, workflows, workflow, send, act],
            exception_handlers={Exception: failed},
            include_in_schema=False,
            response_headers=PAGE_HEADERS,
        )

    async def workflow_page(
        self,
        request: Request[Any, Any, Any],
        who: Principal,
        detail: WorkflowDetail,
        *,
        notice: str | None = None,
        error: dict[str, str] | None = None,
        values: dict[str, str] | None = None,
        problems: dict[str, str] | None = None,
        status: int = 200,
    ) -> Template:
        after = _int(request.query_params.get("after"))
        history = await self.service.history(who, detail.id, after=after, limit=HISTORY_PAGE)
        history_next = None
        if history.next is not None:
            history_next = f"/ui/workflows/{_path(detail.id)}?after={history.next}"
        return self.render(
            request,
            "workflow.html",
            who,
            status=status,
            w=detail,
            history=history.items,
            history_next=history_next,
            forms=[signal_form(s.name, s.schema) for s in detail.waiting_signals],
            actions=_actions(detail.status),
            may_act=who.may(Role.OPERATOR),
            live_url=f"/ui/workflows/{_path(detail.id)}?fragment=live",
            notice=notice,
            error=error,
            values=values or {},
            problems=problems or {},
        )

    def failed(self, request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
        # An exception handler's response does not get the router's headers.
        if isinstance(exc, SignIn):
            return Redirect("/ui/sign-in", status_code=303, headers=PAGE_HEADERS)
        problem = to_problem(exc)
        error = {"status": problem.status, "title": problem.title, "detail": problem.detail}
        page = self.render(request, "error.html", None, status=problem.status, error=error)
        page.headers.update({**PAGE_HEADERS, **problem.headers})  # Retry-After, with a 429
        return page

    def routes(self) -> list[Any]:
        @get("/", include_in_schema=False)
        async def root() -> Redirect:
            return Redirect("/ui/workflows")

        @get("/ui", include_in_schema=False)
        async def ui_root() -> Redirect:
            return Redirect("/ui/workflows")

        static = create_static_files_router(
            path="/ui/static", directories=[HERE / "static"], include_in_schema=False
        )
        return [root, ui_root, static, self.router()]


_STATUSES = [s.value for s in WorkflowStatus]
_LIST_PARAMETERS = frozenset(
    {"status", "name", "text", "created_from", "created_before", "after", "order", "fragment"}
)
"""What the list of instances takes in its query."""

PAGE_HEADERS = {
    # Not in another site's frame: its page could lay a decoy over the operator
    # forms (clickjacking); the session cookie's SameSite only covers a signed-in frame.
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    # Pages show inputs, results and personal data: no shared or browser cache keeps them.
    "Cache-Control": "no-store",
    "Referrer-Policy": "same-origin",
}
"""Headers of every page of the web UI, error pages and redirects included."""


def _back(workflow_id: str, done: str) -> str:
    return f"/ui/workflows/{_path(workflow_id)}?done={done}"


def _int(text: str | None) -> int:
    try:
        return min(max(0, int(text or 0)), _LARGEST)  # a page past 2**63 failed (500)
    except ValueError:
        return 0


_LARGEST = 2**62
MAX_REASON = 2000
"""As the API's ``Reason``."""


def _checked(kind: type[SendSignal], given: dict[str, Any]) -> SendSignal:
    """``given`` as the API's body type, its limits checked (a reason's length): the
    UI built the body itself, and a 900,000-character reason was recorded."""
    try:
        return msgspec.convert(given, kind)
    except msgspec.ValidationError as exc:
        raise Problem(422, "Invalid input", str(exc)) from None


def _local(value: str | None, field: str) -> datetime | None:
    """A ``datetime-local`` input's value (no offset: taken as UTC), or RFC 3339."""
    if not value:
        return None
    if len(value) in (16, 19) and "T" in value and value[-1].isdigit():
        value = value + (":00" if len(value) == 16 else "") + "Z"
    return parse_moment(value, f"query.{field}")


def _cross_site(request: Request[Any, Any, Any]) -> bool:
    """Whether the browser says the request comes from another site: its
    ``Sec-Fetch-Site``, else an ``Origin`` whose host is not this one. A client that
    sends neither (curl, a script) is not a browser another site can drive."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site not in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin == "null"
    host = request.headers.get("host", "")
    return urlsplit(origin).netloc != host


def _now_us() -> int:
    return time.time_ns() // 1_000
