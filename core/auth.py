"""Bearer tokens: validation (OIDC issuer's JWKS, or the dev key) and dev-token minting.

Validation is strict: the algorithm must be one we accept for the key that verifies it
(`alg: none` and an HS256 token against an asymmetric key are refused), `exp` is required,
`aud` must contain the configured audience, and an OIDC token's `iss` must be the issuer.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
from joserfc import jws, jwt
from joserfc.errors import BadSignatureError, ClaimError, ExpiredTokenError, JoseError
from joserfc.jwk import KeySet, OctKey
from joserfc.jwt import JWTClaimsRegistry

from core.errors import Unauthenticated
from core.settings import Settings
from models.enums import Role
from models.scope import Scope

DEV_ISSUER = "motorcade-dev"
DEV_ALGORITHM = "HS256"
SCOPE_CLAIMS = ("regions", "models", "orgs")


class TokenError(Unauthenticated):
    """The token is missing, malformed, expired, or not signed by a key we trust (401)."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's subject, role and scopes (None = unrestricted)."""

    subject: str
    role: Role
    regions: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    orgs: tuple[str, ...] | None = None
    vehicle_id: str | None = None
    claims: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def scope(self) -> Scope:
        return Scope(regions=self.regions, models=self.models, orgs=self.orgs)


def _scope(claims: dict[str, Any], name: str) -> tuple[str, ...] | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.split(",") if v]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TokenError(f"claim {name!r} must be a list of strings")
    return tuple(value)


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise TokenError("token has no subject")
    try:
        role = Role(str(claims.get("role", "")))
    except ValueError:
        raise TokenError("token names no known role") from None
    vehicle_id = claims.get("vehicleId")
    if role is Role.DEVICE and not (isinstance(vehicle_id, str) and vehicle_id):
        raise TokenError("a device token must name its vehicleId")
    return Principal(
        subject=subject,
        role=role,
        regions=_scope(claims, "regions"),
        models=_scope(claims, "models"),
        orgs=_scope(claims, "orgs"),
        vehicle_id=vehicle_id if isinstance(vehicle_id, str) else None,
        claims=claims,
    )


class JwksCache:
    """Fetches the issuer's JWKS (discovering its URL if needed) and caches it for a while.

    An unknown `kid` refreshes the set at most once every 30 s, to follow key rotation
    without letting bad tokens hammer the identity provider.
    """

    def __init__(self, settings: Settings, client: httpx.AsyncClient | None = None) -> None:
        self._settings = settings
        self._client = client
        self._keys: KeySet | None = None
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()

    async def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=5.0)
        return self._client

    async def _jwks_url(self) -> str:
        if self._settings.oidc_jwks_url:
            return self._settings.oidc_jwks_url
        issuer = (self._settings.oidc_issuer or "").rstrip("/")
        response = await (await self._http()).get(f"{issuer}/.well-known/openid-configuration")
        response.raise_for_status()
        return str(response.json()["jwks_uri"])

    async def get(self, kid: str | None) -> KeySet:
        now = time.monotonic()
        fresh = now - self._fetched_at < self._settings.jwks_cache_seconds
        known = self._keys is not None and (
            kid is None or any(k.kid == kid for k in self._keys.keys)
        )
        if self._keys is not None and fresh and (known or now - self._fetched_at < 30):
            return self._keys
        async with self._lock:
            if self._keys is None or time.monotonic() - self._fetched_at >= 30 or not fresh:
                try:
                    response = await (await self._http()).get(await self._jwks_url())
                    response.raise_for_status()
                    self._keys = KeySet.import_key_set(response.json())
                    self._fetched_at = time.monotonic()
                except (httpx.HTTPError, ValueError, KeyError, JoseError) as exc:
                    if self._keys is None:
                        raise TokenError("the identity provider's keys are unavailable") from exc
        assert self._keys is not None
        return self._keys

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


# A token verified once is trusted again, without its signature being checked, for at most
# this long and never past its expiry: its claims cannot change (the signature covers them).
# Bounded: the oldest entries go first.
VERIFIED_TOKEN_SECONDS = 60.0
VERIFIED_TOKEN_ENTRIES = 10_000


class TokenVerifier:
    def __init__(self, settings: Settings, jwks: JwksCache | None = None) -> None:
        self._verified: dict[str, tuple[Principal, float]] = {}
        self._settings = settings
        self._dev_key = (
            OctKey.import_key(settings.dev_key.get_secret_value()) if settings.dev_key else None
        )
        self._jwks = jwks or (JwksCache(settings) if settings.oidc_issuer else None)

    async def verify(self, token: str) -> Principal:
        """The caller of a bearer token; a token verified in the last minute is not verified
        again (the signature check was a tenth of a read's CPU)."""
        known = self._verified.get(token)
        if known is not None:
            if time.time() < known[1]:
                return known[0]
            del self._verified[token]
        principal, expires = await self._verify(token)
        if len(self._verified) >= VERIFIED_TOKEN_ENTRIES:
            del self._verified[next(iter(self._verified))]
        until = min(time.time() + VERIFIED_TOKEN_SECONDS, expires)
        self._verified[token] = (principal, until)
        return principal

    async def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            header = jws.extract_compact(token.encode()).protected
        except (JoseError, ValueError) as exc:
            raise TokenError("malformed token") from exc
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise TokenError("unsigned tokens are refused")
        try:
            if alg == DEV_ALGORITHM and self._dev_key is not None:
                decoded = jwt.decode(token, self._dev_key, algorithms=[DEV_ALGORITHM])
                issuer = DEV_ISSUER
            elif alg in self._settings.oidc_algorithms and self._jwks is not None:
                keys = await self._jwks.get(header.get("kid"))
                decoded = jwt.decode(token, keys, algorithms=self._settings.oidc_algorithms)
                issuer = str(self._settings.oidc_issuer)
            else:
                raise TokenError(f"algorithm {alg!r} is not accepted")
            registry = JWTClaimsRegistry(
                leeway=self._settings.token_leeway_seconds,
                iss={"essential": True, "value": issuer},
                aud={"essential": True, "value": self._settings.oidc_audience},
                exp={"essential": True},
                sub={"essential": True},
            )
            registry.validate(decoded.claims)
            expires = float(decoded.claims["exp"]) + self._settings.token_leeway_seconds
        except TokenError:
            raise
        except (JoseError, ValueError, TypeError) as exc:
            raise TokenError(_describe(exc)) from exc
        return principal_from_claims(dict(decoded.claims)), expires

    async def aclose(self) -> None:
        if self._jwks is not None:
            await self._jwks.aclose()


def _describe(exc: Exception) -> str:
    if isinstance(exc, ExpiredTokenError):
        return "token has expired"
    if isinstance(exc, BadSignatureError):
        return "token signature is invalid"
    if isinstance(exc, ClaimError):
        return f"token claims are not acceptable ({exc})"
    return "token is invalid"


def generate_dev_key() -> str:
    return secrets.token_urlsafe(48)


def mint_dev_token(
    dev_key: str,
    *,
    role: Role,
    subject: str | None = None,
    audience: str = "motorcade",
    vehicle_id: str | None = None,
    scopes: dict[str, list[str]] | None = None,
    ttl_seconds: int = 12 * 3600,
    now: float | None = None,
) -> str:
    """A dev token signed with the dev key (HS256). Only for `make dev` and tests."""
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {
        "iss": DEV_ISSUER,
        "aud": audience,
        "sub": subject or (f"device:{vehicle_id}" if vehicle_id else f"dev-{role.value}"),
        "role": role.value,
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl_seconds,
        "jti": str(uuid.uuid4()),
    }
    if vehicle_id:
        claims["vehicleId"] = vehicle_id
    for name, values in (scopes or {}).items():
        if name not in SCOPE_CLAIMS:
            raise ValueError(f"unknown scope {name!r}; use one of {SCOPE_CLAIMS}")
        claims[name] = list(values)
    return jwt.encode({"alg": DEV_ALGORITHM, "typ": "JWT"}, claims, OctKey.import_key(dev_key))
