"""The ledger's ids as a tenant's caller reads them: without the ``<tenant>/`` before
them (see ``ledgerflow.tenants``), wherever the server shows one, in the fields that
hold ids and in the engine's own words that quote them (what an instance waits for,
its error, a refusal's message). Nothing stored changes: ids are mapped on the way
out. An id outside the caller's tenant is never shortened; a payload, or any text
of the user's, is never rewritten."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import LedgerflowError
from ..workflow.client import STREAM_PREFIX
from ..workflow.history import ChildDone, ChildFinished, ChildStarted, Finished, Started, Stuck
from .problems import read_by_caller

__all__ = ["CallerIds"]

_QUOTED = re.compile(r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*\"""")
"""A ``repr`` of a string, as the engine's messages quote ids."""

# The engine's errors that a recorded message (an instance's end, a child's, being
# stuck) may be, with the words their message opens with before the quoted id.
_OPENINGS = {
    "ChildWorkflowError": "child workflow ",
    "NonDeterminismError": "workflow ",
    "UnrecordableValueError": "workflow ",
    "RecordedValueError": "workflow ",
}
_CHILD_ENDED = re.compile(r" ended ([a-z_]+): ")
_ID_FIELDS = ("workflow_id", "instance_id", "child_id")
"""The attributes of the engine's errors that hold an instance's id."""


@dataclass(frozen=True, slots=True)
class CallerIds:
    """The ids a caller reads: ``prefix`` is its tenant's ``<tenant>/``, or None for
    a caller of every tenant, who reads the ledger's ids whole."""

    prefix: str | None

    def id(self, workflow_id: str | None) -> str | None:
        """The caller's id of a ledger id (None for one outside the caller's tenant)."""
        if workflow_id is None or self.prefix is None:
            return workflow_id
        if workflow_id.startswith(self.prefix):
            return workflow_id[len(self.prefix) :]
        return None

    def _shown(self, workflow_id: str) -> str:
        """The caller's id of ``workflow_id``, or ``workflow_id`` itself where it is
        not the caller's tenant's to shorten (text is mapped, never blanked)."""
        found = self.id(workflow_id)
        return workflow_id if found is None else found

    # -- the engine's words ---------------------------------------------------------

    def error(self, error: str | None) -> str | None:
        """An instance's error as ``describe`` says it: ``<type>: <message>``."""
        if error is None or self.prefix is None:
            return error
        error_type, colon, message = error.partition(": ")
        if not colon:
            return error
        return f"{error_type}: {self.message(error_type, message)}"

    def message(self, error_type: str | None, message: str | None) -> str | None:
        """A recorded error message: the id that one of the engine's own errors
        quotes at its start (and, for a child's end, those its cause quotes in turn);
        the rest is the user's, left as it was."""
        if message is None or error_type is None or self.prefix is None:
            return message
        opening = _OPENINGS.get(error_type)
        if opening is None or not message.startswith(opening):
            return message
        quoted = _QUOTED.match(message, len(opening))
        if quoted is None:
            return message
        workflow_id = ast.literal_eval(quoted.group())
        if not isinstance(workflow_id, str):
            return message
        rest = message[quoted.end() :]
        if error_type == "ChildWorkflowError":
            ended = _CHILD_ENDED.match(rest)
            if ended is not None:
                cause = rest[ended.end() :]
                cause_type, colon, cause_message = cause.partition(": ")
                if colon:
                    cause = f"{cause_type}: {self.message(cause_type, cause_message)}"
                rest = rest[: ended.end()] + cause
        return f"{opening}{self._shown(workflow_id)!r}{rest}"

    def waiting_for(self, said: str | None, children: Iterable[str]) -> str | None:
        """What an instance waits for: each ``child <id>`` of it among the ``; ``
        separated parts (``children``: its children's ids)."""
        if said is None or self.prefix is None:
            return said
        for child in children:
            shown = self._shown(child)
            if shown != child:
                said = re.sub(
                    rf"(^|; )child {re.escape(child)}(?=; |$)",
                    "\\g<1>child " + shown.replace("\\", "\\\\"),
                    said,
                )
        return said

    def undo_failed(self, said: Iterable[str], children: Iterable[str]) -> list[str]:
        """``undo_failed``: a child whose undo gave up is ``child <id>: ...``."""
        told = {f"child {c}: compensation_failed": c for c in children}
        return [
            f"child {self._shown(told[s])}: compensation_failed" if s in told else s for s in said
        ]

    # -- history ----------------------------------------------------------------------

    def event_data(self, event: Any, data: Any) -> Any:
        """``data`` (the builtins of the recorded ``event``) with the ids it holds in
        the caller's form: ``parent_id`` of a start (null when the parent is outside
        the caller's tenant, as a description's is), ``child_id`` of a child's
        events, and the ids the engine's errors quote in an end's ``message``."""
        if self.prefix is None or not isinstance(data, dict):
            return data
        if isinstance(event, Started) and data.get("parent_id") is not None:
            data["parent_id"] = self.id(event.parent_id)
        if isinstance(event, ChildStarted | ChildDone | ChildFinished):
            data["child_id"] = self.id(event.child_id)
        ended = isinstance(event, ChildDone | ChildFinished | Finished | Stuck)
        if ended and data.get("message") is not None:
            data["message"] = self.message(event.error_type, event.message)
        return data

    # -- refusals ---------------------------------------------------------------------

    def recast(self, exc: LedgerflowError) -> None:
        """Word ``exc``'s message (which the caller reads: see ``read_by_caller``) in
        the caller's ids: each id of the caller's tenant that the error holds (its
        instance, its stream) is quoted as the caller names it."""
        if self.prefix is None or not read_by_caller(exc):
            return
        ids = [v for v in (getattr(exc, f, None) for f in _ID_FIELDS) if isinstance(v, str)]
        stream = getattr(exc, "stream_id", None)
        if isinstance(stream, str) and stream.startswith(STREAM_PREFIX):
            ids.append(stream[len(STREAM_PREFIX) :])
        message = str(exc)
        for workflow_id in dict.fromkeys(ids):
            shown = self.id(workflow_id)
            if shown is None:
                continue
            message = message.replace(repr(workflow_id), repr(shown))
            message = message.replace(
                repr(STREAM_PREFIX + workflow_id), repr(STREAM_PREFIX + shown)
            )
        exc.args = (message,)
