"""What an evidence bundle says about the definition an instance ran: its name and
version as the ledger recorded them, and, from the code at hand, a hash of the
definition (a workflow function's source; a state machine's structure) and a state
machine's verification result."""

from __future__ import annotations

import hashlib
import inspect
import marshal
from typing import Any

import msgspec

from .errors import AuditError
from .statemachine import Machine
from .statemachine import verify as verify_machine
from .statemachine.diagram import mermaid
from .store.ports import EventStore
from .workflow.definition import WorkflowDefinition

__all__ = ["definition_hash", "describe_definition"]


def definition_hash(definition: WorkflowDefinition[Any, Any] | Machine) -> str:
    """SHA-256 (hex) of what decides an instance's course: a workflow function's
    source text (its bytecode where there is no source), or a state machine's
    states, transitions and guards as its diagram draws them."""
    if isinstance(definition, Machine):
        text = mermaid(definition).encode()
    else:
        try:
            text = inspect.getsource(definition.fn).encode()
        except (OSError, TypeError):
            text = marshal.dumps(definition.fn.__code__)
    header = f"{definition.name}\0{definition.version}\0".encode()
    return hashlib.sha256(header + text).hexdigest()


async def describe_definition(store: EventStore, stream_id: str, app_target: str) -> dict[str, Any]:
    """The definition the instance of ``stream_id`` started under, found in the app
    ``app_target``."""
    from .workflow.worker import load_app

    first = await store.read_stream_rows(stream_id, limit=1)
    if not first or first[0].type != "wf.started":
        raise AuditError(f"stream {stream_id!r} is not a workflow's: it has no wf.started event")
    started = msgspec.json.decode(first[0].data)
    name, version = started.get("name"), started.get("version")
    found = [d for d in load_app(app_target).workflows if (d.name, d.version) == (name, version)]
    if not found:
        raise AuditError(f"--app {app_target} has no definition {name!r} version {version}")
    definition = found[0]
    described: dict[str, Any] = {
        "kind": "state_machine" if isinstance(definition, Machine) else "workflow",
        "name": name,
        "version": version,
        "sha256": definition_hash(definition),
    }
    if isinstance(definition, Machine):
        report = verify_machine(definition)
        described["verification"] = {
            "ok": report.ok,
            "configurations": report.configurations,
            "bounded": report.bounded,
            "findings": [str(f) for f in report.findings],
        }
    return described
