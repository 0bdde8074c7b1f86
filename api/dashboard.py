"""The reference dashboard (SPEC.md, The reference dashboard): static files at `/`, built on
the public API only, and its sign-in.

- `GET /` is the page; `/ui/...` its ES modules and stylesheet (no build step).
- `GET /ui/config.json` tells the page how to sign in: through the issuer when
  `MOTORCADE_OIDC_CLIENT_ID` is set, else with a token in the URL fragment (`#token=...`,
  which `make dev` prints: a fragment never reaches a server or its logs).
- `GET /auth/login`, `GET /auth/callback`, `POST /auth/session`: the OIDC authorization
  code flow with PKCE (authlib's PKCE helpers; the exchange is one form POST). The
  verifier and state wait in a short-lived, HMAC-signed, HttpOnly cookie scoped to `/auth`,
  so any API replica can finish a sign-in another started. The access token never travels
  in a URL: the callback leaves it for a minute in a SameSite=Strict, HttpOnly cookie on
  `/auth`, and the page collects it once with `POST /auth/session`.

Nothing here is under /api/, so the auth gate lets it through: the page and its sign-in are
public, everything they show comes from the API with the caller's token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import structlog
from authlib.common.security import generate_token
from authlib.common.urls import add_params_to_uri
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.types import Scope

from api.staticfiles import WholeFiles
from core.errors import DependencyUnavailable, InvalidInput, Unauthenticated
from core.settings import Settings

log = structlog.stdlib.get_logger("motorcade.dashboard")

DASHBOARD = Path(__file__).parent / "static" / "dashboard"
COOKIE = "motorcade_signin"
TOKEN_COOKIE = "motorcade_token"  # the access token, from the callback to the page, once
HANDOVER_SECONDS = 60
SIGN_IN_SECONDS = 600  # a sign-in started longer ago than this is refused at the callback
ISSUER_TIMEOUT_SECONDS = 10.0


# The page may talk to its own origin only; no inline script, no framing (clickjacking).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_dashboard(app: FastAPI, settings: Settings, secret: bytes) -> None:
    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return FileResponse(DASHBOARD / "index.html", headers=SECURITY_HEADERS)

    @app.get("/ui/config.json", include_in_schema=False)
    async def config() -> Response:
        return JSONResponse(
            {
                "signIn": "oidc" if _oidc(settings) else "token",
                "loginUrl": "/auth/login" if _oidc(settings) else None,
                "apiBase": "/api/v1",
            },
            headers={"Cache-Control": "no-cache"},
        )

    @app.get("/auth/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        if not _oidc(settings):
            raise InvalidInput("sign-in through an issuer is not configured on this server")
        metadata = await _metadata(request)
        verifier, state = generate_token(64), generate_token(32)
        url = add_params_to_uri(
            metadata["authorization_endpoint"],
            [
                ("response_type", "code"),
                ("client_id", settings.oidc_client_id or ""),
                ("redirect_uri", _redirect_uri(settings, request)),
                ("scope", settings.oidc_scopes),
                ("state", state),
                ("code_challenge", create_s256_code_challenge(verifier)),
                ("code_challenge_method", "S256"),
            ],
        )
        response = RedirectResponse(url, status_code=302)
        response.set_cookie(
            COOKIE,
            _seal(secret, {"state": state, "verifier": verifier, "at": int(time.time())}),
            max_age=SIGN_IN_SECONDS,
            path="/auth",
            httponly=True,
            secure=_base_url(settings, request).startswith("https://"),
            samesite="lax",
        )
        return response

    @app.get("/auth/callback", include_in_schema=False)
    async def callback(request: Request) -> Response:
        if not _oidc(settings):
            raise InvalidInput("sign-in through an issuer is not configured on this server")
        query = request.query_params
        if "error" in query:
            raise Unauthenticated(f"the issuer refused the sign-in: {query['error'][:200]}")
        started = _unseal(secret, request.cookies.get(COOKIE))
        if started is None or time.time() - started["at"] > SIGN_IN_SECONDS:
            raise Unauthenticated("no sign-in in progress (or it took too long): start again")
        if not hmac.compare_digest(str(query.get("state", "")), str(started["state"])):
            raise Unauthenticated("the sign-in's state does not match: start again")
        code = query.get("code")
        if not code:
            raise InvalidInput("the issuer sent no authorization code")
        metadata = await _metadata(request)
        client_secret = settings.oidc_client_secret
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": _redirect_uri(settings, request),
            "client_id": settings.oidc_client_id or "",
            "code_verifier": started["verifier"],
        }
        try:
            async with httpx.AsyncClient(timeout=ISSUER_TIMEOUT_SECONDS) as http:
                answer = await http.post(
                    metadata["token_endpoint"],
                    data=form,
                    auth=(
                        (form["client_id"], client_secret.get_secret_value())
                        if client_secret
                        else httpx.USE_CLIENT_DEFAULT
                    ),
                    headers={"Accept": "application/json"},
                )
            answer.raise_for_status()
            token = answer.json()
            if not isinstance(token, dict):
                raise ValueError("the token answer is not an object")
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("oidc token exchange failed", error=type(exc).__name__)
            raise Unauthenticated("the issuer did not exchange the code for a token") from exc
        access = token.get("access_token")
        if not isinstance(access, str) or not access:
            raise Unauthenticated("the issuer returned no access token")
        # The token never travels in a URL: it waits a minute in a cookie that only this
        # origin's own `POST /auth/session` receives (SameSite=Strict, HttpOnly, /auth).
        response = RedirectResponse("/", status_code=302)
        response.delete_cookie(COOKIE, path="/auth")
        response.set_cookie(
            TOKEN_COOKIE,
            access,
            max_age=HANDOVER_SECONDS,
            path="/auth",
            httponly=True,
            secure=_base_url(settings, request).startswith("https://"),
            samesite="strict",
        )
        response.headers["Cache-Control"] = "no-store"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.post("/auth/session", include_in_schema=False)
    async def session(request: Request) -> Response:
        """The page takes the token the callback left, once."""
        token = request.cookies.get(TOKEN_COOKIE)
        if not token:
            raise Unauthenticated("no sign-in to collect: sign in again")
        response = JSONResponse({"token": token}, headers={"Cache-Control": "no-store"})
        response.delete_cookie(TOKEN_COOKIE, path="/auth")
        return response

    app.mount("/ui", DashboardFiles(directory=DASHBOARD), name="dashboard")


class DashboardFiles(WholeFiles):
    """The page's modules and stylesheet, with the page's headers: revalidated on each load
    (an upgraded API never serves a mix of old and new modules) and never framed."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def _oidc(settings: Settings) -> bool:
    return bool(settings.oidc_issuer and settings.oidc_client_id)


def _base_url(settings: Settings, request: Request) -> str:
    return (settings.public_url or str(request.base_url)).rstrip("/")


def _redirect_uri(settings: Settings, request: Request) -> str:
    return _base_url(settings, request) + "/auth/callback"


async def _metadata(request: Request) -> dict[str, Any]:
    """The issuer's endpoints, from the discovery document the token verifier reads and
    caches for its JWKS (one fetch and one cache for both)."""
    try:
        metadata = await request.app.state.verifier.issuer_metadata()
        if not all(
            isinstance(metadata.get(k), str) for k in ("authorization_endpoint", "token_endpoint")
        ):
            raise ValueError("no authorization_endpoint or token_endpoint")
    except (httpx.HTTPError, ValueError) as exc:
        log.warning("oidc discovery failed", error=type(exc).__name__)
        raise DependencyUnavailable("the identity provider did not answer") from exc
    return dict(metadata)


def _seal(secret: bytes, data: dict[str, Any]) -> str:
    body = base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode()
    mac = hmac.new(secret, b"signin." + body.encode(), hashlib.sha256).hexdigest()
    return f"{body}.{mac}"


def _unseal(secret: bytes, value: str | None) -> dict[str, Any] | None:
    if not value or value.count(".") != 1:
        return None
    body, mac = value.split(".")
    expected = hmac.new(secret, b"signin." + body.encode(), hashlib.sha256).hexdigest()
    if not secrets.compare_digest(mac, expected):
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(body.encode()))
    except ValueError:
        return None
    if not isinstance(data, dict) or not {"state", "verifier", "at"} <= data.keys():
        return None
    return data
