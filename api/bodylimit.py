"""A bound on every request body, enforced before anything parses it and before the caller
is authenticated (pure ASGI middleware, outside the auth gate and the routes).

Each path has its limit (`body_limit`): `POST /api/v1/telemetry` its own
(`MOTORCADE_TELEMETRY_MAX_BODY_BYTES`, a full batch), every other route the small default
(`MOTORCADE_MAX_BODY_BYTES`). A `Content-Length` over the limit is answered 413
`PAYLOAD_TOO_LARGE` at once, without reading a byte; a body without one (chunked) or one that
says less than it sends is counted as it is read and cut at the limit: the reader (FastAPI's
body parsing, the idempotency middleware, the telemetry route) gets `BodyTooLarge` instead of
the next chunk, and the client a 413 in the error envelope. Whoever else reads a body
(`api/idempotency.py`, `api/routes/telemetry.py`) takes its limit from `body_limit` too.
"""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.caller import send_error
from core.errors import PayloadTooLarge
from core.settings import Settings

TELEMETRY_PATH = "/api/v1/telemetry"


def body_limit(settings: Settings, path: str) -> int:
    """The largest body (bytes) a request to `path` may send."""
    if path.rstrip("/") == TELEMETRY_PATH:
        return settings.telemetry_max_body_bytes
    return settings.max_body_bytes


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body is larger than {limit} bytes")


class BodyTooLarge(HTTPException):
    """Raised by the bounded `receive` when a body passes its limit. An HTTPException, so
    FastAPI's body parsing lets it through to the error handlers (which answer 413) instead
    of turning it into a 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=too_large(limit).message)
        self.limit = limit


def _declared_length(scope: Scope) -> int | None:
    values = [v for k, v in scope.get("headers") or [] if k == b"content-length"]
    if len(values) != 1 or not values[0].isdigit():
        return None  # absent, repeated or malformed: the server refuses it, or we count
    return int(values[0])


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = body_limit(self.settings, scope["path"])
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await send_error(scope, send, too_large(limit))
            return
        received = 0

        async def bounded_receive() -> Message:
            nonlocal received
            if received > limit:  # a reader that goes on after BodyTooLarge
                raise BodyTooLarge(limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, bounded_receive, tracking_send)
        except BodyTooLarge as exc:  # raised where no error handler answers (a middleware)
            if started:
                raise
            await send_error(scope, tracking_send, too_large(exc.limit))
        except BaseExceptionGroup as group:  # a reader in a task group (Starlette)
            matched, rest = group.split(BodyTooLarge)
            if matched is None or rest is not None or started:
                raise
            await send_error(scope, tracking_send, too_large(self._limit_of(matched)))

    @staticmethod
    def _limit_of(group: Any) -> int:
        while isinstance(group, BaseExceptionGroup):
            group = group.exceptions[0]
        assert isinstance(group, BodyTooLarge)
        return group.limit


def document_body_limits(schema: dict[str, Any]) -> None:
    """Add the 413 answer to every operation of the OpenAPI document that takes a body."""
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            if not isinstance(operation, dict) or "requestBody" not in operation:
                continue
            limit = (
                "MOTORCADE_TELEMETRY_MAX_BODY_BYTES"
                if path == TELEMETRY_PATH
                else "MOTORCADE_MAX_BODY_BYTES"
            )
            entry = operation.setdefault("responses", {}).setdefault(
                "413",
                {
                    "description": "",
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/ErrorEnvelope"}
                        }
                    },
                },
            )
            if not entry.get("description"):
                entry["description"] = (
                    f"PAYLOAD_TOO_LARGE: the body is larger than `{limit}` (refused before "
                    "it is read)"
                )
