"""Token validation: dev key and an OIDC issuer's JWKS served over real HTTP."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, OctKey, RSAKey

from core.auth import TokenError, TokenVerifier, generate_dev_key, mint_dev_token
from core.settings import Settings
from models.enums import Role
from tests.httpserver import QuietHandler, serve

DEV_KEY = generate_dev_key()


def dev_settings(**kw: Any) -> Settings:
    return Settings(env="test", dev_key=DEV_KEY, _env_file=None, **kw)  # type: ignore[call-arg]


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


async def test_dev_token_roundtrip_with_scopes() -> None:
    token = mint_dev_token(
        DEV_KEY, role=Role.VIEWER, scopes={"regions": ["eu-west"], "models": ["atlas"]}
    )
    principal = await TokenVerifier(dev_settings()).verify(token)
    assert principal.role is Role.VIEWER
    assert principal.subject == "dev-viewer"
    assert principal.scope.regions == ("eu-west",) and principal.scope.models == ("atlas",)
    assert principal.scope.orgs is None


async def test_device_token_carries_its_vehicle() -> None:
    token = mint_dev_token(DEV_KEY, role=Role.DEVICE, vehicle_id="VIN-1")
    principal = await TokenVerifier(dev_settings()).verify(token)
    assert principal.vehicle_id == "VIN-1" and principal.subject == "device:VIN-1"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (
            lambda: mint_dev_token(
                DEV_KEY, role=Role.VIEWER, now=time.time() - 86400, ttl_seconds=60
            ),
            "expired",
        ),
        (lambda: mint_dev_token(generate_dev_key(), role=Role.VIEWER), "signature"),
        (lambda: mint_dev_token(DEV_KEY, role=Role.VIEWER, audience="someone-else"), "aud"),
        (
            lambda: (
                b64({"alg": "none", "typ": "JWT"})
                + "."
                + b64(
                    {
                        "sub": "x",
                        "role": "operator",
                        "aud": "motorcade",
                        "iss": "motorcade-dev",
                        "exp": int(time.time()) + 600,
                    }
                )
                + "."
            ),
            "unsigned",
        ),
        (lambda: "not-a-token", "malformed"),
        (
            lambda: jwt.encode(
                {"alg": "HS256"},
                {"sub": "x", "role": "viewer", "aud": "motorcade", "iss": "motorcade-dev"},
                OctKey.import_key(DEV_KEY),
            ),
            "exp",
        ),
        (
            lambda: jwt.encode(
                {"alg": "HS256"},
                {
                    "sub": "x",
                    "role": "admin",
                    "aud": "motorcade",
                    "iss": "motorcade-dev",
                    "exp": int(time.time()) + 60,
                },
                OctKey.import_key(DEV_KEY),
            ),
            "role",
        ),
    ],
    ids=[
        "expired",
        "wrong-signature",
        "wrong-audience",
        "alg-none",
        "malformed",
        "no-exp",
        "unknown-role",
    ],
)
async def test_bad_dev_tokens_are_refused(make, reason: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TokenError) as info:
        await TokenVerifier(dev_settings()).verify(make())
    assert reason in str(info.value)


async def test_dev_tokens_are_refused_without_a_dev_key() -> None:
    token = mint_dev_token(DEV_KEY, role=Role.VIEWER)
    settings = Settings(env="test", _env_file=None)  # type: ignore[call-arg]
    with pytest.raises(TokenError, match="not accepted"):
        await TokenVerifier(settings).verify(token)


# OIDC: a real HTTP server publishes the issuer's metadata and JWKS ---------------------------

RSA = RSAKey.generate_key(2048, parameters={"kid": "k1"})
OTHER_RSA = RSAKey.generate_key(2048, parameters={"kid": "k1"})


@pytest.fixture(scope="module")
def issuer() -> Iterator[str]:
    jwks = KeySet([RSA]).as_dict(private=False)

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            base = f"http://127.0.0.1:{self.server.server_address[1]}"  # type: ignore[index]
            body: Any
            if self.path == "/.well-known/openid-configuration":
                body = {"issuer": base, "jwks_uri": f"{base}/jwks"}
            elif self.path == "/jwks":
                body = jwks
            else:
                self.send_response(404)
                self.end_headers()
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    with serve(Handler) as base:
        yield base


def oidc_token(issuer: str, key: Any = RSA, alg: str = "RS256", **claims: Any) -> str:
    now = int(time.time())
    payload = {
        "iss": issuer,
        "aud": "motorcade",
        "sub": "alice@example.com",
        "role": "operator",
        "iat": now,
        "exp": now + 300,
        **claims,
    }
    return jwt.encode({"alg": alg, "kid": "k1"}, payload, key)


async def test_oidc_token_verified_against_discovered_jwks(issuer: str) -> None:
    verifier = TokenVerifier(Settings(env="test", oidc_issuer=issuer, _env_file=None))  # type: ignore[call-arg]
    principal = await verifier.verify(oidc_token(issuer, regions=["eu-west"]))
    assert principal.subject == "alice@example.com" and principal.role is Role.OPERATOR
    assert principal.scope.regions == ("eu-west",)
    await verifier.aclose()


@pytest.mark.parametrize(
    "case", ["other-key", "wrong-issuer", "wrong-audience", "expired", "hs256-confusion"]
)
async def test_bad_oidc_tokens_are_refused(issuer: str, case: str) -> None:
    verifier = TokenVerifier(Settings(env="test", oidc_issuer=issuer, _env_file=None))  # type: ignore[call-arg]
    if case == "other-key":
        token = oidc_token(issuer, key=OTHER_RSA)
    elif case == "wrong-issuer":
        token = oidc_token(issuer, iss="https://evil.example")
    elif case == "wrong-audience":
        token = oidc_token(issuer, aud="another-api")
    elif case == "expired":
        token = oidc_token(issuer, exp=int(time.time()) - 3600)
    else:
        # The classic confusion: HS256 "signed" with the public key as the secret.
        # (joserfc refuses to build such a key, so the token is assembled by hand.)
        now = int(time.time())
        signing_input = (
            b64({"alg": "HS256", "kid": "k1"})
            + "."
            + b64(
                {
                    "iss": issuer,
                    "aud": "motorcade",
                    "sub": "mallory",
                    "role": "operator",
                    "exp": now + 300,
                }
            )
        )
        mac = hmac.new(RSA.as_pem(private=False), signing_input.encode(), hashlib.sha256)
        token = signing_input + "." + base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")
    with pytest.raises(TokenError):
        await verifier.verify(token)
    await verifier.aclose()
