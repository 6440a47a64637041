"""Base64 in JSON documents (signed heads, bundles): bytes as text, and back with
an error that names the field."""

from __future__ import annotations

import base64
from typing import Any

__all__ = ["from_text", "to_text"]


def to_text(data: bytes) -> str:
    return base64.b64encode(data).decode()


def from_text(value: Any, what: str) -> bytes:
    """``ValueError`` naming ``what`` unless ``value`` is a valid base64 string."""
    if not isinstance(value, str):
        raise ValueError(f"{what} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise ValueError(f"{what} is not valid base64") from None
