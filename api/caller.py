"""The caller of a request, for the ASGI middlewares that run before routing (idempotency
keys, rate limits): the verified token's subject, verified once per request."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.types import Scope, Send

from api.envelope import error_body
from core.auth import Principal, TokenVerifier
from core.errors import MotorcadeError, Unauthenticated

_STATE_KEY = "caller"
_ERROR_KEY = "caller_error"


def bearer_token(scope: Scope) -> str:
    """The bearer token of the request: the one reader of the Authorization header, for the
    middlewares and the routes alike. Unauthenticated (401) when there is none, when there are
    several (a proxy and a client could otherwise each see a different one), or when it is
    not `Bearer <token>`."""
    values = [v for k, v in scope.get("headers") or [] if k.lower() == b"authorization"]
    if not values:
        raise Unauthenticated("a bearer token is required")
    if len(values) > 1:
        raise Unauthenticated("send one Authorization header, not several")
    scheme, _, token = values[0].decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("use the Authorization: Bearer <token> scheme")
    return token.strip()


async def caller_of(scope: Scope) -> Principal | None:
    """The principal of a valid bearer token, or None (no token, several, or one that does
    not verify: `caller_error` says which). Cached in the request's state."""
    state: dict[str, Any] = scope.setdefault("state", {})
    if _STATE_KEY in state:
        cached: Principal | None = state[_STATE_KEY]
        return cached
    principal: Principal | None = None
    try:
        token = bearer_token(scope)
        verifier: TokenVerifier | None = getattr(scope["app"].state, "verifier", None)
        if verifier is not None:
            principal = await verifier.verify(token)
    except Unauthenticated as exc:  # TokenError included: api/authgate.py answers the 401
        state[_ERROR_KEY] = exc
    state[_STATE_KEY] = principal
    return principal


def verified_caller(scope: Scope) -> Principal | None:
    """The principal `caller_of` already verified for this request, if it did and the token
    was valid (the routes' dependency takes it instead of verifying the token again)."""
    cached: Principal | None = scope.get("state", {}).get(_STATE_KEY)
    return cached


def caller_error(scope: Scope) -> Unauthenticated | None:
    """Why `caller_of` found no valid caller (no Authorization header, several, another
    scheme, or a token that does not verify); None when it did not look or found one."""
    error: Unauthenticated | None = scope.get("state", {}).get(_ERROR_KEY)
    return error


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


async def send_error(scope: Scope, send: Send, exc: MotorcadeError) -> None:
    """The SPEC error envelope of `exc`, sent by a middleware (no route answered)."""
    body = json.dumps(
        error_body(Request(scope), exc.code, exc.public_message, exc.details), separators=(",", ":")
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ] + [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
