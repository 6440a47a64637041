"""Aggregates: the pure decider, and the repository's load/save with snapshots."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ledgerflow
from ledgerflow.store._base import BaseEventStore


@dataclass(frozen=True)
class Deposited:
    amount: int


@dataclass(frozen=True)
class Withdrawn:
    amount: int


@dataclass(frozen=True)
class Account:
    balance: int = 0
    moves: int = 0


class Overdrawn(ledgerflow.LedgerflowError):
    pass


@dataclass(frozen=True)
class Deposit:
    amount: int


@dataclass(frozen=True)
class Withdraw:
    amount: int


AccountEvent = Deposited | Withdrawn


def decide(account: Account, command: Deposit | Withdraw) -> list[AccountEvent]:
    if isinstance(command, Deposit):
        return [Deposited(command.amount)]
    if command.amount > account.balance:
        raise Overdrawn(f"balance {account.balance} < {command.amount}")
    return [Withdrawn(command.amount)]


def evolve(account: Account, event: AccountEvent) -> Account:
    delta = event.amount if isinstance(event, Deposited) else -event.amount
    return Account(account.balance + delta, account.moves + 1)


def account_aggregate(
    snapshot_every: int | None = 3, snapshot_version: int = 1
) -> ledgerflow.Aggregate[Account, Deposit | Withdraw, AccountEvent]:
    return ledgerflow.Aggregate(
        name="account",
        initial=Account(),
        decide=decide,
        evolve=evolve,
        state_type=Account,
        snapshot_every=snapshot_every,
        snapshot_version=snapshot_version,
    )


@pytest.fixture
def registry() -> ledgerflow.EventRegistry:
    registry = ledgerflow.EventRegistry()
    registry.register(Deposited, "account.deposited")
    registry.register(Withdrawn, "account.withdrawn")
    return registry


commands = st.lists(
    st.one_of(
        st.builds(Deposit, st.integers(1, 100)),
        st.builds(Withdraw, st.integers(1, 150)),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(commands)
def test_fold_is_the_model(cmds: list[Deposit | Withdraw]) -> None:
    agg = account_aggregate()
    state = Account()
    events: list[AccountEvent] = []
    for command in cmds:
        try:
            new = agg.decide(state, command)
        except Overdrawn:
            continue
        events.extend(new)
        state = agg.fold(new, state)
    assert agg.fold(events) == state
    assert state.balance == sum(e.amount if isinstance(e, Deposited) else -e.amount for e in events)
    assert state.balance >= 0


async def test_repository_round_trip_with_snapshots(store: BaseEventStore) -> None:
    repo = ledgerflow.Repository(store, account_aggregate(snapshot_every=3))
    for amount in range(1, 11):
        await repo.handle("42", Deposit(amount))
    loaded = await repo.load("42")
    assert loaded.state == Account(balance=55, moves=10)
    assert loaded.version == 10
    snapshot = await store.load_snapshot("account-42")
    assert snapshot is not None
    assert snapshot.version == 9  # the last multiple of 3 reached


async def test_snapshot_is_used_on_load(store: BaseEventStore) -> None:
    repo = ledgerflow.Repository(store, account_aggregate(snapshot_every=2))
    for _ in range(4):
        await repo.handle("7", Deposit(10))
    # Replace the snapshot by one with a different (wrong) balance: if load uses it,
    # the result shows it. This proves load starts from the snapshot, not from v1.
    forged = dataclasses.replace(Account(balance=1000, moves=4))
    kept = await store.load_snapshot("account-7")
    assert kept is not None
    await store.save_snapshot(
        ledgerflow.Snapshot("account-7", 4, kept.type, 1, b'{"balance":1000,"moves":4}')
    )
    assert (await repo.load("7")).state == forged


async def test_snapshot_of_another_schema_version_is_ignored(store: BaseEventStore) -> None:
    old = ledgerflow.Repository(store, account_aggregate(snapshot_every=2, snapshot_version=1))
    for _ in range(4):
        await old.handle("9", Deposit(5))
    kept = await store.load_snapshot("account-9")
    assert kept is not None
    await store.save_snapshot(
        ledgerflow.Snapshot("account-9", 4, kept.type, 1, b'{"balance":1000,"moves":4}')
    )
    new = ledgerflow.Repository(store, account_aggregate(snapshot_every=2, snapshot_version=2))
    assert (await new.load("9")).state == Account(balance=20, moves=4)


@dataclass(frozen=True)
class AccountWithDeposits:
    """``Account`` grown a field, with a default, without a new snapshot_version."""

    balance: int = 0
    moves: int = 0
    deposits: int = 0


def evolve_counting(state: AccountWithDeposits, event: AccountEvent) -> AccountWithDeposits:
    moved = evolve(Account(state.balance, state.moves), event)
    counted = state.deposits + isinstance(event, Deposited)
    return AccountWithDeposits(moved.balance, moved.moves, counted)


async def test_a_snapshot_of_another_state_shape_is_ignored(store: BaseEventStore) -> None:
    """A field added to the state read as its default from an older snapshot (here
    0 deposits, where the events say 4), and the next snapshot kept that for good."""
    old = ledgerflow.Repository(store, account_aggregate(snapshot_every=2))
    for _ in range(4):
        await old.handle("11", Deposit(5))
    grown: ledgerflow.Aggregate[AccountWithDeposits, Deposit | Withdraw, AccountEvent]
    grown = ledgerflow.Aggregate(
        name="account",
        initial=AccountWithDeposits(),
        decide=lambda state, command: decide(Account(state.balance, state.moves), command),
        evolve=evolve_counting,
        state_type=AccountWithDeposits,
        snapshot_every=2,
    )
    new = ledgerflow.Repository(store, grown)
    assert (await new.load("11")).state == AccountWithDeposits(20, 4, 4)
    await new.handle("11", Deposit(5))
    await new.handle("11", Deposit(5))  # a snapshot of the new shape, at version 6
    assert (await new.load("11")).state == AccountWithDeposits(30, 6, 6)
    assert (await old.load("11")).state == Account(30, 6)  # not fooled by the new one


async def test_a_snapshot_that_does_not_decode_is_rebuilt_from_events(
    store: BaseEventStore, caplog: pytest.LogCaptureFixture
) -> None:
    repo = ledgerflow.Repository(store, account_aggregate(snapshot_every=2))
    for _ in range(2):
        await repo.handle("12", Deposit(5))
    kept = await store.load_snapshot("account-12")
    assert kept is not None
    await store.save_snapshot(ledgerflow.Snapshot("account-12", 2, kept.type, 1, b'{"balance":'))
    assert (await repo.load("12")).state == Account(balance=10, moves=2)
    assert "snapshot of account-12 ignored" in caplog.text


async def test_a_snapshot_ahead_of_its_stream_is_ignored(
    store: BaseEventStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Loaded at the snapshot's version, every later save conflicted for ever."""
    repo = ledgerflow.Repository(store, account_aggregate(snapshot_every=2))
    for _ in range(3):
        await repo.handle("13", Deposit(5))
    kept = await store.load_snapshot("account-13")
    assert kept is not None
    ahead = b'{"balance":999,"moves":1000000}'
    await store.save_snapshot(ledgerflow.Snapshot("account-13", 1_000_000, kept.type, 1, ahead))
    loaded = await repo.load("13")
    assert (loaded.state, loaded.version) == (Account(balance=15, moves=3), 3)
    assert "the stream is behind it" in caplog.text
    assert (await repo.handle("13", Deposit(5)))[0].version == 4


async def test_business_rule_violation_writes_nothing(store: BaseEventStore) -> None:
    repo = ledgerflow.Repository(store, account_aggregate())
    await repo.handle("1", Deposit(10))
    with pytest.raises(Overdrawn):
        await repo.handle("1", Withdraw(11))
    assert await store.stream_version("account-1") == 1


async def test_stale_save_raises_concurrency_error(store: BaseEventStore) -> None:
    repo = ledgerflow.Repository(store, account_aggregate())
    await repo.handle("1", Deposit(10))
    stale = await repo.load("1")
    await repo.handle("1", Deposit(5))
    with pytest.raises(ledgerflow.ConcurrencyError) as caught:
        await repo.save(stale, [Withdrawn(10)])
    assert (caught.value.expected, caught.value.actual) == (1, 2)


async def test_handle_retries_after_a_lost_race(store: BaseEventStore) -> None:
    repo = ledgerflow.Repository(store, account_aggregate(snapshot_every=None))
    await repo.handle("r", Deposit(1))
    # Many concurrent commands on one aggregate: all succeed through reload + retry.
    import asyncio

    await asyncio.gather(*(repo.handle("r", Deposit(1), attempts=50) for _ in range(10)))
    loaded = await repo.load("r")
    assert loaded.state.balance == 11
    assert loaded.version == 11


async def test_metadata_reaches_the_events(store: BaseEventStore) -> None:
    repo = ledgerflow.Repository(store, account_aggregate())
    meta = ledgerflow.Metadata(actor="alice", correlation_id="c-1", reason="payday")
    await repo.handle("m", Deposit(3), metadata=meta)
    (event,) = await store.read_stream("account-m")
    assert event.metadata == meta
    assert event.data == Deposited(3)


async def test_unknown_aggregate_loads_as_initial(store: BaseEventStore) -> None:
    loaded = await ledgerflow.Repository(store, account_aggregate()).load("nobody")
    assert (loaded.state, loaded.version) == (Account(), 0)


def test_snapshot_every_must_be_positive() -> None:
    with pytest.raises(ledgerflow.ConfigurationError):
        account_aggregate(snapshot_every=0)
