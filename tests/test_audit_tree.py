"""The holes the hash chains leave, closed by the Merkle tree: a re-chained stream, the
newest events cut with their heads rewound, a whole stream removed with its head,
and all of it redone over the tiles and checkpoints too (then only the witness
knows). Each is named by stream and version where the tiles can name it."""

from __future__ import annotations

import asyncio
import base64
import copy as copy_module
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import ledgerflow
from ledgerflow.audit import Finding, FindingKind, VerifyReport
from ledgerflow.audit_bundle import check_bundle, dumps, make_bundle
from ledgerflow.checkpoints import Checkpointer
from ledgerflow.cli import app
from ledgerflow.signing import LogSigner, TreeHead, generate_signing_key
from ledgerflow.witness import FileWitness

from .conftest import pg_url, raw_sql
from .test_checkpoints import rechain


@pytest.fixture(params=["sqlite", "postgres"])
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return pg_url(request.getfixturevalue("pg_schema"))


@pytest.fixture
def signer(tmp_path: Path) -> LogSigner:
    return generate_signing_key(tmp_path / "log.key", tmp_path / "log.pub")


@pytest.fixture
def witness(tmp_path: Path, signer: LogSigner) -> FileWitness:
    return FileWitness(tmp_path / "heads.jsonl", verifier=signer.verifier)


async def checkpointed(url: str, signer: LogSigner, witness: FileWitness, events: int) -> None:
    """``events`` events over streams s0..s6 (s{i % 7}), checkpointed to the witness."""
    async with ledgerflow.open_store(url) as store:
        for i in range(events):
            stream = f"s{i % 7}"
            await store.append(stream, [ledgerflow.NewEvent("noted", {"n": i})], i // 7)
        await Checkpointer(store, signer=signer, witness=witness).checkpoint()


async def verify(
    url: str, witness: FileWitness | None = None, signer: LogSigner | None = None
) -> VerifyReport:
    async with ledgerflow.open_store(url) as store:
        return await ledgerflow.verify_ledger(
            store, witness=witness, verifier=None if signer is None else signer.verifier
        )


def named(report: VerifyReport) -> set[tuple[FindingKind, str | None, int | None]]:
    return {(f.kind, f.stream_id, f.version) for f in report.findings if f.stream_id}


def ledger_wide(report: VerifyReport) -> list[str]:
    return [f.detail for f in report.findings if f.stream_id is None]


async def test_a_checkpointed_ledger_verifies_against_its_witness(
    sql_url: str, signer: LogSigner, witness: FileWitness
) -> None:
    await checkpointed(sql_url, signer, witness, 300)
    report = await verify(sql_url, witness, signer)
    assert report.ok, report.findings
    assert report.events_checked == 300


async def test_a_rechained_stream_is_named_event_by_event(
    sql_url: str, signer: LogSigner, witness: FileWitness
) -> None:
    await checkpointed(sql_url, signer, witness, 300)
    # s3 has 43 events (versions 1..43); version 2 edited, the chain and head redone.
    await rechain(sql_url, "s3", from_version=2)
    without = await verify(sql_url)  # no witness: the tiles and checkpoint still tell
    assert named(without) == {(FindingKind.EDITED, "s3", v) for v in range(2, 44)}
    tile_0 = next(f for f in without.findings if f.version == 2)
    assert tile_0.detail == "its hash differs from the one Merkle tile 0 (positions 1..256) sealed"
    assert ledger_wide(without) == [
        f"the ledger's first 300 events no longer produce the head checkpointed for 300 "
        f"events ({_when(without)}): events were changed, removed or re-chained"
    ]
    with_witness = await verify(sql_url, witness, signer)
    assert any("the head of 300 events the witness holds" in d for d in ledger_wide(with_witness))


def _when(report: VerifyReport) -> str:
    detail = ledger_wide(report)[0]
    return detail.split("(", 1)[1].split(")", 1)[0]


async def test_the_newest_events_cut_with_their_heads_rewound_are_named(
    sql_url: str, signer: LogSigner, witness: FileWitness
) -> None:
    await checkpointed(sql_url, signer, witness, 300)
    _cut(sql_url, after=295)  # s1..s5's last events: in the tile being filled
    report = await verify(sql_url)
    assert named(report) == {(FindingKind.REMOVED, f"s{i % 7}", 43) for i in range(295, 300)}
    assert all("sealed in Merkle tile 1" in f.detail for f in report.findings if f.stream_id)
    assert ledger_wide(report) == [
        f"the head checkpointed for 300 events ({_when(report)}) covers 300 events, the "
        "ledger holds 295: events were removed"
    ]


async def test_a_whole_stream_removed_with_its_head_is_named(
    sql_url: str, signer: LogSigner, witness: FileWitness
) -> None:
    await checkpointed(sql_url, signer, witness, 300)
    raw_sql(
        sql_url,
        "DELETE FROM {t}events WHERE stream_id = 's4'",
        "DELETE FROM {t}streams WHERE stream_id = 's4'",
    )
    report = await verify(sql_url)
    assert named(report) == {(FindingKind.REMOVED, "s4", v) for v in range(1, 44)}
    # The holes in the global log are named by the tiles, not listed apart.
    assert not [f for f in report.findings if f.kind is FindingKind.REMOVED and not f.stream_id]


async def test_cut_and_recheckpointed_only_the_witness_knows(
    sql_url: str, signer: LogSigner, witness: FileWitness
) -> None:
    await checkpointed(sql_url, signer, witness, 300)
    _cut(sql_url, after=280)
    raw_sql(sql_url, "DELETE FROM {t}checkpoints", "DELETE FROM {t}merkle_tiles")
    async with ledgerflow.open_store(sql_url) as store:  # a fresh tree over what is left
        await Checkpointer(store, signer=signer).checkpoint()
    assert (await verify(sql_url)).ok  # self-consistent again...
    report = await verify(sql_url, witness, signer)  # ...but not to the witness
    assert ledger_wide(report) == [
        f"the head of 300 events the witness holds ({_when(report)}) covers 300 events, "
        "the ledger holds 280: events were removed",
        "the ledger has no checkpoint of 300 events, though the witness holds its head: "
        "checkpoints were removed",
    ]


async def test_rechained_and_recheckpointed_only_the_witness_knows(
    sql_url: str, signer: LogSigner, witness: FileWitness
) -> None:
    await checkpointed(sql_url, signer, witness, 300)
    await rechain(sql_url, "s3", from_version=2)
    raw_sql(sql_url, "DELETE FROM {t}checkpoints", "DELETE FROM {t}merkle_tiles")
    async with ledgerflow.open_store(sql_url) as store:
        await Checkpointer(store, signer=signer).checkpoint()
    assert (await verify(sql_url)).ok
    report = await verify(sql_url, witness, signer)
    assert ledger_wide(report) == [
        f"the ledger's first 300 events no longer produce the head of 300 events the witness "
        f"holds ({_when(report)}): events were changed, removed or re-chained",
        f"the ledger's checkpoint of 300 events differs from the head of 300 events the "
        f"witness holds ({_when(report)}): checkpoints were rewritten",
    ]


async def test_heads_signed_by_another_key_are_findings(
    sql_url: str, signer: LogSigner, witness: FileWitness, tmp_path: Path
) -> None:
    await checkpointed(sql_url, signer, witness, 10)
    impostor = generate_signing_key(tmp_path / "x.key", tmp_path / "x.pub")
    report = await verify(sql_url, witness, impostor)
    assert [d.split(" (")[0] for d in ledger_wide(report)] == [
        "the checkpoint of 10 events is not signed by the given key",
        "the witness's head of 10 events",
    ]


async def test_verify_against_the_witness_while_writers_and_a_checkpointer_run(
    sql_url: str, signer: LogSigner, witness: FileWitness
) -> None:
    # Tiles, checkpoints and the witness are read before the snapshot: a head
    # written during the walk covers nothing the walk has not seen.
    async with ledgerflow.open_store(sql_url) as store:
        checkpointer = Checkpointer(store, signer=signer, witness=witness)
        stop = asyncio.Event()

        async def write(writer: int) -> None:
            for i in range(80):
                await store.append(f"w{writer}", [ledgerflow.NewEvent("noted", {"i": i})])

        async def checkpoint() -> None:
            while not stop.is_set():
                await checkpointer.checkpoint()
                await asyncio.sleep(0.005)

        async def audit() -> list[Finding]:
            found: list[Finding] = []
            while not stop.is_set():
                report = await ledgerflow.verify_ledger(
                    store, witness=witness, verifier=signer.verifier
                )
                found.extend(report.findings)
                await asyncio.sleep(0.01)
            return found

        background = [asyncio.create_task(checkpoint()), asyncio.create_task(audit())]
        await asyncio.gather(*(write(w) for w in range(4)))
        stop.set()
        _, findings = await asyncio.gather(*background)
    assert findings == []
    assert len(await witness.heads()) > 1


def _cut(url: str, *, after: int) -> None:
    """Delete the events after position ``after`` and rewind their streams' heads to
    what is left, as someone covering their tracks would."""
    rows = raw_sql(url, f"SELECT DISTINCT stream_id FROM {{t}}events WHERE position > {after}")
    statements = [f"DELETE FROM {{t}}events WHERE position > {after}"]
    for (stream,) in rows:
        statements.append(
            "UPDATE {t}streams SET version = (SELECT max(version) FROM {t}events "
            f"WHERE stream_id = '{stream}'), last_hash = (SELECT hash FROM {{t}}events e "
            f"WHERE stream_id = '{stream}' ORDER BY version DESC LIMIT 1), last_position = "
            f"(SELECT max(position) FROM {{t}}events WHERE stream_id = '{stream}') "
            f"WHERE stream_id = '{stream}'"
        )
    raw_sql(url, *statements)


# -- the command line ------------------------------------------------------------------


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())


def test_keygen_checkpoint_verify_bundle_check_bundle(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"

    async def fill() -> None:
        async with ledgerflow.open_store(url) as store:
            for i in range(40):
                await store.append("wf-order-1", [ledgerflow.NewEvent("noted", {"i": i})], i)
                await store.append("other", [ledgerflow.NewEvent("noted", {"i": i})], i)

    asyncio.run(fill())
    keys = tmp_path / "keys"
    code, output = cli("audit", "keygen", str(keys))
    assert code == 0, output
    key, public = keys / "ledger-signing.key", keys / "ledger-signing.pub"
    assert cli("audit", "keygen", str(keys))[0] == 2  # never overwrites a key
    # A path that cannot hold them: one line and exit 2 (it was a traceback).
    code, output = cli("audit", "keygen", str(public / "sub"))
    assert code == 2
    assert f"cannot write the key pair to {public / 'sub'}" in output
    heads = tmp_path / "heads.jsonl"
    assert cli("audit", "checkpoint", "--db", url, "--witness", str(heads))[0] == 2  # no key
    code, output = cli(
        "audit", "checkpoint", "--db", url, "--key", str(key), "--witness", str(heads)
    )
    assert code == 0, output
    assert "checkpoint: 80 events (to position 80)" in output
    code, output = cli(
        "audit", "verify", "--db", url, "--witness", str(heads), "--public-key", str(public)
    )
    assert (code, "intact" in output) == (0, True), output

    bundle = tmp_path / "order-1.json"
    code, output = cli("audit", "bundle", "order-1", "--db", url, "-o", str(bundle))
    assert code == 0, output
    code, output = cli("audit", "check-bundle", str(bundle), "--public-key", str(public))
    assert code == 0, output
    assert "valid: 40 events of 'wf-order-1'" in output
    assert cli("audit", "bundle", "nope", "--db", url)[0] == 2

    raw_sql(url, "DELETE FROM events WHERE position = 80")
    code, output = cli(
        "audit", "verify", "--db", url, "--witness", str(heads), "--public-key", str(public)
    )
    assert code == 1
    assert "removed: stream 'other', version 40" in output
    assert "covers 80 events, the ledger holds 79" in output


async def test_a_bundle_proves_its_events_and_every_alteration_fails(
    tmp_path: Path, signer: LogSigner
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    async with ledgerflow.open_store(url) as store:
        for i in range(300):
            await store.append(f"s{i % 3}", [ledgerflow.NewEvent("noted", {"i": i})], i // 3)
        with pytest.raises(ledgerflow.AuditError, match="no checkpoint"):
            await make_bundle(store, "s1")
        await Checkpointer(store).checkpoint()
        with pytest.raises(ledgerflow.AuditError, match="only an unsigned checkpoint"):
            await make_bundle(store, "s1")
        await store.append("s1", [ledgerflow.NewEvent("noted", {})], 100)
        await Checkpointer(store, signer=signer).checkpoint()
        await store.append("s1", [ledgerflow.NewEvent("noted", {})], 101)  # after the head
        bundle = await make_bundle(store, "s1")
    assert (len(bundle["events"]), bundle["events_after_head"]) == (101, 1)
    good = json.loads(dumps(bundle))
    assert check_bundle(good, signer.verifier).ok

    def altered(change: Callable[[dict[str, Any]], None]) -> list[str]:
        copy = copy_module.deepcopy(good)
        change(copy)
        return check_bundle(copy, signer.verifier).problems

    def edit(b: dict[str, Any]) -> None:
        b["events"][5]["data"] = base64.b64encode(b'{"i":-1}').decode()

    assert altered(edit) == ["version 6 (position 17): its fields do not produce its hash (edited)"]
    assert altered(lambda b: b["events"].pop(4)) == [
        "version 6 (position 17): version 5 missing before it"
    ]
    assert altered(lambda b: b["events"].reverse())
    root = base64.b64encode(bytes(32)).decode()
    assert "the tree head of 301 events is not signed by the given key" in altered(
        lambda b: b["tree_head"].update(root_hash=root)
    )
    assert altered(lambda b: b["events"][7]["inclusion_proof"].pop()) == [
        "version 8 (position 23): its inclusion proof does not lead to the signed head"
    ]
    assert altered(lambda b: b["events"][7].update(leaf_index=8))
    assert altered(lambda b: b["events"][2].update(version="3")) == [
        "event 3: version is not an integer"
    ]
    # The readable time is not hashed: a rewritten one was shown as valid.
    assert altered(lambda b: b["events"][2].update(recorded_at="2020-01-01T00:00:00+00:00")) == [
        "event 3: recorded_at '2020-01-01T00:00:00+00:00' is not the hashed recorded_at_us"
    ]
    assert check_bundle({"format": "x"}, signer.verifier).problems == [
        "not a ledgerflow-audit-bundle/1 bundle"
    ]
    impostor = generate_signing_key(tmp_path / "x.key", tmp_path / "x.pub")
    assert check_bundle(good, impostor.verifier).problems == [
        "the tree head of 301 events is not signed by the given key"
    ]
    # The CLI: 1 for an altered bundle, 2 for one it cannot read.
    edit(good)
    (tmp_path / "edited.json").write_text(json.dumps(good))
    (tmp_path / "pub.pem").write_text(signer.verifier.public_pem())
    code, output = await asyncio.to_thread(
        cli,
        "audit",
        "check-bundle",
        str(tmp_path / "edited.json"),
        "--public-key",
        str(tmp_path / "pub.pem"),
    )
    assert (code, "NOT VALID" in output) == (1, True)
    (tmp_path / "junk.json").write_text("{")
    code, _ = await asyncio.to_thread(
        cli,
        "audit",
        "check-bundle",
        str(tmp_path / "junk.json"),
        "--public-key",
        str(tmp_path / "pub.pem"),
    )
    assert code == 2


def test_verify_without_a_ledger_or_with_a_bad_key_exits_2(tmp_path: Path) -> None:
    (tmp_path / "bad.pub").write_text("nonsense")
    url = f"sqlite:///{tmp_path / 'none.db'}"
    assert cli("audit", "verify", "--db", url)[0] == 2
    code, output = cli("audit", "verify", "--db", url, "--public-key", str(tmp_path / "bad.pub"))
    assert code == 2
    assert "not a PEM public key" in output
    # A mistyped witness path is an error, not a witness that holds nothing.
    code, output = cli("audit", "verify", "--db", url, "--witness", str(tmp_path / "typo.jsonl"))
    assert (code, "no such file" in output) == (2, True)


def test_a_witness_head_is_rfc_9162_tree_head_data_signed_by_the_key(
    tmp_path: Path, signer: LogSigner
) -> None:
    head = TreeHead(3, bytes(32), 5)
    assert signer.verifier.verify(signer.sign(head))
