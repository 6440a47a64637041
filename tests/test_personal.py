"""Personal data: encrypted per data subject before it is hashed, readable until the
subject is erased, then gone for good while every chain, tile and proof still
verifies; code that needs erased data fails clearly, on every backend."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import ledgerflow
from ledgerflow import Personal, Subject
from ledgerflow.audit_bundle import check_bundle, make_bundle
from ledgerflow.cli import app
from ledgerflow.gdpr import ERASURE_STREAM, erase_subject
from ledgerflow.personal import ERASED, Sealed, Sealer, SubjectKey, reveal, seal_builtins
from ledgerflow.store.ports import EventStore

from ._engines import WAIT, waiting_for


@dataclass(frozen=True)
class CustomerRegistered:
    customer_id: Annotated[str, Subject]
    email: Annotated[str, Personal]
    name: Annotated[str, Personal]
    plan: str


class Address(msgspec.Struct, frozen=True):
    person: Annotated[str, Subject]
    street: Annotated[str, Personal]
    city: str


class Moved(msgspec.Struct, frozen=True):
    address: Address
    previous: list[Address] = []


def registry() -> ledgerflow.EventRegistry:
    registry = ledgerflow.EventRegistry()
    registry.register(CustomerRegistered, "customer.registered")
    registry.register(Moved, "customer.moved")
    return registry


@pytest.fixture
async def customers(store_url: str) -> Any:
    async with ledgerflow.open_store(store_url, registry=registry()) as store:
        yield store


ADA = CustomerRegistered("c-1", "ada@example.com", "Ada Lovelace", "gold")


async def test_personal_values_are_stored_encrypted_and_read_back(customers: EventStore) -> None:
    await customers.append("customer-c-1", [ADA])
    (row,) = await customers.read_rows()
    assert b"ada@example.com" not in row.data
    assert b"Lovelace" not in row.data
    assert b"c-1" in row.data  # the subject field itself is not personal
    stored = json.loads(row.data)
    assert stored["plan"] == "gold"
    assert set(stored["email"]["$pii"]) == {"k", "f", "n", "c"}
    (event,) = await customers.read_stream("customer-c-1")
    assert event.data == ADA


async def test_nested_and_listed_subjects_each_use_their_own_key(customers: EventStore) -> None:
    moved = Moved(Address("p-1", "1 Main St", "Leeds"), [Address("p-2", "9 Old Rd", "York")])
    await customers.append("people", [moved])
    (row,) = await customers.read_rows()
    assert b"Main St" not in row.data
    assert b"Old Rd" not in row.data
    stored = json.loads(row.data)
    assert stored["address"]["street"]["$pii"]["k"] != stored["previous"][0]["street"]["$pii"]["k"]
    (event,) = await customers.read_stream("people")
    assert event.data == moved


@pytest.mark.parametrize(
    "event",
    [
        CustomerRegistered("c-1", 42, "Ada Lovelace", "gold"),  # type: ignore[arg-type]
        Moved(Address("p-1", "1 Main St", 7)),  # type: ignore[arg-type]
    ],
    ids=["personal field", "plain field beside personal ones"],
)
async def test_a_personal_event_holding_values_of_other_types_writes_nothing(
    customers: EventStore, event: Any
) -> None:
    """Checked before sealing: sealed, a wrong value would be stored and then fail
    every read of the log."""
    with pytest.raises(ledgerflow.InvalidEventDataError):
        await customers.append("customer-c-1", [event])
    assert await customers.read_all() == []


async def test_erasure_destroys_the_data_and_leaves_every_proof_standing(
    customers: EventStore, tmp_path: Path
) -> None:
    signer = ledgerflow.generate_signing_key(tmp_path / "k", tmp_path / "k.pub")
    witness = ledgerflow.FileWitness(tmp_path / "heads.jsonl")
    other = CustomerRegistered("c-2", "bob@example.com", "Bob", "free")
    await customers.append("customer-c-1", [ADA])
    await customers.append("customer-c-2", [other])
    await ledgerflow.Checkpointer(customers, signer=signer, witness=witness).checkpoint()
    before = await customers.read_rows()
    bundle = await make_bundle(customers, "customer-c-1")

    erased = await erase_subject(customers, "c-1", reason="GDPR request #42", actor="dpo@x")
    assert erased is not None
    # The ledger is as it was: same bytes, chains, tiles and heads; the bundle made
    # before the erasure still checks.
    assert await customers.read_rows(limit=2) == before
    report = await ledgerflow.verify_ledger(customers, witness=witness, verifier=signer.verifier)
    assert report.ok, report.findings
    assert check_bundle(json.loads(json.dumps(bundle)), signer.verifier).ok
    # The values are gone; the other customer's are not.
    with pytest.raises(ledgerflow.PersonalDataErasedError, match=r"\$\.email, \$\.name"):
        await customers.read_stream("customer-c-1")
    (bob,) = await customers.read_stream("customer-c-2")
    assert bob.data == other
    # The record of the erasure names neither the subject nor anything personal.
    (record,) = await customers.read_stream(ERASURE_STREAM)
    assert record.type == "ledgerflow.subject_erased"
    assert record.data == {"key_id": erased, "reason": "GDPR request #42"}
    assert record.metadata.actor == "dpo@x"
    # (As a JSON string: a random key id may hold the bytes c-1, as in "...4c-1e...".)
    assert b'"c-1"' not in (await customers.read_rows(from_position=3))[0].data
    # Erasing again finds nothing; new data of the subject gets a new key.
    assert await erase_subject(customers, "c-1", reason="again") is None
    await customers.append("customer-c-1", [dataclasses.replace(ADA, plan="silver")])
    (renewed,) = await customers.read_stream("customer-c-1", from_version=2)
    assert renewed.data == dataclasses.replace(ADA, plan="silver")


async def test_untyped_reads_show_erased_fields(customers: EventStore) -> None:
    await customers.append("customer-c-1", [ADA])
    await erase_subject(customers, "c-1", reason="request")
    rows = await customers.read_rows()  # as stored: the ciphertext is still there
    raw = json.loads(rows[0].data)
    assert "$pii" in raw["email"]
    keys = await customers.key_vault.keys_by_id([raw["email"]["$pii"]["k"]])
    assert keys == {}
    shown = reveal(raw, keys)
    assert shown == {
        "customer_id": "c-1",
        "email": {ERASED: "email"},
        "name": {ERASED: "name"},
        "plan": "gold",
    }


def test_a_class_with_personal_fields_needs_a_subject() -> None:
    @dataclass
    class Orphan:
        email: Annotated[str, Personal]

    with pytest.raises(ledgerflow.ConfigurationError, match="no Annotated\\[str, Subject\\]"):
        ledgerflow.EventRegistry().register(Orphan, "orphan")


def test_a_ciphertext_moved_to_another_field_does_not_open() -> None:
    key = SubjectKey("kid", bytes(range(32)))
    sealer = Sealer({"c-1": key})
    raw = seal_builtins(ADA, msgspec.to_builtins(ADA))
    data = json.loads(sealer.encoder.encode(raw))
    data["name"], data["email"] = data["email"], data["name"]  # swapped ciphertexts
    shown = reveal(data, {"kid": key.key})
    assert shown["email"] == {ERASED: "email"}
    assert shown["name"] == {ERASED: "name"}
    data["name"], data["email"] = data["email"], data["name"]  # back where they were
    assert reveal(data, {"kid": key.key}) == msgspec.to_builtins(ADA)


@settings(max_examples=50, deadline=None)
@given(
    value=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=8,
    )
)
def test_any_json_value_seals_and_reveals_unchanged(value: Any) -> None:
    key = SubjectKey("kid", bytes(32))
    sealed = Sealer({"s": key}).encoder.encode({"v": Sealed("s", "v", value)})
    assert reveal(json.loads(sealed), {"kid": key.key}) == {"v": value}
    assert reveal(json.loads(sealed), {}) == {"v": {ERASED: "v"}}


# -- workflows --------------------------------------------------------------------------


@dataclass(frozen=True)
class Signup:
    customer_id: Annotated[str, Subject]
    email: Annotated[str, Personal]


@ledgerflow.workflow(name="welcome")
async def welcome(ctx: ledgerflow.WorkflowContext, signup: Signup) -> str:
    await ctx.wait_for_signal("go")
    return await ctx.step(send_welcome, signup.email)


@ledgerflow.step()
def send_welcome(email: str) -> str:
    return f"sent to {email}"


async def test_a_workflow_whose_input_was_erased_fails_clearly(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    async with ledgerflow.Engine(ledgerflow.open_store(url), workflows=[welcome]) as engine:
        handle = await engine.start(welcome, Signup("c-9", "eve@example.com"), id="w-9")
        await asyncio.sleep(0.2)
        rows = [r for r in await engine.store.read_rows() if r.stream_id == "wf-w-9"]
        assert b"eve@example.com" not in rows[0].data
        await erase_subject(engine.store, "c-9", reason="request")
        await engine.signal("w-9", "go", None)
        # Its input can no longer be read: the instance fails, saying why, instead
        # of running on a placeholder (it was parked as stuck, for good: no code
        # could fit data that is gone).
        with pytest.raises(ledgerflow.WorkflowFailedError) as ended:
            await handle.result(timeout=WAIT)
        assert (ended.value.status, ended.value.error_type) == ("failed", "PersonalDataErasedError")
        assert "$.email" in ended.value.message


def test_cli_erase_is_idempotent(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"

    async def fill() -> None:
        async with ledgerflow.open_store(url, registry=registry()) as store:
            await store.append("customer-c-1", [ADA])

    asyncio.run(fill())
    runner = CliRunner()
    first = runner.invoke(app, ["gdpr", "erase", "c-1", "--reason", "ticket 7", "--db", url])
    assert first.exit_code == 0, first.output
    assert "erased" in first.output
    again = runner.invoke(app, ["gdpr", "erase", "c-1", "--reason", "ticket 7", "--db", url])
    assert again.exit_code == 0
    assert "no key" in again.output
    assert runner.invoke(app, ["gdpr", "erase", "c-1", "--db", url]).exit_code == 2  # reason


# -- no snapshot keeps personal data in the clear ---------------------------------------


@dataclass(frozen=True)
class Customer:
    plans: tuple[str, ...] = ()


def _decide(state: Customer, command: CustomerRegistered) -> list[CustomerRegistered]:
    return [command]


def _evolve(state: Customer, event: CustomerRegistered) -> Customer:
    return Customer((*state.plans, event.plan))


async def test_aggregates_and_workflows_with_personal_data_keep_no_snapshots(
    customers: EventStore, tmp_path: Path
) -> None:
    customer = ledgerflow.Aggregate(
        name="customer",
        initial=Customer(),
        decide=_decide,
        evolve=_evolve,
        state_type=Customer,
        snapshot_every=2,
    )
    repository = ledgerflow.Repository(customers, customer)
    for plan in ("a", "b", "c"):
        await repository.handle("c-1", dataclasses.replace(ADA, plan=plan))
    assert await customers.load_snapshot("customer-c-1") is None
    assert (await repository.load("c-1")).state == Customer(("a", "b", "c"))

    url = f"sqlite:///{tmp_path / 'wf.db'}"
    async with ledgerflow.Engine(
        ledgerflow.open_store(url), workflows=[welcome], snapshot_every=2
    ) as engine:
        handle = await engine.start(welcome, Signup("c-5", "zed@example.com"), id="w-5")
        await engine.signal("w-5", "go", None)
        assert await asyncio.wait_for(handle.result(), 10) == "sent to zed@example.com"
        assert await engine.store.load_snapshot("wf-w-5") is None


# -- data that arrives as JSON (the HTTP API, the CLI) is sealed by its declared type ---


@dataclass(frozen=True)
class Consent:
    customer_id: Annotated[str, Subject]
    signature: Annotated[str, Personal]


@dataclass(frozen=True)
class Receipt:
    customer_id: Annotated[str, Subject]
    text: Annotated[str, Personal]  # made of personal data: declared so too


@ledgerflow.workflow(name="consent")
async def consent(ctx: ledgerflow.WorkflowContext, signup: Signup) -> Receipt:
    given = await ctx.wait_for_signal("consent", Consent)
    assert given is not None
    return Receipt(signup.customer_id, f"{signup.email} signed {given.signature}")


async def test_inputs_and_signals_given_as_json_are_sealed_by_their_types(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    async with ledgerflow.Engine(ledgerflow.open_store(url), workflows=[consent]) as engine:
        given = {"customer_id": "c-7", "email": "jo@example.com"}
        handle = await engine.start("consent", given, id="j-1")
        again = await engine.start(consent, Signup("c-7", "jo@example.com"), id="j-1")
        assert again.id == "j-1"  # the same start again, typed this time: idempotent
        await waiting_for(engine, "j-1", "signal 'consent'")
        await engine.signal("j-1", "consent", {"customer_id": "c-7", "signature": "J. Doe"})
        receipt = await asyncio.wait_for(handle.result(), 10)
        assert receipt == Receipt("c-7", "jo@example.com signed J. Doe")
        rows = [r for r in await engine.store.read_rows() if r.stream_id == "wf-j-1"]
    stored = b"".join(r.data for r in rows)
    assert b"jo@example.com" not in stored
    assert b"J. Doe" not in stored
    assert stored.count(b'"$pii"') >= 3  # the input, the signal, the result


EMAILS = ledgerflow.Table("emails", key="customer_id", columns={"customer_id": str, "email": str})


async def test_projections_status_and_the_relay_go_on_past_an_erased_subject(
    customers: Any,
) -> None:
    """After one erasure every projection of the store stopped for good (the rebuild
    docs/audit.md advises never ended), ``projections list`` failed, and a relay run
    with the application's registry stalled there."""
    from ledgerflow import Projection, ProjectionRunner, ReadModel
    from ledgerflow.bus import InProcessBus, Relay, Route, decode
    from ledgerflow.projections.operations import status

    bob = CustomerRegistered("c-2", "bob@example.com", "Bob", "free")
    await customers.append("customer-c-1", [ADA])
    await customers.append("customer-c-2", [bob])
    emails = Projection("emails", tables=[EMAILS])

    @emails.on(CustomerRegistered)
    def registered(event: ledgerflow.RecordedEvent, view: Any) -> None:
        view.put(EMAILS, {"customer_id": event.data.customer_id, "email": event.data.email})

    others = Projection("others")

    @others.on("customer.moved")
    def moved(event: ledgerflow.RecordedEvent, view: Any) -> None:
        pass

    await erase_subject(customers, "c-1", reason="request")
    # A projection that handles the type builds without the erased event (what a
    # rebuild after an erasure is for); one that does not is not held up.
    assert await ProjectionRunner(customers, [emails, others]).catch_up() == 1  # bob's
    assert await ReadModel(customers, emails).select(EMAILS) == [
        {"customer_id": "c-2", "email": "bob@example.com"}
    ]
    assert [s.name for s in await status(customers)] == ["emails", "others"]
    assert all(s.failure is None for s in await status(customers))
    # The relay publishes the erased event as an untyped read shows it.
    bus = InProcessBus()
    route = Route(subject="crm.{type}", types={"customer.registered"})
    assert await Relay(customers, bus, [route]).catch_up() == 2
    first, second = (decode(m)["data"] for m in bus.messages)
    assert first["email"] == {ERASED: "email"}
    assert first["plan"] == "gold"
    assert second["email"] == "bob@example.com"
