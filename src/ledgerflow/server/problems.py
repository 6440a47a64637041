"""Errors as RFC 9457 problem details (``application/problem+json``): a status, a
title, a detail a person can act on, and for bad input the fields at fault. Never
a stack trace: an unexpected error is logged here with an id, and the caller gets
the id."""

from __future__ import annotations

import contextlib
import logging
import re
import uuid
from collections.abc import Iterator
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from ..errors import (
    BulkheadFullError,
    CircuitOpenError,
    DuplicateEventError,
    EventTooLargeError,
    InvalidTransition,
    LedgerflowError,
    SignalInputError,
    StepNotParkedError,
    StoreClosedError,
    StoreInternalError,
    StoreReadOnlyError,
    StoreUnavailableError,
    UnknownWorkflowError,
    UnrecordableValueError,
    WorkflowAlreadyStartedError,
    WorkflowFinishedError,
    WorkflowInputError,
    WorkflowNotFoundError,
    WorkflowNotStuckError,
)

__all__ = [
    "MEDIA_TYPE",
    "Problem",
    "field_errors",
    "problem_body",
    "problem_response",
    "read_by_caller",
    "to_problem",
]

MEDIA_TYPE = "application/problem+json"
log = logging.getLogger("ledgerflow.server")


class Problem(Exception):
    """An answer other than success, raised by a route."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}


def invalid(field: str, message: str) -> Problem:
    """422 naming the one field at fault (``body.input``, ``query.limit``...)."""
    return Problem(
        422,
        "Invalid input",
        f"{field}: {message}",
        errors=[{"field": field, "message": message}],
    )


@contextlib.contextmanager
def field_errors(field: str) -> Iterator[None]:
    """Report the engine's refusal of an input as a 422 naming ``field``."""
    try:
        yield
    except SignalInputError as exc:
        raise invalid(field, exc.reason) from None
    except UnknownWorkflowError as exc:
        raise invalid(field, str(exc)) from None
    except WorkflowInputError as exc:
        raise invalid(field, exc.reason) from None
    except UnrecordableValueError as exc:
        raise invalid(field, str(exc)) from None


# Errors a caller can act on, by status: their message is for the caller.
_STATUS: tuple[tuple[type[LedgerflowError], int, str], ...] = (
    (WorkflowNotFoundError, 404, "Workflow not found"),
    (WorkflowAlreadyStartedError, 409, "Workflow already started"),
    (WorkflowFinishedError, 409, "Workflow finished"),
    (StepNotParkedError, 409, "No step to act on"),
    (WorkflowNotStuckError, 409, "Workflow not stuck"),
    (InvalidTransition, 409, "Event not accepted"),
    (UnknownWorkflowError, 409, "Workflow code not loaded"),
    (DuplicateEventError, 409, "Id already used"),
    (WorkflowInputError, 422, "Invalid input"),
    (EventTooLargeError, 413, "Too large"),
    (StoreUnavailableError, 503, "Store unavailable"),
    # A read-only session or a standby: an outage to wait out (a failover under way,
    # an operator's setting), not a defect.
    (StoreReadOnlyError, 503, "Store read-only"),
    (StoreClosedError, 503, "Store unavailable"),
    (CircuitOpenError, 503, "Circuit open"),
    (BulkheadFullError, 503, "Busy"),
)


_FIELD_ERRORS = (SignalInputError, UnknownWorkflowError, WorkflowInputError, UnrecordableValueError)


def read_by_caller(exc: Exception) -> bool:
    """Whether the caller reads ``exc``'s message (a problem's detail): not so for an
    unexpected error, which only the server's log shows."""
    if isinstance(exc, StoreInternalError):
        return False
    return isinstance(exc, _FIELD_ERRORS) or any(isinstance(exc, k) for k, _, _ in _STATUS)


_CUT_SHORT = "Input data was truncated"
# msgspec says so for a string ending in an escaped high surrogate too ("\\ud800"),
# which sent a client looking for a truncation that never happened.
_CUT_SHORT_MEANS = (
    "the body ends before its JSON does, or a string in it holds an escaped lone "
    "UTF-16 surrogate (such as \\ud800), which is no character"
)


def to_problem(exc: Exception) -> Problem:
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, ValidationException):
        return _validation(exc)
    if isinstance(exc, HTTPException):
        headers: dict[str, str] = dict(exc.headers or {})
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and detail == _CUT_SHORT:
            detail = _CUT_SHORT_MEANS
        return Problem(exc.status_code, _title(exc.status_code), detail, headers=headers)
    if isinstance(exc, RecursionError) and "deserializ" in str(exc):
        # msgspec's own limit on nesting, reached reading a body: the body's fault.
        return Problem(400, "Bad request", "the body is nested too deeply to read")
    for kind, status, title in _STATUS:
        if isinstance(exc, kind) and not isinstance(exc, StoreInternalError):
            retry = {"Retry-After": "1"} if status == 503 else None
            return Problem(status, title, str(exc), headers=retry)
    incident = uuid.uuid4().hex[:12]
    log.error("unexpected error (incident %s)", incident, exc_info=exc)
    return Problem(
        500,
        "Internal error",
        f"the server failed to answer; its log names the cause as incident {incident}",
    )


def _validation(exc: ValidationException) -> Problem:
    errors: list[dict[str, str]] = []
    extra: Any = exc.extra
    for item in extra if isinstance(extra, list) else []:
        if isinstance(item, dict) and item.get("key") == "data" and item.get("message") == "'data'":
            # The framework's way of saying there was no body at all.
            return Problem(400, "Bad request", "the body is empty: a JSON object is expected")
        if isinstance(item, dict):
            source = item.get("source") or "body"
            where = getattr(source, "value", source)  # a ParamType for query, path...
            key = item.get("key")
            message = str(item.get("message", "invalid"))
            if key in (None, "data"):  # the body: msgspec's message says where in it
                field = "body" + _body_path(message)
            else:
                field = f"{where}.{key}"
            errors.append({"field": field, "message": message})
    if not errors:
        errors.append({"field": "body", "message": str(exc.detail)})
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return Problem(422, "Invalid input", detail, errors=errors)


_AT = re.compile(r" - at `\$((?:\.[^`.\[]+|\[\d+\])*)`$")
_MISSING = re.compile(r"(?:missing required|contains unknown) field `([^`]+)`")


def _body_path(message: str) -> str:
    """Where in the body msgspec's ``message`` points: ``.seq``, ``.input.items[2]``..."""
    at = _AT.search(message)
    path = at.group(1) if at else ""
    missing = _MISSING.search(message)
    return path + (f".{missing.group(1)}" if missing else "")


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def problem_response(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    problem = to_problem(exc)
    return Response(
        problem_body(problem, request.url.path),
        status_code=problem.status,
        media_type=MEDIA_TYPE,
        headers=problem.headers,
    )


def problem_body(problem: Problem, path: str) -> dict[str, Any]:
    """The RFC 9457 document of ``problem`` at ``path``."""
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
        # As the caller wrote it: an id's "/" travels as %2F (SlashSafe made it NUL).
        "instance": path.replace("\x00", "%2F"),
    }
    if problem.errors:
        body["errors"] = problem.errors
    return body
