"""The runtime-row part of a workflow store that appends do not write: claims,
renewals and releases of instance leases, reads of instances and wake-ups, and the
registry of workers. Adapters supply the ``_`` hooks."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Collection, Sequence
from datetime import UTC, datetime

from ..hashing import to_micros
from ._checks import (
    _MAX_INT32,
    _check_int,
    _check_limit,
    _check_worker,
    _check_worker_id,
    _check_worker_now,
    _checked_kinds,
    _invalid,
)
from .runtime import InstanceQuery, InstanceRow, Lease, WakeupRow, WorkerRow

__all__ = ["RuntimeRows"]

_IDS_PER_READ = 500
"""Ids one read of ``get_instances`` asks for (SQLite takes 32,766 parameters)."""


class RuntimeRows(abc.ABC):
    """Mixed into ``BaseEventStore``; see ``ports.WorkflowStore`` for the contract."""

    @abc.abstractmethod
    def _check_open(self) -> None: ...

    # -- runtime rows ---------------------------------------------------------------

    async def claim_wakeups(
        self,
        owner: str,
        *,
        now_us: int,
        lease_until_us: int,
        limit: int,
        workflows: Collection[tuple[str, int]] | None = None,
    ) -> list[Lease]:
        """Lease up to ``limit`` instances due by ``now_us`` that nobody holds (or
        whose lease expired) to ``owner``, each at its next epoch; earliest due first.
        With ``workflows``, only instances of those (name, version) pairs: a worker
        claims only what it can run."""
        self._check_open()
        if limit < 1:
            return []
        kinds = _checked_kinds(workflows)
        if kinds == ():
            return []
        return await self._claim_wakeups(owner, now_us, lease_until_us, limit, kinds)

    async def database_now_us(self) -> int:
        """The database's own clock (µs): what workers on many hosts agree on. An
        embedded store's database runs on this machine: its clock is this one's."""
        self._check_open()
        return to_micros(datetime.now(UTC))

    async def check_ready(self) -> None:
        """Return if the store answers and takes writes now (a readiness probe);
        adapters with a database to ask override it."""
        self._check_open()

    async def renew_leases(
        self, owner: str, leases: Sequence[Lease], *, lease_until_us: int
    ) -> list[Lease]:
        """Extend ``owner``'s leases (a heartbeat) that are still its own at their
        epoch; those it still holds. The others were taken over or given back."""
        self._check_open()
        if not leases:
            return []
        return await self._renew_leases(owner, list(leases), lease_until_us)

    async def next_wakeup(
        self, *, workflows: Collection[tuple[str, int]] | None = None
    ) -> int | None:
        """The earliest moment (µs) some instance (of ``workflows``, if given) may
        become claimable; None if none."""
        self._check_open()
        kinds = _checked_kinds(workflows)
        if kinds == ():
            return None
        return await self._next_wakeup(kinds)

    async def release_wakeups(self, owner: str | None = None) -> int:
        """Drop the leases of ``owner`` (every lease if None); how many were held."""
        self._check_open()
        return await self._release_wakeups(owner)

    async def lease_owners(self) -> list[str]:
        """Every owner that holds a lease now, expired or not, in order."""
        self._check_open()
        return await self._lease_owners()

    async def get_wakeup(self, workflow_id: str) -> WakeupRow | None:
        self._check_open()
        return await self._get_wakeup(workflow_id)

    async def get_instance(self, workflow_id: str) -> InstanceRow | None:
        self._check_open()
        return await self._get_instance(workflow_id)

    async def get_instances(self, workflow_ids: Sequence[str]) -> list[InstanceRow]:
        """The rows of those of ``workflow_ids`` that exist, in no set order."""
        self._check_open()
        wanted = list(dict.fromkeys(workflow_ids))
        if not all(isinstance(w, str) for w in wanted):
            raise _invalid(f"workflow_ids must be strings, not {workflow_ids!r:.80}")
        found: list[InstanceRow] = []
        for start in range(0, len(wanted), _IDS_PER_READ):
            found += await self._get_instances(wanted[start : start + _IDS_PER_READ])
        return found

    async def list_instances(
        self,
        *,
        status: str | None = None,
        after: str | None = None,
        limit: int = 100,
        query: InstanceQuery | None = None,
    ) -> list[InstanceRow]:
        """Instances in id order (or newest first: ``query``) after the instance
        ``after`` (a page's last id), of one status or matching ``query``."""
        self._check_open()
        _check_limit(limit)
        query = _check_query(query or InstanceQuery(), status)
        return await self._list_instances(query, after, limit)

    async def count_instances(self, statuses: Sequence[str]) -> dict[str, int]:
        """How many instances have each of ``statuses`` (every one named, 0 if
        none): an index range per status, so meant for the few instances not ended
        (what metrics report), not for counting all that ever ran."""
        self._check_open()
        wanted = list(dict.fromkeys(statuses))
        if not all(isinstance(s, str) and s for s in wanted):
            raise ValueError(f"statuses must be non-empty strings, not {statuses!r}")
        found = await self._count_instances(wanted) if wanted else {}
        return {status: found.get(status, 0) for status in wanted}

    # -- the registry of workers -------------------------------------------------------

    async def register_worker(self, info: WorkerRow) -> None:
        """Insert the worker's row, or replace every column of it."""
        self._check_open()
        await self._register_worker(_check_worker(info))

    async def heartbeat_worker(
        self, worker_id: str, *, now_us: int, in_flight: int, stopping: bool = False
    ) -> bool:
        """Set the worker's heartbeat to ``now_us`` with what it reports; False if it
        has no row (it was reaped, or never registered)."""
        self._check_open()
        _check_worker_id(worker_id)
        _check_worker_now(now_us)
        _check_int(in_flight, "in_flight", 0, _MAX_INT32)
        if not isinstance(stopping, bool):
            raise _invalid(f"stopping must be a bool, not {stopping!r:.60}")
        return await self._heartbeat_worker(worker_id, now_us, in_flight, stopping)

    async def deregister_worker(self, worker_id: str) -> None:
        self._check_open()
        _check_worker_id(worker_id)
        await self._deregister_worker(worker_id)

    async def list_workers(self) -> list[WorkerRow]:
        """Every registered worker in id order."""
        self._check_open()
        return await self._list_workers()

    async def reap_workers(self, now_us: int) -> list[str]:
        """Remove the workers dead at ``now_us`` (``heartbeat_at + lease_us <
        now_us``) and release their leases, with the expired leases of owners that
        have no row, in one transaction; the removed ids in order. Releasing keeps
        each lease's epoch, as ``release_wakeups`` does: a reaped runner that comes
        back fails its fence and records nothing."""
        self._check_open()
        _check_worker_now(now_us)
        return await self._reap_workers(now_us)

    # -- adapter hooks --------------------------------------------------------------

    @abc.abstractmethod
    async def _claim_wakeups(
        self,
        owner: str,
        now_us: int,
        lease_until_us: int,
        limit: int,
        workflows: tuple[tuple[str, int], ...] | None,
    ) -> list[Lease]: ...

    @abc.abstractmethod
    async def _next_wakeup(self, workflows: tuple[tuple[str, int], ...] | None) -> int | None: ...

    @abc.abstractmethod
    async def _renew_leases(
        self, owner: str, leases: list[Lease], lease_until_us: int
    ) -> list[Lease]: ...

    @abc.abstractmethod
    async def _release_wakeups(self, owner: str | None) -> int: ...

    @abc.abstractmethod
    async def _lease_owners(self) -> list[str]: ...

    @abc.abstractmethod
    async def _get_wakeup(self, workflow_id: str) -> WakeupRow | None: ...

    @abc.abstractmethod
    async def _get_instance(self, workflow_id: str) -> InstanceRow | None: ...

    @abc.abstractmethod
    async def _get_instances(self, workflow_ids: list[str]) -> list[InstanceRow]: ...

    @abc.abstractmethod
    async def _list_instances(
        self, query: InstanceQuery, after: str | None, limit: int
    ) -> list[InstanceRow]: ...

    @abc.abstractmethod
    async def _count_instances(self, statuses: list[str]) -> dict[str, int]: ...

    @abc.abstractmethod
    async def _register_worker(self, row: WorkerRow) -> None: ...

    @abc.abstractmethod
    async def _heartbeat_worker(
        self, worker_id: str, now_us: int, in_flight: int, stopping: bool
    ) -> bool: ...

    @abc.abstractmethod
    async def _deregister_worker(self, worker_id: str) -> None: ...

    @abc.abstractmethod
    async def _list_workers(self) -> list[WorkerRow]: ...

    @abc.abstractmethod
    async def _reap_workers(self, now_us: int) -> list[str]: ...


def _check_query(query: InstanceQuery, status: str | None) -> InstanceQuery:
    if status is not None:
        if query.status not in (None, status):
            raise _invalid(f"status {status!r} and a query of status {query.status!r}")
        query = dataclasses.replace(query, status=status)
    for field in ("status", "name", "id_prefix", "text"):
        value = getattr(query, field)
        if value is not None and (not isinstance(value, str) or "\x00" in value):
            raise _invalid(f"{field} must be a string without NUL, not {value!r:.60}")
    for field in ("created_from_us", "created_before_us"):
        value = getattr(query, field)
        if value is not None:
            _check_int(value, field, -(2**63), 2**63 - 1)
    return query


def like_pattern(text: str) -> str:
    """``text`` as a LIKE pattern matching it anywhere, with ``\\`` as the escape."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def matches(row: InstanceRow, query: InstanceQuery) -> bool:
    """Whether ``row`` is one ``query`` asks for: the memory store's filter, and the
    meaning the SQL ones must have."""
    text = None if query.text is None else _ascii_fold(query.text)
    rest = row.workflow_id[len(query.id_prefix or "") :]
    return (
        (query.status is None or row.status == query.status)
        and (query.name is None or row.name == query.name)
        and (query.id_prefix is None or row.workflow_id.startswith(query.id_prefix))
        and (text is None or text in _ascii_fold(rest) or text in _ascii_fold(row.name))
        and (query.created_from_us is None or row.created_at_us >= query.created_from_us)
        and (query.created_before_us is None or row.created_at_us < query.created_before_us)
    )


def _ascii_fold(text: str) -> str:
    # SQLite's LIKE folds ASCII letters only; so does PostgreSQL's ILIKE under the
    # "C" collation the ids use. Folding more here would list more than they do.
    return text.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def instance_filter(
    query: InstanceQuery,
    after: str | None,
    *,
    table: str,
    placeholder: str,
    text_op: str = "LIKE",
    text_collate: str = "",
) -> tuple[str, str, list[object]]:
    """The WHERE and ORDER BY clauses listing the rows of ``table`` (the workflows
    table, schema-qualified where it must be) that ``query`` asks for, after the
    instance ``after``, and their parameters in order; ``placeholder`` is the
    driver's (``?`` or ``%s``); ``text_op`` and ``text_collate`` make the text
    search fold ASCII letters only. Only values travel as parameters."""
    where: list[str] = []
    params: list[object] = []
    if query.status is not None:
        where.append(f"status = {placeholder}")
        params.append(query.status)
    if query.name is not None:
        where.append(f"name = {placeholder}")
        params.append(query.name)
    if query.id_prefix is not None and query.id_prefix:
        # A range of the primary key: every id that starts with the prefix, and no
        # LIKE (whose wildcards the prefix may hold).
        where.append(f"workflow_id >= {placeholder}")
        params.append(query.id_prefix)
        upper = _after_prefix(query.id_prefix)
        if upper is not None:
            where.append(f"workflow_id < {placeholder}")
            params.append(upper)
    if query.text is not None:
        pattern = like_pattern(query.text)
        # In the id after the prefix asked for: a tenant's ids are listed without
        # their "<tenant>/", and a text matching it matched them all.
        skip = len(query.id_prefix or "")
        ids = f"substr(workflow_id, {skip + 1})" if skip else "workflow_id"
        where.append(
            f"({ids}{text_collate} {text_op} {placeholder} ESCAPE '\\' "
            f"OR name{text_collate} {text_op} {placeholder} ESCAPE '\\')"
        )
        params += [pattern, pattern]
    if query.created_from_us is not None:
        where.append(f"created_at >= {placeholder}")
        params.append(query.created_from_us)
    if query.created_before_us is not None:
        where.append(f"created_at < {placeholder}")
        params.append(query.created_before_us)
    if query.newest_first:
        if after is not None:
            where.append(
                f"(created_at, workflow_id) < (SELECT created_at, workflow_id "
                f"FROM {table} WHERE workflow_id = {placeholder})"
            )
            params.append(after)
        order = "created_at DESC, workflow_id DESC"
    else:
        if after is not None:
            where.append(f"workflow_id > {placeholder}")
            params.append(after)
        order = "workflow_id"
    return " AND ".join(where) or "1 = 1", order, params


def _after_prefix(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` (None when
    there is none: the prefix is all U+10FFFF)."""
    stripped = prefix.rstrip("\U0010ffff")
    if not stripped:
        return None
    following = ord(stripped[-1]) + 1
    if 0xD800 <= following <= 0xDFFF:  # surrogates are no characters: skip them
        following = 0xE000
    return stripped[:-1] + chr(following)
