"""Bearer tokens: validation (OIDC issuer's JWKS, or the dev key) and dev-token minting.

Validation is strict: the algorithm must be one we accept for the key that verifies it
(`alg: none` and an HS256 token against an asymmetric key are refused), `exp` is required,
`aud` must contain the configured audience, and an OIDC token's `iss` must be the issuer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import structlog
from cachetools import TLRUCache
from joserfc import jws, jwt
from joserfc.errors import BadSignatureError, ClaimError, ExpiredTokenError, JoseError
from joserfc.jwk import KeySet, OctKey
from joserfc.jwt import JWTClaimsRegistry
from prometheus_client import Counter

from core.errors import Unauthenticated
from core.settings import Settings
from models.enums import Role
from models.scope import Scope

DEV_ISSUER = "motorcade-dev"
DEV_ALGORITHM = "HS256"
SCOPE_CLAIMS = ("regions", "models", "orgs")

log = structlog.stdlib.get_logger("motorcade.auth")
JWKS_REFRESHES = Counter(
    "motorcade_jwks_refreshes_total",
    "Refreshes of the identity provider's JWKS (discovery included), by outcome.",
    ["outcome"],
)


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
    # When the credential expires (epoch seconds): its `exp`. A stream ends then.
    expires_at: float | None = field(default=None, compare=False)

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
    expires = claims.get("exp")
    if role is Role.DEVICE and not (isinstance(vehicle_id, str) and vehicle_id):
        raise TokenError("a device token must name its vehicleId")
    return Principal(
        subject=subject,
        role=role,
        regions=_scope(claims, "regions"),
        models=_scope(claims, "models"),
        orgs=_scope(claims, "orgs"),
        vehicle_id=vehicle_id if isinstance(vehicle_id, str) else None,
        expires_at=float(expires) if isinstance(expires, int | float) else None,
    )


class JwksCache:
    """The issuer's JWKS (its URL discovered from the issuer's metadata unless configured),
    fetched over HTTP and cached for `jwks_cache_seconds`.

    - Single-flight: at most one refresh runs at a time; every request that needs it awaits
      the same task and shares its result. What to do (serve, refresh, refuse) is decided
      synchronously, with no await between the check and starting the refresh.
    - One refresh (discovery, then the key set) is bounded by `jwks_timeout_seconds`.
    - Stale-while-error: past `jwks_cache_seconds` the cached keys are still served while a
      refresh runs in the background, and for `jwks_stale_seconds` more while refreshes fail.
    - At most one fetch per `jwks_min_refresh_seconds`: after a failure (an identity provider
      that is down or hangs costs one timeout per period, not one per request), and for an
      unknown `kid` (key rotation is followed, but a token naming a key the set does not hold
      is refused without a fetch until the period has passed).
    - The discovered JWKS URL is cached like the keys (and discovered again after a failure).
    """

    def __init__(
        self,
        settings: Settings,
        client: httpx.AsyncClient | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._client = client
        self._clock = clock
        self._keys: KeySet | None = None
        self._kids: frozenset[str | None] = frozenset()
        self._fetched_at = 0.0  # when the keys were fetched (clock)
        self._attempted_at: float | None = None  # when the last refresh started (clock)
        self._jwks_url: tuple[str, float] | None = None  # discovered, and when
        self._metadata: tuple[dict[str, Any], float] | None = None  # the same
        self._refresh: asyncio.Task[None] | None = None
        self.fetches = 0  # refreshes started (for operators and tests)

    async def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._settings.jwks_timeout_seconds)
        return self._client

    async def _url(self) -> str:
        if self._settings.oidc_jwks_url:
            return self._settings.oidc_jwks_url
        now = self._clock()
        if self._jwks_url is not None and now - self._jwks_url[1] < self._cache_seconds:
            return self._jwks_url[0]
        url = (await self.issuer_metadata()).get("jwks_uri")
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise ValueError("the issuer's metadata has no jwks_uri")
        self._jwks_url = (url, now)
        return url

    async def issuer_metadata(self) -> dict[str, Any]:
        """The issuer's discovery document (its JWKS and, for the dashboard's sign-in, its
        endpoints), read at most once per MOTORCADE_JWKS_CACHE_SECONDS. Raises what httpx
        raises, or ValueError for an answer that is not a JSON object."""
        now = self._clock()
        if self._metadata is not None and now - self._metadata[1] < self._cache_seconds:
            return self._metadata[0]
        issuer = (self._settings.oidc_issuer or "").rstrip("/")
        response = await (await self._http()).get(f"{issuer}/.well-known/openid-configuration")
        response.raise_for_status()
        metadata = response.json()
        if not isinstance(metadata, dict):
            raise ValueError("the issuer's metadata is not a JSON object")
        self._metadata = (metadata, now)
        return metadata

    @property
    def _cache_seconds(self) -> float:
        return float(self._settings.jwks_cache_seconds)

    def _may_fetch(self, now: float) -> bool:
        return self._refresh is None and (
            self._attempted_at is None
            or now - self._attempted_at >= self._settings.jwks_min_refresh_seconds
        )

    def _start_refresh(self, now: float) -> asyncio.Task[None]:
        self._attempted_at = now
        self.fetches += 1
        self._refresh = asyncio.create_task(self._fetch(), name="jwks-refresh")
        return self._refresh

    async def _fetch(self) -> None:
        """One refresh; it never raises (its outcome is the cache's state), and clears itself."""
        try:
            async with asyncio.timeout(self._settings.jwks_timeout_seconds):
                response = await (await self._http()).get(await self._url())
                response.raise_for_status()
                keys = KeySet.import_key_set(response.json())
            self._keys = keys
            self._kids = frozenset(k.kid for k in keys.keys)
            self._fetched_at = self._clock()
            JWKS_REFRESHES.labels("ok").inc()
        except Exception as exc:  # anything the network or the IdP does: the cache decides
            self._jwks_url = None  # discover again next time: the URL may have moved
            JWKS_REFRESHES.labels("error").inc()
            log.warning(
                "jwks.refresh_failed",
                error=type(exc).__name__,
                message=str(exc)[:200],
                retry_after_seconds=self._settings.jwks_min_refresh_seconds,
            )
        finally:
            self._refresh = None

    def _serve(self, kid: str | None, now: float) -> KeySet:
        """The cached keys if they may still be used for `kid`; else TokenError."""
        if self._keys is None:
            raise TokenError("the identity provider's keys are unavailable")
        if now - self._fetched_at >= self._cache_seconds + self._settings.jwks_stale_seconds:
            raise TokenError("the identity provider's keys are unavailable (too old)")
        if kid is not None and kid not in self._kids:
            raise TokenError("the token's key (kid) is not one of the identity provider's")
        return self._keys

    async def get(self, kid: str | None) -> KeySet:
        now = self._clock()
        age = now - self._fetched_at
        usable = self._keys is not None and age < (
            self._cache_seconds + self._settings.jwks_stale_seconds
        )
        if usable and (kid is None or kid in self._kids):
            if age >= self._cache_seconds and self._may_fetch(now):
                # Expired: served while a refresh runs in the background (and while refreshes
                # fail, within the stale bound); no request waits for it.
                self._start_refresh(now)
            return self._serve(kid, now)
        # No usable keys, or a kid the set does not hold: only a refresh can help.
        task = self._refresh
        if task is None and self._may_fetch(now):
            task = self._start_refresh(now)
        if task is not None:
            await asyncio.shield(task)  # single flight: one refresh however many wait
        return self._serve(kid, self._clock())

    async def aclose(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh
        if self._client is not None:
            await self._client.aclose()


class TokenVerifier:
    """Verifies bearer tokens, and remembers the verified ones: a token seen again within
    `token_cache_seconds` (never past its `exp`) is not verified again (its claims cannot
    change: the signature covers them). The cache holds `token_cache_entries`, least recently
    used evicted first, keyed by the token's SHA-256 (32 bytes, not the token's ~1 KB)."""

    def __init__(self, settings: Settings, jwks: JwksCache | None = None) -> None:
        self._settings = settings
        self._verified: TLRUCache[bytes, tuple[Principal, float]] | None = (
            TLRUCache(
                maxsize=settings.token_cache_entries,
                ttu=lambda _key, value, _now: value[1],
                timer=time.time,
            )
            if settings.token_cache_entries > 0
            else None
        )
        self._dev_key = (
            OctKey.import_key(settings.dev_key.get_secret_value()) if settings.dev_key else None
        )
        self._jwks = jwks or (JwksCache(settings) if settings.oidc_issuer else None)

    async def issuer_metadata(self) -> dict[str, Any]:
        """The issuer's discovery document, as its JWKS cache reads it (ValueError when no
        issuer is configured)."""
        if self._jwks is None:
            raise ValueError("no OIDC issuer is configured")
        return await self._jwks.issuer_metadata()

    async def verify(self, token: str) -> Principal:
        """The caller of a bearer token; a token verified in the last minute is not verified
        again (the signature check was a tenth of a read's CPU)."""
        if self._verified is None:
            return (await self._verify(token))[0]
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        known = self._verified.get(digest)
        if known is not None:
            return known[0]
        principal, expires = await self._verify(token)
        until = min(time.time() + self._settings.token_cache_seconds, expires)
        self._verified[digest] = (principal, until)
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
