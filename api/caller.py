"""The caller of a request, for the ASGI middlewares that run before routing (idempotency
keys, rate limits): the verified token's subject, verified once per request."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.types import Scope, Send

from api.envelope import error_body
from core.auth import Principal, TokenError, TokenVerifier
from core.errors import MotorcadeError

_STATE_KEY = "caller"
_ERROR_KEY = "caller_error"


async def caller_of(scope: Scope) -> Principal | None:
    """The principal of a valid bearer token, or None (no token, or one that does not verify:
    the route answers 401 itself). Cached in the request's state."""
    state: dict[str, Any] = scope.setdefault("state", {})
    if _STATE_KEY in state:
        cached: Principal | None = state[_STATE_KEY]
        return cached
    principal: Principal | None = None
    header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        verifier: TokenVerifier | None = getattr(scope["app"].state, "verifier", None)
        if verifier is not None:
            try:
                principal = await verifier.verify(token.strip())
            except TokenError as exc:  # the route (or api/authgate.py) answers 401
                principal = None
                state[_ERROR_KEY] = exc
    state[_STATE_KEY] = principal
    return principal


def verified_caller(scope: Scope) -> Principal | None:
    """The principal `caller_of` already verified for this request, if it did and the token
    was valid (the routes' dependency takes it instead of verifying the token again)."""
    cached: Principal | None = scope.get("state", {}).get(_STATE_KEY)
    return cached


def caller_error(scope: Scope) -> TokenError | None:
    """Why `caller_of` found no valid token in a bearer header (None: it did not verify one)."""
    error: TokenError | None = scope.get("state", {}).get(_ERROR_KEY)
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
