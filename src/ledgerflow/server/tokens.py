"""OIDC / JWT bearer tokens, verified with PyJWT against a JSON Web Key Set from a
URL (fetched and cached by PyJWT's client) or a file.

Only asymmetric algorithms are accepted: a server that knows only public keys
cannot be made to accept a token signed with one of them as an HMAC secret.
The token must name its key (``kid``), be signed by it, not be expired, and carry
the configured issuer and audience; the role and the tenant come from claims.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from ..errors import ConfigurationError, WorkflowInputError
from ..tenants import ALL_TENANTS, check_tenant
from .principals import Principal, Role

__all__ = ["TokenError", "TokenVerifier"]

ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA")


class TokenError(Exception):
    """A token that proves nothing (401) or grants nothing here (``forbidden``: 403)."""

    def __init__(self, reason: str, *, forbidden: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.forbidden = forbidden


@dataclass(frozen=True, slots=True)
class TokenVerifier:
    """Verifies bearer tokens; build it with ``from_url`` or ``from_file``."""

    issuer: str
    audience: str
    role_claim: str = "ledgerflow_role"
    tenant_claim: str = "ledgerflow_tenant"
    leeway_s: float = 30.0
    _client: jwt.PyJWKClient | None = None
    _keys: jwt.PyJWKSet | None = None

    @classmethod
    def from_url(cls, url: str, *, issuer: str, audience: str, **claims: Any) -> TokenVerifier:
        # Keys are cached; a token naming an unknown kid makes the client fetch the
        # set again (a key rotated in), at most as often as PyJWT allows.
        client = jwt.PyJWKClient(url, cache_keys=True, lifespan=300, timeout=10)
        return cls(issuer, audience, _client=client, **claims)

    @classmethod
    def from_file(
        cls, path: str | Path, *, issuer: str, audience: str, **claims: Any
    ) -> TokenVerifier:
        try:
            keys = jwt.PyJWKSet.from_json(Path(path).read_text())
        except (OSError, ValueError, jwt.PyJWKSetError, jwt.PyJWKError) as exc:
            raise ConfigurationError(f"JWKS file {str(path)!r}: {exc}") from exc
        return cls(issuer, audience, _keys=keys, **claims)

    async def verify(self, token: str) -> Principal:
        key = await self._key(token)
        if key.algorithm_name not in ALGORITHMS:
            raise TokenError(
                f"the token's key uses {key.algorithm_name}, not an accepted algorithm"
            )
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm_name],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("the token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise TokenError(f"the token is not valid: {exc}") from None
        return self._principal(claims)

    async def _key(self, token: str) -> jwt.PyJWK:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise TokenError("the token is not a JWT") from None
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise TokenError("the token names no key (kid)")
        if self._keys is not None:
            for key in self._keys.keys:
                if key.key_id == kid:
                    return key
            raise TokenError(f"no key {kid!r} in the key set")
        assert self._client is not None
        client = self._client
        try:
            # PyJWT's client fetches with urllib: off the event loop.
            return await asyncio.to_thread(client.get_signing_key, kid)
        except jwt.PyJWKClientConnectionError as exc:
            raise TokenError(f"the key set could not be fetched: {exc}") from None
        except jwt.PyJWKClientError as exc:
            raise TokenError(f"no usable key {kid!r}: {exc}") from None

    def _principal(self, claims: dict[str, Any]) -> Principal:
        subject = claims.get("sub")
        if not (isinstance(subject, str) and 0 < len(subject) <= 200 and subject.isprintable()):
            # The ledger records who acted as jwt:<sub>, and rate limits go by it: an
            # empty or unprintable one would name nobody, or fake another line.
            raise TokenError("the token's subject (sub) must be 1-200 printable characters")
        granted = claims.get(self.role_claim)
        names = granted if isinstance(granted, list) else [granted]
        roles = []
        for name in names:
            if isinstance(name, str):
                try:
                    roles.append(Role.parse(name))
                except ValueError:
                    continue
        if not roles:
            raise TokenError(
                f"the token grants no role (claim {self.role_claim!r})", forbidden=True
            )
        tenant = claims.get(self.tenant_claim)
        if tenant != ALL_TENANTS:
            try:
                check_tenant(tenant)
            except WorkflowInputError:
                raise TokenError(
                    f"the token names no valid tenant (claim {self.tenant_claim!r})",
                    forbidden=True,
                ) from None
        return Principal(f"jwt:{subject}", max(roles), str(tenant))
