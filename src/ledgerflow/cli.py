"""The ``ledgerflow`` command line: a thin adapter over the Python API."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import inspect
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import msgspec
import typer
from rich.markup import escape
from rich.table import Table

from . import cli_server as _server_cli
from ._version import running_version
from .cli_audit import audit_app, gdpr_app
from .cli_options import DEFAULT_DB, DbOption, err, fail, out
from .cli_options import configure_logs as _configure_logs
from .cli_options import run as _run
from .errors import (
    BusUnavailableError,
    InstanceBusyError,
    InvalidTransition,
    LedgerflowError,
    StreamNotFoundError,
    TransitionFailedError,
)
from .events import RecordedEvent
from .hashing import from_micros
from .resilience import Policy, PolicyVersion, check_policy, policy_document, with_settings
from .resilience.book import default_actor
from .statemachine import Machine
from .statemachine import verify as verify_machine
from .statemachine.diagram import dot, mermaid
from .statemachine.instance import MachineState
from .store import open_store
from .store.runtime import ResourceRow
from .workflow.client import WorkflowClient
from .workflow.drawing import history_dot, history_mermaid
from .workflow.handles import QueueInfo, WorkerInfo, WorkflowDescription
from .workflow.history import WorkflowStatus

__all__ = ["app", "main"]

STATUSES = tuple(status.value for status in WorkflowStatus)

app = typer.Typer(
    rich_markup_mode="markdown",
    name="ledgerflow",
    help="Durable workflows and sagas on a hash-chained event ledger.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(audit_app, name="audit")
app.add_typer(gdpr_app, name="gdpr")
workflows_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Inspect workflow instances, send them signals, cancel them.",
    no_args_is_help=True,
)
app.add_typer(workflows_app, name="workflows")
workers_app = typer.Typer(
    rich_markup_mode="markdown",
    help="See which workers (engines) are registered and whether they are alive.",
    no_args_is_help=True,
)
app.add_typer(workers_app, name="workers")
queues_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Task queues: what waits in them, what runs, and their limits.",
    no_args_is_help=True,
)
app.add_typer(queues_app, name="queues")
policy_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Named resilience policies: list, show, history, set (changes apply while running).",
    no_args_is_help=True,
)
app.add_typer(policy_app, name="policy")
machines_app = typer.Typer(
    rich_markup_mode="markdown",
    help="State-machine instances: where they are, send them events, migrate them.",
    no_args_is_help=True,
)
app.add_typer(machines_app, name="machines")
projections_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Projections (read models): their checkpoints, lag and failures; retry, skip, query.",
    no_args_is_help=True,
)
app.add_typer(projections_app, name="projections")
resources_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Guarded resources: breaker state, tokens, permits, and every breaker move.",
    no_args_is_help=True,
)
app.add_typer(resources_app, name="resources")

IdArgument = Annotated[str, typer.Argument(help="The workflow instance id.")]
PolicyArgument = Annotated[str, typer.Argument(help="The policy's name (e.g. erp).")]

T = TypeVar("T")


def _fail(message: str) -> NoReturn:
    """One line on stderr, exit 2 (``cli_options.fail``; here so that checkers see
    that it never returns)."""
    fail(message)


def _print_version(value: bool) -> None:
    if value:
        out.print(f"ledgerflow {running_version()}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Durable workflows and sagas on a hash-chained event ledger."""


# Every command opens the ledger with create=False: only a process that writes
# workflows (an Engine) creates or migrates a ledger. A mistyped --db then reports
# "no ledger at ..." instead of creating an empty ledger and calling it intact.


# -- workflows ------------------------------------------------------------------------


async def _client(
    db: str,
    call: Callable[[WorkflowClient], Awaitable[T]],
    workflows: Sequence[Machine] = (),
) -> T:
    """``call`` with a workflow client of the store: it claims no work and runs no
    workflow, and leaves the leases of running engines alone. Signals and
    cancellations nudge the instance so that its engine picks them up. ``workflows``:
    the state machines it reads and sends events to (their engines verified them)."""
    client = WorkflowClient(
        open_store(db, create=False), workflows=workflows, verify_machines="off"
    )
    async with client:
        try:
            return await call(client)
        finally:
            await client.store.close()


def _call(
    db: str, call: Callable[[WorkflowClient], Awaitable[T]], workflows: Sequence[Machine] = ()
) -> T:
    """The result of ``call`` on a workflow client of the store at ``db``."""
    return _run(lambda: _client(db, call, workflows))


def _time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _compact(value: Any) -> str:
    """``value`` as one line of JSON, with spaces a table can wrap at."""
    return json.dumps(msgspec.to_builtins(value), separators=(", ", ": "), ensure_ascii=False)


def _line(label: str, value: object) -> None:
    out.print(f"{label + ':':<12} {value}", markup=False, highlight=False, soft_wrap=True)


@workflows_app.command("list")
def workflows_list(
    db: DbOption = DEFAULT_DB,
    status: Annotated[
        str | None, typer.Option(help=f"Only instances in this status: {', '.join(STATUSES)}.")
    ] = None,
    after: Annotated[
        str | None, typer.Option(help="Start after this id (ids are listed in order).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many instances.")] = 100,
) -> None:
    """List workflow instances by id."""
    if status is not None and status not in STATUSES:
        _fail(f"unknown status {status!r}: use one of {', '.join(STATUSES)}")
    rows = _call(db, lambda e: e.list_workflows(status=status, after=after, limit=limit))
    if not rows:
        out.print("no workflow instances" + (f" with status {status}" if status else ""))
        return
    table = Table()
    table.add_column("id", no_wrap=True, overflow="fold")
    table.add_column("name", no_wrap=True, overflow="fold")
    table.add_column("version")
    table.add_column("status", no_wrap=True)
    table.add_column("updated (UTC)", no_wrap=True)
    for row in rows:
        table.add_row(
            escape(row.workflow_id),
            escape(row.name),
            str(row.version),
            row.status,
            _time(from_micros(row.updated_at_us)),
        )
    out.print(table)
    if len(rows) == limit:
        out.print(f"(more may follow: --after {escape(rows[-1].workflow_id)})", highlight=False)


@workflows_app.command("show")
def workflows_show(workflow_id: IdArgument, db: DbOption = DEFAULT_DB) -> None:
    """Describe one instance: status, what it waits for, its result or error."""
    d: WorkflowDescription = _call(db, lambda e: e.describe(workflow_id))
    _line("id", d.workflow_id)
    _line("workflow", f"{d.name} v{d.version}")
    if d.patches:
        _line("patches", ", ".join(d.patches))
    _line("status", d.status)
    if d.parent_id is not None:
        _line("parent", d.parent_id)
    if d.waiting_for is not None:
        _line("waiting for", d.waiting_for)
    if d.unconsumed_signals:  # sent, not taken: kept for a later wait
        _line("unconsumed signals", ", ".join(d.unconsumed_signals))
    if d.status == WorkflowStatus.COMPLETED:
        _line("result", _compact(d.result))
    if d.error is not None:
        _line("error", d.error)
    for left in d.undo_failed:
        _line("undo failed", left)
    _line("created", f"{_time(d.created_at)} UTC")
    _line("updated", f"{_time(d.updated_at)} UTC")
    _line("events", d.events)


@workflows_app.command("history")
def workflows_history(
    workflow_id: IdArgument,
    db: DbOption = DEFAULT_DB,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per event, one per line.")
    ] = False,
    after: Annotated[
        int, typer.Option(min=0, help="Only the events after this version (a page's last).")
    ] = 0,
    limit: Annotated[
        int | None, typer.Option(min=1, help="At most this many events (default: all).")
    ] = None,
) -> None:
    """The events of one instance, oldest first."""
    events: list[RecordedEvent] = _call(
        db, lambda e: e.history(workflow_id, after=after, limit=limit)
    )
    if as_json:
        for event in events:
            record = {
                "version": event.version,
                "position": event.position,
                "type": event.type,
                "schema_version": event.schema_version,
                "data": event.data,
                "metadata": event.metadata,
                "recorded_at": event.recorded_at,
                "id": event.id,
            }
            typer.echo(msgspec.json.encode(record).decode())
        return
    table = Table()
    table.add_column("version")
    table.add_column("type", no_wrap=True, overflow="fold")
    table.add_column("data", overflow="fold")
    table.add_column("recorded at (UTC)", no_wrap=True)
    for event in events:
        table.add_row(
            str(event.version), event.type, escape(_compact(event.data)), _time(event.recorded_at)
        )
    out.print(table)
    if limit is not None and len(events) == limit:
        out.print(f"(more may follow: --after {events[-1].version})", highlight=False)


def _json_option(text: str, option: str) -> Any:
    """An option's JSON value, or a one-line refusal (exit 2): invalid JSON, NaN or
    Infinity (which JSON does not have), or nesting too deep to read (a traceback)."""
    try:
        return json.loads(text, parse_constant=_not_json)
    except RecursionError:
        _fail(f"{option} is nested too deeply to read")
    except ValueError as exc:
        _fail(f"{option} is not valid JSON: {exc}")


def _not_json(constant: str) -> NoReturn:
    raise ValueError(f"{constant} is not a JSON value")


@workflows_app.command("signal")
def workflows_signal(
    workflow_id: IdArgument,
    name: Annotated[str, typer.Argument(help="The signal's name.")],
    db: DbOption = DEFAULT_DB,
    payload: Annotated[
        str | None, typer.Option(help="The signal's payload, as JSON (default: null).")
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Why, recorded with the signal.")] = None,
    actor: Annotated[
        str | None, typer.Option(help="Who: recorded with the signal (default: user@host).")
    ] = None,
) -> None:
    """Send a signal; it is kept until the workflow waits for it. Who sent it (and
    why) is recorded with it."""
    value: Any = None if payload is None else _json_option(payload, "--payload")
    who = actor or default_actor()
    _call(db, lambda e: e.signal(workflow_id, name, value, actor=who, reason=reason))
    out.print(f"sent signal {name!r} to workflow {workflow_id!r}", markup=False, highlight=False)


@workflows_app.command("cancel")
def workflows_cancel(
    workflow_id: IdArgument,
    db: DbOption = DEFAULT_DB,
    reason: Annotated[str | None, typer.Option(help="Why, recorded with the request.")] = None,
    actor: Annotated[
        str | None, typer.Option(help="Who: recorded with the request (default: user@host).")
    ] = None,
) -> None:
    """Ask an instance to stop: it is cancelled at its next await, and the steps it
    completed are compensated."""
    _call(db, lambda e: e.cancel(workflow_id, reason, actor=actor))
    out.print(
        f"cancellation of workflow {workflow_id!r} requested; its engine carries it out",
        markup=False,
        highlight=False,
    )


ReasonOption = Annotated[
    str, typer.Option("--reason", help="Why: recorded with the action (required).")
]
ActorOption = Annotated[
    str | None, typer.Option(help="Who: recorded with the action (default: user@host).")
]
SeqOption = Annotated[
    int | None,
    typer.Option(min=1, help="Which step (its seq), when several wait for an operator."),
]


def _operated(action: str, workflow_id: str, seq: int) -> None:
    out.print(
        f"{action} step {seq} of workflow {workflow_id!r}; its engine carries on",
        markup=False,
        highlight=False,
    )


def _reason(reason: str) -> str:
    if not reason.strip():
        _fail("--reason is required: say why (it is recorded with the action)")
    return reason


@workflows_app.command("retry")
def workflows_retry(
    workflow_id: IdArgument,
    reason: ReasonOption = "",
    actor: ActorOption = None,
    seq: SeqOption = None,
    db: DbOption = DEFAULT_DB,
) -> None:
    """Try a step parked after its attempts (or waiting out a long backoff) again
    now, with a fresh set of attempts."""
    why = _reason(reason)
    done = _call(db, lambda c: c.retry_step(workflow_id, reason=why, actor=actor, seq=seq))
    _operated("retrying", workflow_id, done)


@workflows_app.command("resume")
def workflows_resume(
    workflow_id: IdArgument,
    reason: ReasonOption = "",
    actor: ActorOption = None,
    db: DbOption = DEFAULT_DB,
) -> None:
    """Take up a stuck instance again (once code that can replay its history is
    deployed): a worker runs it from where it stopped."""
    why = _reason(reason)
    _call(db, lambda c: c.resume(workflow_id, reason=why, actor=actor))
    out.print(
        f"resumed workflow {workflow_id!r}; a worker takes it up", markup=False, highlight=False
    )


@workflows_app.command("skip")
def workflows_skip(
    workflow_id: IdArgument,
    result: Annotated[
        str, typer.Option(help="The step's result, as JSON (it must fit its return type).")
    ] = "null",
    reason: ReasonOption = "",
    actor: ActorOption = None,
    seq: SeqOption = None,
    db: DbOption = DEFAULT_DB,
) -> None:
    """Skip a parked step: record RESULT as what it returned, and go on."""
    why = _reason(reason)
    value = _json_option(result, "--result")
    done = _call(db, lambda c: c.skip_step(workflow_id, value, reason=why, actor=actor, seq=seq))
    _operated("skipped", workflow_id, done)


@workflows_app.command("compensate")
def workflows_compensate(
    workflow_id: IdArgument,
    reason: ReasonOption = "",
    actor: ActorOption = None,
    seq: SeqOption = None,
    db: DbOption = DEFAULT_DB,
) -> None:
    """Give a parked step up: it fails where the workflow awaits it, which then
    fails and compensates the steps it completed (unless its code handles it)."""
    why = _reason(reason)
    done = _call(db, lambda c: c.compensate(workflow_id, reason=why, actor=actor, seq=seq))
    _operated("gave up", workflow_id, done)


# -- workers --------------------------------------------------------------------------

_STATE_STYLE = {"alive": "green", "stopping": "yellow", "late": "red"}


def _seconds(delta: timedelta) -> float:
    return round(delta.total_seconds(), 3)


@workers_app.command("list")
def workers_list(
    db: DbOption = DEFAULT_DB,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per worker, one per line.")
    ] = False,
) -> None:
    """List the registered workers: alive, stopping (shutting down gracefully) or late
    (no heartbeat within their lease: an engine reaps them and their instances
    resume elsewhere). Ages are on the database's clock."""
    workers: list[WorkerInfo] = _call(db, lambda e: e.workers())
    if as_json:
        for w in workers:
            record = {
                "id": w.worker_id,
                "host": w.host,
                "pid": w.pid,
                "queues": w.queues,
                "workflows": w.workflows,
                "version": w.version,
                "started_at": w.started_at,
                "last_heartbeat": w.last_heartbeat,
                "heartbeat_age_s": _seconds(w.heartbeat_age),
                "lease_s": _seconds(w.lease),
                "in_flight": w.in_flight,
                "stopping": w.stopping,
                "alive": w.alive,
                "state": w.state,
            }
            typer.echo(msgspec.json.encode(record).decode())
        return
    if not workers:
        out.print("no workers registered")
        return
    # Host and pid are in the id (host:pid:tag) and in --json: nine columns were
    # folded into two characters each on an 80-column terminal.
    table = Table()
    table.add_column("id", overflow="fold")
    table.add_column("queues", overflow="fold")
    table.add_column("workflows", overflow="fold", min_width=9)
    table.add_column("version", no_wrap=True)
    table.add_column("heartbeat", no_wrap=True, justify="right")
    table.add_column("running", no_wrap=True, justify="right")
    table.add_column("state", no_wrap=True)
    for w in workers:
        # A heartbeat a little ahead of the reading (clock offsets) shows as 0 s.
        age = max(0.0, w.heartbeat_age.total_seconds())
        table.add_row(
            escape(w.worker_id),
            escape(", ".join(w.queues)) or "-",
            escape(", ".join(w.workflows)) or "-",
            escape(w.version),
            f"{age:.1f}s ago",
            str(w.in_flight),
            f"[{_STATE_STYLE[w.state]}]{w.state}[/]",
        )
    out.print(table)


@queues_app.command("list")
def queues_list(
    db: DbOption = DEFAULT_DB,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per queue, one per line.")
    ] = False,
) -> None:
    """List the task queues that hold tasks or have a limit: tasks ready for a
    worker, scheduled later (retries in backoff), running, and the limit."""
    queues: list[QueueInfo] = _call(db, lambda e: e.task_queues())
    if as_json:
        for q in queues:
            record = {
                "queue": q.queue,
                "max_concurrent": q.max_concurrent,
                "ready": q.ready,
                "scheduled": q.scheduled,
                "running": q.running,
            }
            typer.echo(msgspec.json.encode(record).decode())
        return
    if not queues:
        out.print("no task queues")
        return
    table = Table()
    table.add_column("queue", overflow="fold")
    for column in ("ready", "scheduled", "running", "limit"):
        table.add_column(column, no_wrap=True, justify="right")
    for q in queues:
        limit = "-" if q.max_concurrent is None else str(q.max_concurrent)
        table.add_row(escape(q.queue), str(q.ready), str(q.scheduled), str(q.running), limit)
    out.print(table)


@queues_app.command("limit")
def queues_limit(
    queue: Annotated[str, typer.Argument(help="The task queue.")],
    max_concurrent: Annotated[
        str,
        typer.Argument(
            help="Most tasks of the queue running at once across all workers, or 'none'."
        ),
    ],
    db: DbOption = DEFAULT_DB,
) -> None:
    """Bound how many tasks of a queue run at once, across every worker on the
    database (e.g. what an external system can take). Workers apply it at once."""
    if max_concurrent.lower() == "none":
        limit: int | None = None
    else:
        try:
            limit = int(max_concurrent)
        except ValueError:
            _fail(f"max_concurrent must be a whole number >= 1 or 'none', not {max_concurrent!r}")
        if limit < 1:
            _fail(f"max_concurrent must be >= 1 or 'none', not {limit}")
    _call(db, lambda e: e.set_queue_limit(queue, limit))
    shown = "no limit" if limit is None else f"at most {limit} running at once"
    out.print(f"queue {escape(queue)}: {shown}")


# -- policies -------------------------------------------------------------------------


def _setting(pair: str) -> tuple[str, Any]:
    """``retry.max_attempts=10`` as (key, value): the value read as JSON (numbers,
    true/false, null, lists), else taken as text; a list field also takes
    comma-separated text (``retry.non_retryable=ValueError,KeyError``)."""
    key, sep, text = pair.partition("=")
    if not sep or not key.strip():
        _fail(f"a setting is key=value (e.g. retry.max_attempts=10), not {pair!r}")
    key = key.strip()
    try:
        value: Any = json.loads(text, parse_constant=_not_json)
    except ValueError:
        value = text
    except RecursionError:
        _fail(f"{key}: nested too deeply to read")
    if key.endswith("non_retryable") and isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    return key, value


def _policy_json(version: PolicyVersion) -> dict[str, Any]:
    return {
        "name": version.name,
        "version": version.version,
        "at": version.at.astimezone(UTC).isoformat(),
        "actor": version.actor,
        "reason": version.reason,
        "changes": list(version.changes),
        "policy": policy_document(version.policy, full=True),
    }


def _sections(policy: Policy) -> str:
    present = [
        f for f in ("retry", "timeout", "breaker", "bulkhead", "rate_limit") if getattr(policy, f)
    ]
    shown = ", ".join(present) if present else "(defaults)"
    return f"{shown}; on_exhausted={policy.on_exhausted}"


@policy_app.command("list")
def policy_list(
    db: DbOption = DEFAULT_DB,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per policy, one per line.")
    ] = False,
) -> None:
    """List the named policies and the version of each in force."""
    versions: list[PolicyVersion] = _call(db, lambda c: c.policies.list())
    if as_json:
        for v in versions:
            typer.echo(msgspec.json.encode(_policy_json(v)).decode())
        return
    if not versions:
        out.print("no policies")
        return
    table = Table()
    table.add_column("policy", overflow="fold")
    table.add_column("version", justify="right")
    table.add_column("changed (UTC)", no_wrap=True)
    table.add_column("by", overflow="fold")
    table.add_column("sections", overflow="fold")
    for v in versions:
        table.add_row(
            escape(v.name),
            str(v.version),
            _time(v.at),
            escape(v.actor),
            escape(_sections(v.policy)),
        )
    out.print(table)


async def _policy_at(client: WorkflowClient, name: str, version: int | None) -> PolicyVersion:
    if version is None:
        return await client.policies.get(name)
    for found in await client.policies.history(name):
        if found.version == version:
            return found
    _fail(f"policy {name!r} has no version {version}")


@policy_app.command("show")
def policy_show(
    name: PolicyArgument,
    db: DbOption = DEFAULT_DB,
    version: Annotated[
        int | None, typer.Option(min=1, help="An earlier version (default: the one in force).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="As one JSON object.")] = False,
) -> None:
    """Show a policy: every field, defaults included, and who set it and why."""
    found = _call(db, lambda c: _policy_at(c, name, version))
    if as_json:
        typer.echo(msgspec.json.encode(_policy_json(found)).decode())
        return
    _line("policy", found.name)
    _line("version", found.version)
    _line("changed", f"{_time(found.at)} UTC by {found.actor}")
    _line("reason", found.reason)
    out.print(
        json.dumps(policy_document(found.policy, full=True), indent=2),
        markup=False,
        highlight=False,
    )


@policy_app.command("history")
def policy_history(
    name: PolicyArgument,
    db: DbOption = DEFAULT_DB,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per version, one per line.")
    ] = False,
) -> None:
    """Every version of a policy, oldest first: when, who, why and what changed."""
    versions: list[PolicyVersion] = _call(db, lambda c: c.policies.history(name))
    if as_json:
        for v in versions:
            typer.echo(msgspec.json.encode(_policy_json(v)).decode())
        return
    table = Table()
    table.add_column("version", justify="right")
    table.add_column("at (UTC)", no_wrap=True)
    table.add_column("by", overflow="fold")
    table.add_column("reason", overflow="fold")
    table.add_column("changes", overflow="fold")
    for v in versions:
        table.add_row(
            str(v.version),
            _time(v.at),
            escape(v.actor),
            escape(v.reason),
            escape("\n".join(v.changes) or "-"),
        )
    out.print(table)


@policy_app.command("set")
def policy_set(
    name: PolicyArgument,
    settings: Annotated[
        list[str] | None,
        typer.Argument(
            help="Fields to change, as key=value: retry.max_attempts=10, "
            "breaker.open_for=60, rate_limit.rate=5, bulkhead=null (removes a section)."
        ),
    ] = None,
    reason: Annotated[
        str, typer.Option("--reason", help="Why: recorded with the change (required).")
    ] = "",
    actor: Annotated[
        str | None, typer.Option(help="Who: recorded with the change (default: user@host).")
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file", help="Replace the whole document with this JSON file (then key=value)."
        ),
    ] = None,
    db: DbOption = DEFAULT_DB,
) -> None:
    """Change a policy (creating it if new). The document is checked first: a wrong
    field is refused, naming it, and the version in force stays. Running workers
    use the new version within a second, from their next attempt."""
    if not reason.strip():
        _fail("--reason is required: say why (it is recorded with the change)")
    pairs = dict(_setting(p) for p in settings or ())
    if file is None and not pairs:
        _fail("nothing to set: give key=value settings or --file")
    document: dict[str, Any] | None = None
    if file is not None:
        try:
            document = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            _fail(f"cannot read {file}: {exc}")

    known: list[str] = []

    async def change(client: WorkflowClient) -> PolicyVersion:
        book = client.policies
        known.extend(p.name for p in await book.list())
        if document is not None:
            base = check_policy(name, document)
            if not pairs:
                return await book.set(name, base, reason=reason, actor=actor)
            return await book.set(
                name, with_settings(name, base, pairs), reason=reason, actor=actor
            )
        return await book.update(name, pairs, reason=reason, actor=actor, create=True)

    found = _call(db, change)
    out.print(f"policy {escape(name)}: version {found.version} in force", highlight=False)
    for line in found.changes:
        out.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
    if name not in known:
        # A typo makes a new policy that no step uses: say so, naming the others.
        others = ", ".join(sorted(known)) or "none"
        err.print(
            f"note: there was no policy {name!r}: this created it (the others: {others})",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


# -- guarded resources -----------------------------------------------------------------


async def _resources(client: WorkflowClient) -> list[ResourceRow]:
    """As of the database's clock: permits past their expiry are not counted."""
    now = await client.store.database_now_us()
    return await client.store.list_resources(now_us=now)


@resources_app.command("list")
def resources_list(
    db: DbOption = DEFAULT_DB,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per resource, one per line.")
    ] = False,
) -> None:
    """The resources named policies guard, with the state every worker shares: the
    circuit breaker (and since when), failures in a row, failed/calls in its window,
    the tokens its bucket held at the last take, the bulkhead permits held."""
    rows = _call(db, _resources)
    if as_json:
        for r in rows:
            typer.echo(
                msgspec.json.encode(
                    {
                        "resource": r.resource,
                        "breaker": r.state,
                        "since": None
                        if not r.changed_at_us
                        else from_micros(r.changed_at_us).isoformat(),
                        "moves": r.transitions,
                        "failures_in_a_row": r.consecutive,
                        "window_calls": r.window_calls,
                        "window_failures": r.window_failures,
                        "tokens_at_last_take": r.tokens,
                        "permits_held": r.permits,
                    }
                ).decode()
            )
        return
    if not rows:
        out.print("no guarded resources have state yet")
        return
    table = Table()
    table.add_column("resource", no_wrap=True, min_width=8)
    table.add_column("breaker", no_wrap=True)
    table.add_column("since (UTC)", overflow="fold")
    for column in ("in a row", "failed/calls", "tokens", "permits"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in rows:
        since = _time(from_micros(r.changed_at_us)) if r.changed_at_us else "-"
        tokens = "-" if r.tokens is None else f"{r.tokens:.1f}"
        window = f"{r.window_failures}/{r.window_calls}"
        table.add_row(
            escape(r.resource), r.state, since, str(r.consecutive), window, tokens, str(r.permits)
        )
    out.print(table)


@resources_app.command("history")
def resources_history(
    resource: Annotated[str, typer.Argument(help="The resource (its policy's name).")],
    db: DbOption = DEFAULT_DB,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per move, one per line.")
    ] = False,
) -> None:
    """Every move of the resource's circuit breaker, oldest first: when, from what to
    what, why, and whose call tripped it."""

    async def moves(client: WorkflowClient) -> list[RecordedEvent]:
        try:
            return await client.store.read_stream(f"breaker-{resource}")
        except StreamNotFoundError:
            return []

    events = _call(db, moves)
    if as_json:
        for event in events:
            record = {"version": event.version, "at": event.recorded_at.isoformat()}
            record.update(msgspec.to_builtins(event.data))
            typer.echo(msgspec.json.encode(record).decode())
        return
    if not events:
        out.print(f"the breaker of {escape(resource)} never moved")
        return
    table = Table()
    table.add_column("v", justify="right")
    table.add_column("at (UTC)", no_wrap=True)
    table.add_column("move", no_wrap=True)
    table.add_column("why", overflow="fold")
    table.add_column("tripped by", overflow="fold")
    for event in events:
        moved = msgspec.to_builtins(event.data)
        table.add_row(
            str(event.version),
            _time(event.recorded_at),
            f"{moved.get('previous')} -> {moved.get('state')}",
            escape(str(moved.get("reason", ""))),
            escape(str(moved.get("workflow_id") or "-")),
        )
    out.print(table)


# -- state machines ----------------------------------------------------------------------


@app.command("verify")
def verify_command(
    target: Annotated[str, typer.Argument(help="The definition: module:attribute (a Machine).")],
    max_configurations: Annotated[
        int, typer.Option(min=1, help="Stop exploring after this many configurations.")
    ] = 1_000_000,
    as_json: Annotated[bool, typer.Option("--json", help="The report as one JSON object.")] = False,
    fairness: Annotated[
        str | None,
        typer.Option(
            help="What liveness properties assume: none (any run) or strong (a "
            "transition enabled again and again is taken some day). Default: the "
            "machine's own (Machine(fairness=...))."
        ),
    ] = None,
    sample: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Draw this many values (hypothesis) for each payload field without a "
            "finite domain, instead of leaving it unexplored; the report then covers a "
            "sample of them. Default: the machine's own (Machine(sample=...)).",
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="The seed of --sample's draw (the same values again).")
    ] = None,
) -> None:
    """Verify a state-machine definition before it runs: every reachable
    configuration explored, each finding with the events that lead there. Exit 0
    sound, 1 findings (or exploration cut short), 2 error."""
    machines = _machines(target)
    if fairness not in (None, "none", "strong"):
        _fail(f"--fairness must be none or strong, not {fairness!r}")
    # Every version named: an engine refuses a list with an unsound one, so verify
    # says so too (it checked only the newest before).
    reports = []
    errors: list[tuple[Any, LedgerflowError]] = []
    for machine in machines:
        try:
            # All that registration refuses, start values included (verify_machine
            # explores a field's whole domain where no start value is given).
            machine.check()
            reports.append(
                verify_machine(
                    machine,
                    max_configurations=max_configurations,
                    fairness="strong" if fairness == "strong" else ("none" if fairness else None),
                    sample=sample,
                    seed=seed,
                )
            )
        except LedgerflowError as exc:
            # The other versions are verified all the same: their reports were lost
            # behind the one error.
            errors.append((machine, exc))
    for report in reports:
        _print_report(report, as_json)
    for machine, problem in errors:
        if as_json:  # what a tool reads, with the reports
            error = {"machine": machine.name, "version": machine.version, "error": str(problem)}
            typer.echo(msgspec.json.encode(error).decode())
        else:
            said = f"{machine.name} v{machine.version}: {problem}"
            err.print(f"[red]error:[/] {escape(said)}", soft_wrap=True)
    if errors:
        raise typer.Exit(2)
    if not all(report.ok for report in reports):
        raise typer.Exit(1)


def _print_report(report: Any, as_json: bool) -> None:
    if as_json:
        typer.echo(
            msgspec.json.encode(
                {
                    "machine": report.machine,
                    "version": report.version,
                    "ok": report.ok,
                    "configurations": report.configurations,
                    "bounded": report.bounded,
                    "fairness": report.fairness,
                    "sampled": report.sampled,
                    "notes": list(report.notes),
                    "findings": [
                        {
                            "kind": str(f.kind),
                            "subject": f.subject,
                            "message": f.message,
                            "start": f.start,
                            "trace": list(f.trace),
                        }
                        for f in report.findings
                    ],
                }
            ).decode()
        )
        return
    verdict = (
        "[green]sound[/]"
        if report.ok
        else "[yellow]not proven[/]: exploration cut short"
        if report.bounded and not report.findings
        else "[red]NOT SOUND[/]"
    )
    out.print(
        f"{escape(report.machine)} v{report.version}: {verdict} "
        f"({report.configurations} configurations explored)"
    )
    for note in report.notes:
        out.print(f"  note: {note}", markup=False, highlight=False, soft_wrap=True)
    for finding in report.findings:
        out.print(f"  - {finding}", markup=False, highlight=False, soft_wrap=True)


@app.command("diagram")
def diagram_command(
    target: Annotated[
        str | None,
        typer.Argument(
            help="The definition: module:attribute (a Machine). Leave it out with "
            "--instance to draw a code-first workflow's history."
        ),
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="mermaid (stateDiagram-v2) or dot (Graphviz).")
    ] = "mermaid",
    current: Annotated[
        str | None, typer.Option(help="A state to highlight (an instance's current one).")
    ] = None,
    instance: Annotated[
        str | None,
        typer.Option(
            help="An instance (with --db): its current state, the states it went "
            "through and the transitions it took are highlighted; without TARGET, a "
            "code-first workflow's steps, signals and timers as its history shows them."
        ),
    ] = None,
    db: DbOption = DEFAULT_DB,
) -> None:
    """Print a state machine (or an instance's history) as a diagram: Mermaid or
    Graphviz DOT source."""
    if fmt not in ("mermaid", "dot"):
        _fail(f"--format must be mermaid or dot, not {fmt!r}")
    if target is None:
        if instance is None:
            _fail("name a state machine (module:attribute), or an --instance to draw")
        events = _call(db, lambda c: c.history(instance))
        draw_history = history_mermaid if fmt == "mermaid" else history_dot
        typer.echo(draw_history(events), nl=False)
        return
    machines = _machines(target)
    machine = machines[-1]
    taken: tuple[str, ...] = ()
    visited: tuple[str, ...] = ()
    if instance is not None:
        state = _call(db, lambda c: c.machine_state(instance), machines)
        machine = next(m for m in machines if m.version == state.version)
        current, taken, visited = current or state.state, state.path, state.visited
    if current is not None and not all(s in machine.states for s in current.split("+")):
        _fail(f"--current: machine {machine.name!r} has no state {current!r}")
    draw = mermaid if fmt == "mermaid" else dot
    typer.echo(draw(machine, current=current, path=visited, taken=taken), nl=False)


def _machines(target: str) -> list[Machine]:
    """The machines named by ``module:attribute`` (one, a list of versions, or a
    function returning either), oldest version first."""
    found = _attribute(target, "a state machine")
    if inspect.isfunction(found):  # a function returning the machine (or its versions)
        try:
            found = found()
        except Exception as exc:  # noqa: BLE001 - the app's code failed: said, no traceback
            _fail(f"{target!r}: calling it failed: {type(exc).__name__}: {exc}")
    listed = found if isinstance(found, list | tuple) else [found]
    if not listed or not all(isinstance(m, Machine) for m in listed):
        _fail(f"{target!r}: expected a state machine (ledgerflow.Machine) or a list of them")
    return sorted(listed, key=lambda m: m.version)


AppOption = Annotated[
    str,
    typer.Option(
        "--app",
        envvar="LEDGERFLOW_APP",
        help="The machine: module:attribute (a Machine, or a list of its versions). "
        "Env LEDGERFLOW_APP.",
    ),
]


def _show_state(state: MachineState) -> None:
    _line("instance", state.instance_id)
    _line("machine", f"{state.machine} v{state.version}")
    _line("status", state.status)
    _line("state", state.state + (f" (processing {state.pending!r})" if state.pending else ""))
    _line("accepts", ", ".join(state.accepts) or "-")
    _line("data", _compact(state.data))
    if state.results:
        _line("results", _compact(state.results))
    _line("path", " -> ".join(state.path))


@machines_app.command("show")
def machines_show(
    instance_id: IdArgument,
    app_target: AppOption,
    db: DbOption = DEFAULT_DB,
    as_json: Annotated[bool, typer.Option("--json", help="As one JSON object.")] = False,
) -> None:
    """Where a state-machine instance is: its state, the events it accepts, its data,
    the transitions it took."""
    machines = _machines(app_target)
    state = _call(db, lambda c: c.machine_state(instance_id), machines)
    if as_json:
        typer.echo(msgspec.json.encode(state).decode())
        return
    _show_state(state)


@machines_app.command("send")
def machines_send(
    instance_id: IdArgument,
    event: Annotated[str, typer.Argument(help="The event's name.")],
    app_target: AppOption,
    db: DbOption = DEFAULT_DB,
    payload: Annotated[
        str | None, typer.Option(help="The event's payload: a JSON object of its fields.")
    ] = None,
    actor: ActorOption = None,
    reason: Annotated[str | None, typer.Option(help="Why: recorded with the event.")] = None,
    timeout: Annotated[
        float, typer.Option(min=0.0, help="Seconds to wait for the transition to run.")
    ] = 30.0,
) -> None:
    """Send an event to a state-machine instance and wait for its transition. Exit 0
    moved, 1 refused (the state does not accept it: nothing recorded) or its
    activity failed, 2 error (also: not sent, the instance still busy with an earlier
    event after --timeout, nothing recorded; or accepted, but not run within it)."""
    machines = _machines(app_target)
    fields: Any = None if payload is None else _json_option(payload, "--payload")

    async def send(client: WorkflowClient) -> MachineState:
        try:
            return await client.execute(
                instance_id, event, fields, actor=actor, reason=reason, timeout=timeout
            )
        except (InvalidTransition, TransitionFailedError) as exc:
            _refused(exc)
        except InstanceBusyError as exc:
            _fail(str(exc))
        except TimeoutError:
            _fail(
                f"{event!r} was accepted but its transition has not run within {timeout:g}s; "
                "it will: see `ledgerflow machines show`"
            )

    _show_state(_call(db, send, machines))


def _refused(exc: InvalidTransition | TransitionFailedError) -> NoReturn:
    err.print(f"[red]refused:[/] {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(1)


@machines_app.command("migrate")
def machines_migrate(
    instance_id: IdArgument,
    app_target: AppOption,
    to: Annotated[int, typer.Option("--to", min=1, help="The version to move it to.")],
    reason: ReasonOption,
    db: DbOption = DEFAULT_DB,
    rename: Annotated[
        list[str] | None,
        typer.Option(
            "--state", help="old=new: a state of its version renamed in the new one (repeat)."
        ),
    ] = None,
    actor: ActorOption = None,
) -> None:
    """Move a running instance to another version of its machine, checked first (its
    states exist there, it can still complete, its completed activities can still be
    compensated). Nothing is recorded if a check fails (exit 2)."""
    machines = _machines(app_target)
    states: dict[str, str] = {}
    for pair in rename or ():
        old, sep, new = pair.partition("=")
        if not sep or not old or not new:
            _fail(f"--state {pair!r}: expected old=new")
        states[old] = new
    state = _call(
        db,
        lambda c: c.migrate(instance_id, to, states=states, actor=actor, reason=_reason(reason)),
        machines,
    )
    _show_state(state)


# -- projections ---------------------------------------------------------------------


ProjectionArgument = Annotated[str, typer.Argument(help="The projection's name.")]


def _status_json(found: Any) -> dict[str, Any]:
    failure = found.failure
    return {
        "name": found.name,
        "position": found.position,
        "head": found.head,
        "behind": found.behind,
        "seconds_behind": found.seconds_behind,
        "owner": found.owner,
        "generation": found.generation,
        "rebuild": None if found.rebuild is None else dataclasses.asdict(found.rebuild),
        "failure": None if failure is None else dataclasses.asdict(failure),
    }


@projections_app.command("list")
def projections_list(
    db: DbOption = DEFAULT_DB,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Every projection: its checkpoint, how far behind the log it is, its runner,
    and the event it is stopped at, if any."""
    from .projections import operations

    found = _call(db, lambda c: operations.status(c.store))
    if as_json:
        for item in found:
            typer.echo(json.dumps(_status_json(item)))
        return
    table = Table(title=f"projections of {db}")
    for column in ("name", "position", "behind", "seconds behind", "runner", "state"):
        table.add_column(column, overflow="fold")
    for item in found:
        failure = item.failure
        state = (
            "running"
            if failure is None
            else f"STOPPED at {failure.position}: {failure.error_type}: {failure.message}"
        )
        if item.rebuild is not None:
            state += (
                f"; rebuilding generation {item.rebuild.generation} "
                f"({item.rebuild.position}/{item.head})"
            )
        table.add_row(
            escape(item.name),
            str(item.position),
            str(item.behind),
            f"{item.seconds_behind:g}",
            escape(item.owner or "-"),
            escape(state),
        )
    out.print(table)


@projections_app.command("status")
def projections_status(name: ProjectionArgument, db: DbOption = DEFAULT_DB) -> None:
    """One projection's checkpoint, lag, runner and failure, as JSON."""
    from .projections import operations

    (found,) = _call(db, lambda c: operations.status(c.store, name))
    typer.echo(json.dumps(_status_json(found)))


@projections_app.command("retry")
def projections_retry(
    name: ProjectionArgument,
    db: DbOption = DEFAULT_DB,
    reason: Annotated[str | None, typer.Option(help="Why: recorded with the action.")] = None,
    actor: ActorOption = None,
) -> None:
    """Try the event a projection stopped at again (recorded in projection-NAME)."""
    from .projections import operations

    failure = _call(db, lambda c: operations.retry(c.store, name, actor=actor, reason=reason))
    out.print(
        f"projection {name!r}: the event at position {failure.position} is tried again",
        markup=False,
        highlight=False,
    )


@projections_app.command("skip")
def projections_skip(
    name: ProjectionArgument,
    reason: ReasonOption,
    db: DbOption = DEFAULT_DB,
    position: Annotated[
        int | None, typer.Option(min=1, help="The failed event's position, to be sure.")
    ] = None,
    actor: ActorOption = None,
) -> None:
    """Move a stopped projection past the event it failed at, with a reason (recorded
    in projection-NAME with who and the event); the event is not applied."""
    from .projections import operations

    why = _reason(reason)
    failure = _call(
        db,
        lambda c: operations.skip(c.store, name, reason=why, actor=actor, position=position),
    )
    out.print(
        f"projection {name!r}: skipped {failure.event_type} {failure.event_id} at position "
        f"{failure.position} ({failure.error_type}); it goes on after it",
        markup=False,
        highlight=False,
    )


@projections_app.command("rebuild")
def projections_rebuild(
    name: ProjectionArgument,
    reason: ReasonOption,
    db: DbOption = DEFAULT_DB,
    actor: ActorOption = None,
) -> None:
    """Build a projection's read model anew from position 0 into fresh tables, while
    its runner goes on; queries read the old tables until the new ones have caught up
    and are swapped in (recorded in projection-NAME with who and why)."""
    from .projections import operations

    why = _reason(reason)
    planned = _call(db, lambda c: operations.rebuild(c.store, name, reason=why, actor=actor))
    out.print(
        f"projection {name!r}: rebuilding into generation {planned.generation}; its runner "
        "swaps it in once caught up",
        markup=False,
        highlight=False,
    )


@projections_app.command("query")
def projections_query(
    table_name: Annotated[str, typer.Argument(help="The table (of the projection of --app).")],
    app_target: Annotated[
        str,
        typer.Option(
            "--app",
            envvar="LEDGERFLOW_APP",
            help="The projection: module:attribute (a Projection). Env LEDGERFLOW_APP.",
        ),
    ],
    db: DbOption = DEFAULT_DB,
    where: Annotated[
        list[str] | None, typer.Option(help="column=value (JSON values; repeat for AND).")
    ] = None,
    order_by: Annotated[str | None, typer.Option(help="The column to order by.")] = None,
    desc: Annotated[bool, typer.Option(help="Descending order.")] = False,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per row.")] = False,
) -> None:
    """Rows of a read-model table, as the projection last committed them."""
    from .projections import Projection, ReadModel

    projection = _named(app_target, Projection, "a projection (ledgerflow.Projection)")
    conditions: dict[str, Any] = {}
    for pair in where or ():
        column, sep, raw = pair.partition("=")
        if not sep or not column:
            _fail(f"--where {pair!r}: expected column=value")
        if column in conditions:  # the same column twice: one of them was dropped
            _fail(f"--where {pair!r}: {column} is given twice (one value per column)")
        try:
            conditions[column] = json.loads(raw, parse_constant=_not_json)
        except ValueError:
            conditions[column] = raw  # a bare word: a string
        except RecursionError:
            _fail(f"--where {pair[:40]!r}...: nested too deeply to read")
    if table_name not in projection.tables:
        _fail(f"projection {projection.name!r} has no table {table_name!r}")

    async def query(client: WorkflowClient) -> list[dict[str, Any]]:
        return await ReadModel(client.store, projection).select(
            table_name, where=conditions, order_by=order_by, descending=desc, limit=limit
        )

    rows = _call(db, query)
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    spec = projection.tables[table_name]
    table = Table(title=f"{projection.name}.{table_name}: {len(rows)} row(s)")
    for column in spec.columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row[c]) for c in spec.columns))

    out.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return escape(value if isinstance(value, str) else _compact(value))


def _attribute(target: str, what: str) -> Any:
    """What ``module:attribute`` names (modules of the current directory too)."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        _fail(f"{target!r}: expected module:attribute naming {what}")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        _fail(f"{target!r}: cannot import {module_name!r}: {exc}")
    except Exception as exc:  # noqa: BLE001 - the app's code failed: said, no traceback
        _fail(f"{target!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}")
    if not hasattr(module, attribute):
        _fail(f"{target!r}: module {module_name!r} has no {attribute!r}")
    return getattr(module, attribute)


def _named(target: str, kind: type[T], what: str) -> T:
    """The object ``module:attribute`` names, which must be a ``kind``."""
    found = _attribute(target, what)
    if not isinstance(found, kind):
        _fail(f"{target!r}: expected {what}")
    return found


MetricsPortOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=65535,
        envvar="LEDGERFLOW_METRICS_PORT",
        help="Serve Prometheus metrics at http://<host>:PORT/metrics "
        "(env LEDGERFLOW_METRICS_PORT).",
    ),
]
MetricsHostOption = Annotated[str, typer.Option(help="The address the metrics listen on.")]
_ANY_HOST = "0.0.0.0"  # noqa: S104 - scraped from other hosts; bind narrower if you like


def _serve_metrics(port: int | None, host: str) -> float | None:
    """Serve this process's metrics on ``port`` (if given); how often the store's
    gauges are then to be read (None: not served, or LEDGERFLOW_METRICS=0)."""
    if port is None:
        return None
    from prometheus_client import start_http_server

    from . import metrics

    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        _fail(f"--metrics-port {port}: {exc.strerror or exc}")
    return 15.0 if metrics.enabled() else None


@app.command("relay")
def relay_command(
    db: DbOption = DEFAULT_DB,
    nats: Annotated[
        str | None,
        typer.Option(
            envvar="LEDGERFLOW_NATS",
            help="NATS URL (JetStream). Env LEDGERFLOW_NATS. Required.",
        ),
    ] = None,
    stream: Annotated[str, typer.Option(help="The JetStream stream to store into.")] = "LEDGERFLOW",
    subject: Annotated[
        str,
        typer.Option(help="Subject template: {category}, {type}, {stream}."),
    ] = "ledgerflow.{category}.{type}",
    event_type: Annotated[
        list[str] | None,
        typer.Option("--type", help="An event type to publish (repeat; none: every type)."),
    ] = None,
    prefix: Annotated[
        str | None, typer.Option(help="Only events of streams whose id starts with this.")
    ] = None,
    name: Annotated[
        str,
        typer.Option(
            help="The relay's name (its checkpoint, the projection relay_<name>): "
            "lower-case letters, digits and single _, at most 18 characters."
        ),
    ] = "main",
    metrics_port: MetricsPortOption = None,
    metrics_host: MetricsHostOption = _ANY_HOST,
) -> None:
    """Publish the ledger's events to NATS JetStream until SIGTERM or Ctrl-C: one relay
    of a name at a time across processes, each stream in order, the event id as the
    message id; a crash publishes again, and JetStream keeps one copy."""
    import itertools
    import logging
    import signal

    from ._waiting import cancel_and_wait
    from .bus import JetStreamBus, Relay, Route
    from .gauges import StoreGauges
    from .projections import Projection

    if not nats:
        _fail("--nats (or LEDGERFLOW_NATS) names the NATS server, e.g. nats://127.0.0.1:4222")
    _configure_logs()
    try:
        route = Route(subject=subject, types=tuple(event_type or ()), stream_prefix=prefix)
    except LedgerflowError as exc:
        _fail(f"--subject {subject!r}: {exc}")
    # The stream takes the tokens before the first one filled in, and anything after
    # them ('ledgerflow.x{type}' is 'ledgerflow.>', not 'ledgerflow.x.>').
    literal = list(itertools.takewhile(lambda t: "{" not in t, subject.split(".")))
    if "{" in subject and not literal:
        _fail(
            f"--subject {subject!r}: begin it with a token of its own before any "
            "placeholder (e.g. 'ledgerflow.{stream}'): the stream's subjects are those "
            "tokens and '>'"
        )
    subjects = [".".join([*literal, ">"])] if "{" in subject else [subject]
    try:
        bus = JetStreamBus(nats, stream=stream, subjects=subjects)
    except LedgerflowError as exc:
        _fail(f"--stream {stream!r} / --subject {subject!r}: {exc}")
    try:
        Projection(f"relay_{name}")  # a name that cannot be one is refused here, at once
    except LedgerflowError as exc:
        _fail(f"{exc} (--name {name!r}: at most 18 characters, a-z, 0-9 and single _)")
    gauges_every = _serve_metrics(metrics_port, metrics_host)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            async with open_store(db, create=False) as store:
                relay = Relay(store, bus, [route], name=name)
                # The relay starts before the broker answers: its row (and so its lag,
                # in `projections list` and the metrics) is there while the broker is
                # down, and its batches back off until the bus is open.
                relay.start()
                opening = asyncio.create_task(_open_bus(bus, name))
                gauges = None if gauges_every is None else StoreGauges(store, every=gauges_every)
                if gauges is not None:
                    gauges.start()
                logging.getLogger("ledgerflow.bus").info(
                    "relay %s: %s -> %s (stream %s)", name, db, nats, stream
                )
                stopping = asyncio.create_task(stop.wait())
                try:
                    await asyncio.wait([stopping, opening], return_when=asyncio.FIRST_COMPLETED)
                    if opening.done() and opening.exception() is not None:
                        # The stream cannot be used as configured: nothing would ever
                        # be published. Said once, and the process ends (it said
                        # nothing and ran on, publishing nothing).
                        raise opening.exception()  # type: ignore[misc]
                    await stopping
                finally:
                    await cancel_and_wait([opening, stopping])
                    if gauges is not None:
                        await gauges.stop()
                    await relay.stop()
        finally:
            await bus.close()

    _run(run)


async def _open_bus(bus: Any, name: str) -> None:
    """Open the relay's bus, trying again while the broker is out of reach; a
    stream it cannot use (``ConfigurationError``) ends the wait."""
    import logging

    delay = 0.5
    while True:
        try:
            await bus.open()
            return
        except BusUnavailableError as exc:
            logging.getLogger("ledgerflow.bus").warning(
                "relay %s: %s; trying again in %.1f s", name, exc, delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


@app.command("replay-check")
def replay_check_command(
    app_target: Annotated[
        str,
        typer.Option(
            "--app",
            envvar="LEDGERFLOW_APP",
            help="The code about to be deployed: module or module:attribute, as for "
            "`ledgerflow worker`.",
        ),
    ],
    db: DbOption = DEFAULT_DB,
    sample: Annotated[
        int | None,
        typer.Option(min=1, help="Replay this many instances, drawn at random (default: all)."),
    ] = None,
    status: Annotated[
        list[str] | None,
        typer.Option(
            "--status",
            help="Instances in this status (repeatable; default: running, needs_attention, stuck).",
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="The sample's random seed.")] = None,
    own: Annotated[
        bool,
        typer.Option(
            "--own/--all-workflows",
            help="--own: only instances of the workflows (by name) that --app defines, "
            "for a service that shares its ledger with others (their instances are "
            "theirs to check). Default: every instance.",
        ),
    ] = False,
    timeout: Annotated[
        float,
        typer.Option(
            min=0.1,
            help="Seconds one instance's replay may take before it counts as broken "
            "(new code awaiting something that never completes).",
        ),
    ] = 30.0,
) -> None:
    """Before a deploy: replay live instances' histories against the new code and name
    every one it would break (the first command that differs, recorded against
    attempted, and where in the code), or strand (no definition of its version).
    Exit 0 none breaks, 1 some would, 2 error."""
    import sys

    from .workflow.gate import replay_check
    from .workflow.history import history_registry
    from .workflow.worker import load_app

    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # --app modules of the current directory
    try:
        loaded = load_app(app_target)
    except LedgerflowError as exc:
        _fail(str(exc))
    statuses = status or ["running", "needs_attention", "stuck"]
    unknown = sorted(set(statuses) - set(STATUSES))
    if unknown:
        _fail(f"--status {unknown[0]!r}: one of {', '.join(STATUSES)}")

    async def check() -> Any:
        registry = history_registry(loaded.registry)
        async with open_store(db, create=False, registry=registry) as store:
            return await replay_check(
                store,
                loaded.workflows,
                statuses=statuses,
                sample=sample,
                seed=seed,
                names={d.name for d in loaded.workflows} if own else None,
                timeout=timeout,
            )

    report = _run(check)
    for broken in report.breakages:
        where = f" at {broken.location}" if broken.location else ""
        if broken.recorded is not None:
            detail = (
                f"command {broken.seq}: recorded {broken.recorded}, the new code "
                f"attempted {broken.attempted}{where}"
            )
        else:
            detail = broken.reason
        out.print(
            f"[red]BREAKS[/] {escape(broken.workflow_id)} ({escape(broken.name)} "
            f"v{broken.version}): {escape(detail)}",
            soft_wrap=True,
        )
    skipped = (
        f" ({len(report.not_replayed)} of them state-machine instances, checked by where "
        "they are: a machine is data, not code to replay)"
        if (report.not_replayed)
        else ""
    )
    if report.breakages:
        out.print(f"{len(report.breakages)} of {report.checked} instances would break{skipped}")
        raise typer.Exit(1)
    out.print(f"[green]ok[/]: {report.checked} instances fit the new code{skipped}")


@app.command("worker")
def worker(
    app_target: Annotated[
        str,
        typer.Option(
            "--app",
            envvar="LEDGERFLOW_APP",
            help="What to run: module (every workflow and @ledgerflow.step function in "
            "it) or module:attribute (a workflow, a step or a list of them). "
            "Env LEDGERFLOW_APP.",
        ),
    ],
    db: DbOption = DEFAULT_DB,
    queue: Annotated[
        list[str] | None,
        typer.Option(
            "--queue",
            envvar="LEDGERFLOW_QUEUES",
            help="A task queue whose steps this worker runs (repeat for more). Env "
            "LEDGERFLOW_QUEUES (space-separated).",
        ),
    ] = None,
    task_concurrency: Annotated[
        int, typer.Option(min=1, help="Tasks (steps of --queue) running at once here.")
    ] = 16,
    concurrency: Annotated[
        int, typer.Option(min=1, help="Instances running a pass at once in this worker.")
    ] = 200,
    lease: Annotated[
        float, typer.Option(min=0.1, help="Seconds a claim holds an instance (renewed).")
    ] = 60.0,
    poll: Annotated[
        float, typer.Option(min=0.01, help="Longest wait before looking for due work.")
    ] = 1.0,
    grace: Annotated[
        float, typer.Option(min=0.0, help="Seconds running passes get to finish on stop.")
    ] = 10.0,
    metrics_port: MetricsPortOption = None,
    metrics_host: MetricsHostOption = _ANY_HOST,
) -> None:
    """Run workflows, and the steps of task queues, until SIGTERM or Ctrl-C, then stop
    gracefully: finish running passes and steps (up to --grace), give leases back,
    exit 0. Run as many as you like on one database; each claims only the
    workflows it registered and the steps of its --queue it has."""
    import sys

    from .workflow.worker import load_app, run_worker

    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # --app modules of the current directory
    _configure_logs()
    queues = list(queue or ())
    try:
        loaded = load_app(app_target)
    except LedgerflowError as exc:
        _fail(str(exc))
    if queues and not loaded.steps:
        _fail(f"--queue {' '.join(queues)}: --app {app_target} holds no steps to run")
    if not queues and not loaded.workflows and not loaded.projections:
        _fail(f"--app {app_target} holds steps but no workflows: name the --queue they serve")
    gauges_every = _serve_metrics(metrics_port, metrics_host)
    _run(
        lambda: run_worker(
            db,
            loaded.workflows,
            steps=loaded.steps if queues else (),
            projections=loaded.projections,
            queues=queues,
            task_concurrency=task_concurrency,
            concurrency=concurrency,
            lease=timedelta(seconds=lease),
            poll_interval=poll,
            grace=grace,
            gauges_every=gauges_every,
            registry=loaded.registry,
        )
    )


# The HTTP API's commands, in their own module (the web framework is an extra).
app.command("server")(_server_cli.server)
app.add_typer(_server_cli.keys_app, name="keys")


def main() -> None:
    app()


if __name__ == "__main__":  # python -m ledgerflow.cli
    main()
