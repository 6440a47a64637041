"""Tenants: namespaces of workflow instances in one ledger.

An instance started for a tenant has the id ``<tenant>/<id>``; its children are
started there too. The HTTP API shows a tenant's callers only the ids under their
prefix, with the prefix taken off, so tenants can neither read nor guess each other's
instances. Ids under ``acme/`` belong to tenant ``acme`` however they were started.
"""

from __future__ import annotations

import re

from .errors import WorkflowInputError

__all__ = ["ALL_TENANTS", "check_tenant", "is_tenant_name", "tenant_prefix"]

ALL_TENANTS = "*"
"""The scope of a principal who sees every instance (a single-tenant deployment's
operators, a platform's administrators): ids are shown whole."""

_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def is_tenant_name(name: str) -> bool:
    """Whether ``name`` can name a tenant (see ``check_tenant``)."""
    return _NAME.fullmatch(name) is not None


def check_tenant(name: object, workflow: str = "") -> str:
    """``name`` if it can name a tenant: 1-63 lowercase letters, digits and dashes,
    not starting with a dash (so it is a DNS label, a schema suffix, a path segment);
    else ``WorkflowInputError`` (of ``workflow``, when starting one)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise WorkflowInputError(
            workflow or "tenant",
            f"a tenant is 1-63 lowercase letters, digits and dashes, "
            f"not starting with a dash; not {name!r:.80}",
        )
    return name


def tenant_prefix(tenant: str) -> str:
    """The start of every id in ``tenant``'s namespace."""
    return f"{check_tenant(tenant)}/"
