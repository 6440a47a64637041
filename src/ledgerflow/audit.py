"""Tamper evidence: walk the ledger and check every stream's hash chain.

``verify_ledger`` reads every stored row in global order (undecoded, so even data
no longer registered or no longer valid JSON is checked) and reports each event
that was edited, removed or reordered since it was written, and each stream head
that no longer matches its events. It needs no secret: it detects changes made
without recomputing the chain. An attacker who rewrites a whole stream and its
head consistently is out of its reach, which is why auditors keep exported
stream heads elsewhere.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field

from .audit_tree import TreeCheck, TreeFinding
from .hashing import GENESIS_HASH, chain_hash
from .signing import LogVerifier
from .store import EventRow, StreamHead
from .store.ports import EventStore
from .witness import Witness

__all__ = ["Finding", "FindingKind", "VerifyReport", "verify_ledger"]


class FindingKind(enum.Enum):
    EDITED = "edited"
    """The event's stored fields no longer produce its hash, or its successor (or
    the stream head) recorded a different hash for it."""
    REMOVED = "removed"
    """A stream version or global position that should exist is missing."""
    REORDERED = "reordered"
    """The event sits out of version order in the global log."""
    HEAD_MISMATCH = "head_mismatch"
    """The recorded stream head disagrees with the stream's events."""
    DERIVED = "derived"
    """A table derived from the ledger (an instance's status row) disagrees with it
    (``ledgerflow.audit_instances``)."""
    CHECKPOINT = "checkpoint"
    """The log no longer produces a tree head it checkpointed or a witness holds
    (cut, rewritten or re-chained), or the checkpoints themselves were changed
    (``ledgerflow.audit_tree``)."""


@dataclass(frozen=True, slots=True)
class Finding:
    kind: FindingKind
    stream_id: str | None
    version: int | None
    position: int | None
    detail: str

    def __str__(self) -> str:
        where = []
        if self.stream_id is not None:
            where.append(f"stream {self.stream_id!r}")
        if self.version is not None:
            where.append(f"version {self.version}")
        if self.position is not None:
            where.append(f"position {self.position}")
        if not where:
            return f"{self.kind.value}: {self.detail}"
        return f"{self.kind.value}: {', '.join(where)}: {self.detail}"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    events_checked: int
    streams_checked: int
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings


@dataclass(frozen=True, slots=True)
class _Seen:
    position: int
    version: int
    hash: bytes
    prev_hash: bytes
    intact: bool


def _intact(row: EventRow) -> bool:
    return row.hash == row_hash(row)


def row_hash(row: EventRow) -> bytes:
    """The hash that chains ``row`` as stored: what ``row.hash`` must equal."""
    return chain_hash(
        row.prev_hash,
        row.id,
        row.stream_id,
        row.version,
        row.position,
        row.type,
        row.schema_version,
        row.data,
        row.metadata,
        row.recorded_at_us,
    )


async def verify_ledger(
    store: EventStore,
    *,
    batch_size: int = 2000,
    witness: Witness | None = None,
    verifier: LogVerifier | None = None,
) -> VerifyReport:
    """Check every event and stream head, and the log against its Merkle tiles and
    checkpoints (and ``witness``'s heads, signed by ``verifier``'s key, if given);
    the report lists each problem found.

    Events and heads are read as of one moment (``store.read_snapshot``): appends
    made while it runs are not mistaken for tampering, nor seen half-way.
    """
    findings: list[Finding] = []
    streams: dict[str, list[_Seen]] = {}
    gaps: list[tuple[int, int]] = []
    broken: list[EventRow] = []
    expected_position = 1
    checked = 0
    dense = store.dense_positions
    tree = TreeCheck(store, witness=witness, verifier=verifier)
    await tree.prepare()

    def visit(rows: list[EventRow]) -> None:
        nonlocal expected_position, checked
        for row in rows:
            # A missing position proves a removal only where writers leave none
            # (PostgreSQL may skip positions a write took and did not commit).
            if row.position > expected_position and dense:
                gaps.append((expected_position, row.position - 1))
            expected_position = row.position + 1
            checked += 1
            intact = _intact(row)
            if not intact and len(broken) < _EXPLAINED:
                broken.append(row)
            streams.setdefault(row.stream_id, []).append(
                _Seen(row.position, row.version, row.hash, row.prev_hash, intact)
            )
            tree.visit(row)

    heads = await store.read_snapshot(visit, batch_size=batch_size)
    tree.end()
    named = [_finding(f) for f in await tree.findings()]
    removed = {f.position for f in named if f.kind is FindingKind.REMOVED}
    findings.extend(_gap_findings(gaps, removed))
    moved = _moved(broken)
    for stream_id in sorted(streams.keys() | heads.keys()):
        findings.extend(
            _check_stream(stream_id, streams.get(stream_id, []), heads.get(stream_id), moved)
        )
    seen = {(f.kind, f.stream_id, f.version) for f in findings if f.stream_id is not None}
    findings.extend(
        f for f in named if f.stream_id is None or (f.kind, f.stream_id, f.version) not in seen
    )
    return VerifyReport(checked, len(streams.keys() | heads.keys()), findings)


_EXPLAINED = 1000
"""Events whose stored fields no longer match their hash that verify tries to explain
as moved (another version or position swapped in): the cost is quadratic in them."""


def _finding(found: TreeFinding) -> Finding:
    return Finding(
        FindingKind(found.kind), found.stream_id, found.version, found.position, found.detail
    )


def _gap_findings(gaps: list[tuple[int, int]], named: set[int | None]) -> list[Finding]:
    """Holes in the global log, less the positions the tiles name an event for."""
    findings = []
    for first, last in gaps:
        start: int | None = None
        for position in range(first, last + 2):
            unnamed = position <= last and position not in named
            if unnamed and start is None:
                start = position
            elif not unnamed and start is not None:
                where = (
                    f"position {start}"
                    if start == position - 1
                    else (f"positions {start}..{position - 1}")
                )
                findings.append(
                    Finding(
                        FindingKind.REMOVED,
                        None,
                        None,
                        start,
                        f"{where} missing from the global log",
                    )
                )
                start = None
    return findings


def _moved(broken: list[EventRow]) -> dict[int, str]:
    """For events whose fields no longer match their hash, the ones that match it
    again with another event's version or position: swapped, not edited."""
    moved: dict[int, str] = {}
    for row in broken:
        for other in broken:
            if other is row:
                continue
            if (
                other.stream_id == row.stream_id
                and row_hash(dataclasses.replace(row, version=other.version)) == row.hash
            ):
                moved[row.position] = (
                    f"holds the event written as version {other.version}: its version was changed"
                )
                break
            if row_hash(dataclasses.replace(row, position=other.position)) == row.hash:
                moved[row.position] = (
                    f"holds the event written at position {other.position}: it was moved"
                )
                break
    return moved


def _check_stream(
    stream_id: str, seen: list[_Seen], head: StreamHead | None, moved: dict[int, str]
) -> list[Finding]:
    findings: list[Finding] = []
    # In global (position) order versions must rise; an event whose version is lower
    # than one before it was moved.
    reordered: set[int] = set()
    highest = 0
    for event in seen:
        if event.version < highest:
            reordered.add(event.position)
        if event.version < highest and event.position not in moved:
            findings.append(
                Finding(
                    FindingKind.REORDERED,
                    stream_id,
                    event.version,
                    event.position,
                    f"appears after version {highest} in the global log",
                )
            )
        highest = max(highest, event.version)
    by_version = sorted(seen, key=lambda e: e.version)
    prev: _Seen | None = None
    expected_version = 1
    for event in by_version:
        if event.version > expected_version:
            missing = (
                f"version {expected_version}"
                if event.version == expected_version + 1
                else f"versions {expected_version}..{event.version - 1}"
            )
            findings.append(
                Finding(
                    FindingKind.REMOVED, stream_id, expected_version, None, f"{missing} missing"
                )
            )
        if not event.intact and event.position in moved:
            findings.append(
                Finding(
                    FindingKind.REORDERED,
                    stream_id,
                    event.version,
                    event.position,
                    moved[event.position],
                )
            )
        elif not event.intact and event.position not in reordered:
            findings.append(
                Finding(
                    FindingKind.EDITED,
                    stream_id,
                    event.version,
                    event.position,
                    "stored fields do not match the event's hash",
                )
            )
        linked = GENESIS_HASH if event.version == 1 else (prev.hash if prev else None)
        if (
            prev is not None
            and prev.version == event.version - 1
            and linked != event.prev_hash
            and prev.intact
        ):
            findings.append(
                Finding(
                    FindingKind.EDITED,
                    stream_id,
                    prev.version,
                    prev.position,
                    f"its hash differs from the one version {event.version} chained to",
                )
            )
        if event.version == 1 and event.prev_hash != GENESIS_HASH and event.intact:
            findings.append(
                Finding(
                    FindingKind.EDITED,
                    stream_id,
                    1,
                    event.position,
                    "the first event of the stream does not start the chain",
                )
            )
        prev = event
        expected_version = event.version + 1
    last = by_version[-1] if by_version else None
    if head is None:
        findings.append(
            Finding(FindingKind.HEAD_MISMATCH, stream_id, None, None, "stream head is missing")
        )
    elif last is None or head.version > last.version:
        have = 0 if last is None else last.version
        findings.append(
            Finding(
                FindingKind.REMOVED,
                stream_id,
                have + 1,
                None,
                f"the stream head records version {head.version} but events end at {have}",
            )
        )
    elif head.version < last.version:
        findings.append(
            Finding(
                FindingKind.HEAD_MISMATCH,
                stream_id,
                head.version,
                None,
                f"the stream head records version {head.version} but events reach {last.version}",
            )
        )
    elif head.last_hash != last.hash and last.intact:
        findings.append(
            Finding(
                FindingKind.EDITED,
                stream_id,
                last.version,
                last.position,
                "its hash differs from the one the stream head recorded",
            )
        )
    return findings
