"""The derived ``workflows`` table checked against the ledger: a status row is an
index of the instance's stream, written in the same append as the event it
follows, so a row that disagrees with the stream was changed behind the ledger's
back (and ``workflows show`` / the API would report the false status).

Checked: every instance row has a stream that starts it; an instance whose stream
ends with ``wf.finished`` has that status, and one whose stream does not is not
listed as ended; every started stream has a row. Non-terminal statuses (running,
needs attention, stuck) are the engine's working state and are not compared.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from .audit import Finding, FindingKind
from .errors import EventError
from .store import WorkflowStore
from .store.runtime import InstanceRow
from .workflow.history import TERMINAL, Finished, Started
from .workflow.journal import STREAM_PREFIX

__all__ = ["check_instances"]

T = TypeVar("T")

LOOK_BACK = 50
"""Events read from a stream's end to find how it ended (its end is its last event;
a few may follow it, e.g. a notice to a parent that is itself gone)."""


async def check_instances(store: WorkflowStore, *, page: int = 500) -> list[Finding]:
    """Findings of kind DERIVED; ``store`` must decode the workflow history types
    (``history_registry``). Safe on a live ledger: a disagreement is read again
    before it is reported, and one whose row moved meanwhile is not."""
    findings: list[Finding] = []
    rows: dict[str, InstanceRow] = {}
    after: str | None = None
    while batch := await store.list_instances(after=after, limit=page):
        for row in batch:
            rows[row.workflow_id] = row
        after = batch[-1].workflow_id
    for row in rows.values():
        problem = await _readable(_disagreement(store, row))
        if problem is not None:
            again = await store.get_instance(row.workflow_id)
            if again == row and (await _readable(_disagreement(store, row))) is not None:
                stream = STREAM_PREFIX + row.workflow_id
                findings.append(Finding(FindingKind.DERIVED, stream, None, None, problem))
    heads_after: str | None = STREAM_PREFIX
    while heads := await store.stream_heads(after=heads_after, limit=page):
        for stream_id, _ in heads:
            if not stream_id.startswith(STREAM_PREFIX):
                return findings
            workflow_id = stream_id[len(STREAM_PREFIX) :]
            if workflow_id in rows:
                continue
            first = await _readable(store.read_stream(stream_id, limit=1))
            started = first is not None and bool(first) and isinstance(first[0].data, Started)
            if started and await store.get_instance(workflow_id) is None:
                findings.append(
                    Finding(
                        FindingKind.DERIVED,
                        stream_id,
                        1,
                        None,
                        f"instance {workflow_id!r} was started but has no status row",
                    )
                )
        heads_after = heads[-1][0]
    return findings


async def _readable(read: Awaitable[T]) -> T | None:
    """What ``read`` gives, or None if the stream holds an event that cannot be
    decoded: only an edit made outside ledgerflow stores one, and the hash chains'
    check names it; the status row of that instance goes unchecked."""
    try:
        return await read
    except EventError:
        return None


async def _disagreement(store: WorkflowStore, row: InstanceRow) -> str | None:
    stream = STREAM_PREFIX + row.workflow_id
    if await store.stream_version(stream) == 0:
        return f"instance {row.workflow_id!r} is listed ({row.status}) but has no events"
    last = await store.read_stream(stream, backwards=True, limit=LOOK_BACK)
    ended = next((e.data for e in last if isinstance(e.data, Finished)), None)
    if ended is None and row.status in TERMINAL and len(last) == LOOK_BACK:
        whole = await store.read_stream(stream)
        ended = next((e.data for e in reversed(whole) if isinstance(e.data, Finished)), None)
    if ended is not None and row.status != ended.status:
        return (
            f"the status row says {row.status!r} but the ledger says the instance "
            f"ended {ended.status!r}"
        )
    if ended is None and row.status in TERMINAL:
        return f"the status row says {row.status!r} but the ledger has not ended the instance"
    return None
