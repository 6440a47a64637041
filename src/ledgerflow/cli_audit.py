"""``ledgerflow audit``: verify the ledger, checkpoint its Merkle tree to a witness,
prove an instance's history to someone else, and report who did what.

Exit codes of ``verify`` and ``check-bundle``: 0 intact, 1 tampered, 2 error (no
ledger there, unreachable, bad arguments), 3 corrupt (the database's files)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from .audit import VerifyReport, verify_ledger
from .audit_bundle import check_bundle, dumps, make_bundle
from .audit_instances import check_instances
from .audit_report import Action, actions, actions_csv, actions_json
from .checkpoints import Checkpointer
from .cli_options import DEFAULT_DB, DbOption, fail, out, run
from .cli_options import configure_logs as _configure_logs
from .definitions import describe_definition
from .errors import LedgerflowError, StoreCorruptError
from .gdpr import erase_subject
from .resilience.book import default_actor
from .signing import LogSigner, LogVerifier, generate_signing_key
from .store import open_store
from .witness import FileWitness
from .workflow.history import history_registry
from .workflow.journal import stream_of

__all__ = ["audit_app", "gdpr_app"]

audit_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Verify the ledger, checkpoint it to a witness, prove instances, report actions.",
    no_args_is_help=True,
)

WitnessOption = Annotated[
    Path | None,
    typer.Option(
        "--witness",
        envvar="LEDGERFLOW_WITNESS",
        help="The witness file of signed tree heads, kept outside the database "
        "(env LEDGERFLOW_WITNESS).",
    ),
]
PublicKeyOption = Annotated[
    Path | None,
    typer.Option(
        "--public-key",
        envvar="LEDGERFLOW_PUBLIC_KEY",
        help="The log's Ed25519 public key (PEM): heads must be signed by it "
        "(env LEDGERFLOW_PUBLIC_KEY).",
    ),
]
KeyOption = Annotated[
    Path | None,
    typer.Option(
        "--key",
        envvar="LEDGERFLOW_SIGNING_KEY",
        help="The log's Ed25519 private key (PEM) that signs tree heads "
        "(env LEDGERFLOW_SIGNING_KEY).",
    ),
]

# Every command opens the ledger with create=False: only a process that writes
# workflows creates or migrates a ledger, and a mistyped --db reports "no ledger".


async def _verify(
    url: str, witness: FileWitness | None, verifier: LogVerifier | None
) -> tuple[list[str], VerifyReport | None]:
    """The database's own findings, and the hash chains', the Merkle tree's and the
    derived status rows' (None: too damaged to read)."""
    damaged: list[str] = []
    try:
        async with open_store(url, create=False, registry=history_registry()) as store:
            damaged = await store.integrity_check()
            report = await verify_ledger(store, witness=witness, verifier=verifier)
            derived = await check_instances(store)
    except StoreCorruptError as exc:
        return [*damaged, str(exc)], None
    findings = [*report.findings, *derived]
    return damaged, dataclasses.replace(report, findings=findings)


@audit_app.command("verify")
def audit_verify(
    db: DbOption = DEFAULT_DB,
    witness: WitnessOption = None,
    public_key: PublicKeyOption = None,
) -> None:
    """Check the database's own integrity, then every stream's hash chain, the log
    against its Merkle tiles and checkpoints and, with --witness, against the signed
    heads kept outside it, all in one snapshot. Exit 0 intact, 1 tampered, 2 error
    (no ledger there, unreachable), 3 corrupt (the database's files are damaged:
    restore a backup)."""
    verifier = _verifier(public_key)
    if witness is not None and not witness.is_file():
        # A mistyped path must not verify "against" a witness that holds nothing.
        fail(f"--witness {witness}: no such file")
    held = None if witness is None else FileWitness(witness)
    damaged, report = run(lambda: _verify(db, held, verifier))
    if report is not None and report.findings:
        out.print(
            f"[red]TAMPERED[/]: {len(report.findings)} problem(s) in {report.events_checked} "
            f"events, {report.streams_checked} streams"
        )
        for finding in report.findings:
            out.print(f"  - {finding}", markup=False, highlight=False, soft_wrap=True)
    if damaged:
        out.print(
            f"[red]CORRUPT[/]: the database's integrity check found {len(damaged)} problem(s)"
        )
        for line in damaged[:20]:
            out.print(f"  - {line}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(3)
    assert report is not None
    if report.findings:
        raise typer.Exit(1)
    against = "" if witness is None else f", the witness's heads ({witness})"
    out.print(
        f"[green]intact[/]: {report.events_checked} events in "
        f"{report.streams_checked} streams; verified: every hash chain, Merkle tile and "
        f"checkpoint{against}, every instance status"
    )


def _verifier(public_key: Path | None) -> LogVerifier | None:
    if public_key is None:
        return None
    try:
        return LogVerifier.from_file(public_key)
    except LedgerflowError as exc:
        fail(str(exc))


@audit_app.command("keygen")
def audit_keygen(
    out_dir: Annotated[
        Path, typer.Argument(help="Where to write ledger-signing.key and ledger-signing.pub.")
    ],
) -> None:
    """Create the Ed25519 key pair that signs tree heads. Keep the private key away
    from the database (the checkpointer alone reads it); hand the public key to
    auditors and witnesses."""
    private, public = out_dir / "ledger-signing.key", out_dir / "ledger-signing.pub"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        signer = generate_signing_key(private, public)
    except LedgerflowError as exc:
        fail(str(exc))
    except OSError as exc:  # not a directory, no permission, read-only: said, not a traceback
        fail(f"cannot write the key pair to {out_dir}: {exc.strerror or exc}")
    out.print(f"private key: {private} (mode 600)\npublic key:  {public}")
    out.print(f"key id: {signer.key_id.hex()}", highlight=False)


@audit_app.command("checkpoint")
def audit_checkpoint(
    db: DbOption = DEFAULT_DB,
    key: KeyOption = None,
    witness: WitnessOption = None,
    follow: Annotated[
        bool, typer.Option(help="Keep checkpointing every --interval until stopped.")
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.01, help="Seconds between checkpoints with --follow.")
    ] = 10.0,
) -> None:
    """Extend the ledger's Merkle tree over every settled event, store its tiles and
    head, sign the head with --key and hand it to --witness. With --follow, keep on
    until SIGTERM or Ctrl-C: run one beside the workers (events after the last head
    handed to the witness are the ones that could still be removed unseen)."""
    if witness is not None and key is None:
        fail("--witness takes signed heads: give --key too")
    try:
        signer = None if key is None else LogSigner.from_file(key)
    except LedgerflowError as exc:
        fail(str(exc))
    held = None if witness is None else FileWitness(witness, verifier=_public(signer))

    async def once() -> None:
        async with open_store(db, create=False) as store:
            checkpointer = Checkpointer(store, signer=signer, witness=held)
            if not follow:
                _print_checkpoint(await checkpointer.checkpoint(), witness)
                return
            _configure_logs()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop.set)
            await checkpointer.run(interval=interval, stop=stop)

    run(once)


def _public(signer: LogSigner | None) -> LogVerifier | None:
    return None if signer is None else signer.verifier


def _print_checkpoint(checkpoint: Any, witness: Path | None) -> None:
    if checkpoint is None:
        out.print("the ledger is empty: nothing to checkpoint")
        return
    signed = "signed" if checkpoint.signature is not None else "unsigned"
    to = f", handed to {witness}" if witness is not None else ""
    out.print(
        f"checkpoint: {checkpoint.tree_size} events (to position {checkpoint.last_position}), "
        f"head {checkpoint.root.hex()}, {signed}{to}",
        highlight=False,
    )


@audit_app.command("bundle")
def audit_bundle(
    instance: Annotated[str, typer.Argument(help="The workflow instance's id.")],
    db: DbOption = DEFAULT_DB,
    stream: Annotated[
        bool, typer.Option("--stream", help="INSTANCE names a ledger stream, not a workflow.")
    ] = False,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
    app_target: Annotated[
        str | None,
        typer.Option(
            "--app",
            envvar="LEDGERFLOW_APP",
            help="module[:attribute] holding the instance's definition: its hash (and a "
            "state machine's verification) go into the bundle.",
        ),
    ] = None,
) -> None:
    """An evidence bundle of the instance: every event up to the latest signed
    checkpoint with its inclusion proof, the signed head and the definition's hash,
    in one JSON file that `ledgerflow audit check-bundle` verifies offline."""

    stream_id = instance if stream else stream_of(instance)

    async def make() -> dict[str, Any]:
        async with open_store(db, create=False) as store:
            definition = None
            if app_target is not None:
                if str(Path.cwd()) not in sys.path:
                    sys.path.insert(0, str(Path.cwd()))  # --app modules of this directory
                definition = await describe_definition(store, stream_id, app_target)
            return await make_bundle(store, stream_id, definition=definition)

    text = dumps(run(make))
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
        out.print(f"bundle of {instance!r} written to {output}", highlight=False)


@audit_app.command("check-bundle")
def audit_check_bundle(
    bundle: Annotated[Path, typer.Argument(help="The bundle file.")],
    public_key: Annotated[
        Path,
        typer.Option("--public-key", envvar="LEDGERFLOW_PUBLIC_KEY", help="The log's public key."),
    ],
) -> None:
    """Verify a bundle offline, with no database and no secret: every event's hash
    and chain, every inclusion proof, and the head's signature by --public-key.
    Exit 0 valid, 1 not valid, 2 unreadable."""
    verifier = _verifier(public_key)
    assert verifier is not None
    try:
        data = json.loads(bundle.read_text())
    except (OSError, ValueError) as exc:
        fail(f"cannot read {bundle}: {exc}")
    report = check_bundle(data, verifier)
    if report.problems:
        out.print(f"[red]NOT VALID[/]: {len(report.problems)} problem(s) in {bundle}")
        for problem in report.problems:
            out.print(f"  - {problem}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    out.print(
        f"[green]valid[/]: {report.events} events of {report.stream_id!r}, each proven "
        f"in the ledger's tree of {report.tree_size} events, whose head the key signed",
        highlight=False,
    )


@audit_app.command("report")
def audit_report(
    db: DbOption = DEFAULT_DB,
    actor: Annotated[str | None, typer.Option(help="Only this actor's events.")] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's events.")] = None,
    since: Annotated[
        datetime | None, typer.Option(help="Recorded at or after (UTC unless an offset).")
    ] = None,
    until: Annotated[
        datetime | None, typer.Option(help="Recorded before (UTC unless an offset).")
    ] = None,
    event_type: Annotated[
        list[str] | None, typer.Option("--type", help="Only events of this type (repeatable).")
    ] = None,
    output: Annotated[str, typer.Option("--format", help="csv or json.")] = "csv",
) -> None:
    """Who did what: every event recorded with an actor (API calls, CLI and operator
    actions), as CSV or JSON, filtered by actor, tenant, time and type."""
    if output not in ("csv", "json"):
        fail(f"--format {output!r}: csv or json")

    def utc(moment: datetime | None) -> datetime | None:
        return moment if moment is None or moment.tzinfo else moment.replace(tzinfo=UTC)

    async def collect() -> list[Action]:
        async with open_store(db, create=False) as store:
            return [
                found
                async for found in actions(
                    store,
                    actor=actor,
                    tenant=tenant,
                    since=utc(since),
                    until=utc(until),
                    types=set(event_type or ()),
                )
            ]

    found = run(collect)
    text = actions_csv(found) if output == "csv" else actions_json(found)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


gdpr_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Personal data: erase a data subject's (its key destroyed, the ledger intact).",
    no_args_is_help=True,
)


@gdpr_app.command("erase")
def gdpr_erase(
    subject: Annotated[str, typer.Argument(help="The data subject's id (its Subject field).")],
    reason: Annotated[str, typer.Option(help="Why (the request it answers): recorded.")],
    db: DbOption = DEFAULT_DB,
    actor: Annotated[
        str | None, typer.Option(help="Who: recorded with the erasure (default: user@host).")
    ] = None,
) -> None:
    """Destroy the subject's key: every personal value sealed with it becomes
    unreadable, a ledgerflow.subject_erased event records it (without the subject's
    id), and no event changes, so `audit verify` and every proof still hold. Running
    it again is harmless."""
    if not reason.strip():
        fail("--reason must say why")

    async def erase() -> str | None:
        async with open_store(db, create=False) as store:
            return await erase_subject(
                store, subject, reason=reason, actor=actor or default_actor()
            )

    key_id = run(erase)
    if key_id is None:
        out.print(f"no key for {subject!r}: nothing to erase (never seen, or erased before)")
    else:
        out.print(f"erased: key {key_id} of {subject!r} destroyed", highlight=False)
