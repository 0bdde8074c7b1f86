"""Authentication before anything reads a body: a request under /api/ without a valid bearer
token is answered 401 here, by a pure ASGI middleware, so an unauthenticated caller cannot
make the server read (or parse) what it sends. The routes still check the role (and verify
nothing again: `caller_of` caches the principal for the request).

Let through without a token: `OPTIONS` (a CORS preflight never carries one) and
`GET /api/v1/stream?ticket=...` (a browser's EventSource: the route verifies the ticket).
Outside /api/ nothing is gated here: `/healthz`, `/readyz`, `/metrics` (its own credential),
`/docs`, `/openapi.json` and `/` answer as their routes say.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from api.caller import caller_error, caller_of, send_error
from core.errors import Unauthenticated

STREAM_PATH = "/api/v1/stream"


def _ticket_stream(scope: Scope) -> bool:
    """A stream request carrying a ticket (the route verifies it, not a bearer token)."""
    if scope["path"].rstrip("/") != STREAM_PATH:
        return False
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    return "ticket" in query


def _unauthenticated(scope: Scope) -> Unauthenticated:
    """The 401 the route would have given: why `caller_of` (api/caller.py, the one reader of
    the Authorization header) found no caller."""
    return caller_error(scope) or Unauthenticated()


class AuthGateMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not scope["path"].startswith("/api/")
            or scope["method"] == "OPTIONS"
            or _ticket_stream(scope)
        ):
            await self.app(scope, receive, send)
            return
        if await caller_of(scope) is None:
            await send_error(scope, send, _unauthenticated(scope))
            return
        await self.app(scope, receive, send)
