"""`Idempotency-Key` on every POST under /api/ (SPEC.md, Conventions), as pure ASGI middleware
so one mechanism serves every route, present and future.

- No key: the request runs as usual. A key is 1 to 255 visible ASCII characters (else 422).
- The key is scoped to the caller (the verified token's subject); without a valid token the
  request runs as usual and the route answers 401.
- The request's fingerprint is a sha256 of method, path, query and (canonical JSON) body; the
  body itself is never stored.
- First request: the key is claimed `in_flight` (committed at once), the route runs, and its
  response (status, headers, body) is stored before it is sent. A 5xx, a 429 or an error
  releases the key instead, so the client may retry.
- Same key, same request: the stored response is sent again, with `Idempotent-Replayed: true`.
  Same key, other request: 422 `IDEMPOTENCY_KEY_MISMATCH`. Still in flight: 409
  `IDEMPOTENCY_KEY_IN_USE`.
- Keys live `MOTORCADE_IDEMPOTENCY_RETENTION_HOURS` (at least 24), then `purge_loop` deletes
  them.

Excluded: `POST /api/v1/telemetry`, deduplicated per event by (`vehicleId`, `eventId`) (SPEC.md)
and on the hot ingestion path, where a database round trip per request would cost throughput.
"""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.caller import caller_of, send_error
from core.db import session_scope
from core.errors import IdempotencyKeyInUse, IdempotencyKeyMismatch, InvalidInput
from core.settings import Settings
from models.storable import storable_text
from services import audit
from services import idempotency as service

log = structlog.stdlib.get_logger("motorcade.api.idempotency")

HEADER = b"idempotency-key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
VALID_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
# A response larger than this is not stored (none of the API's POST answers come close).
MAX_STORED_RESPONSE_BYTES = 1024 * 1024
# Paths whose POSTs do not use Idempotency-Key (see the module docstring and docs/api.md).
# A stream ticket is a fresh secret each time: never stored, so never replayed.
EXCLUDED_PATHS = frozenset({"/api/v1/telemetry", "/api/v1/stream/tickets"})
# Response headers never stored (recomputed, or added per request by an outer middleware).
_NOT_STORED = frozenset({"content-length", "date", "server", "set-cookie", "x-request-id"})


def _stored_status(status: int) -> bool:
    """The responses a replay returns; the others release the key (the client may retry)."""
    return status < 500 and status != 429


class IdempotencyMiddleware:
    def __init__(self, app: ASGIApp, *, excluded_paths: frozenset[str] = EXCLUDED_PATHS) -> None:
        self.app = app
        self.excluded_paths = excluded_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or not scope["path"].startswith("/api/")
            or scope["path"].rstrip("/") in self.excluded_paths
            # A path PostgreSQL cannot store is never recorded: the route refuses it (422,
            # api.deps.storable_parameters) or there is no such route (404).
            or not storable_text(scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        raw_keys = [v for k, v in scope.get("headers") or [] if k == HEADER]
        if not raw_keys:
            await self.app(scope, receive, send)
            return
        key = raw_keys[0].decode("latin-1")
        if len(raw_keys) > 1 or not VALID_KEY.match(key):
            await send_error(
                scope,
                send,
                InvalidInput(
                    f"Idempotency-Key must be one header of 1 to {MAX_KEY_LENGTH} visible "
                    "ASCII characters",
                    details=[
                        {
                            "field": "Idempotency-Key",
                            "message": "invalid idempotency key",
                            "code": "idempotency_key_invalid",
                        }
                    ],
                ),
            )
            return
        principal = await caller_of(scope)
        if principal is None:  # the route answers 401 (or the probe answers as usual)
            await self.app(scope, receive, send)
            return
        app_state = scope["app"].state
        settings: Settings = app_state.settings
        # A keyed request's body is read whole (to fingerprint it); api/bodylimit.py, outside
        # this middleware, cuts it at the path's limit (413) as it is read.
        body = await _read_body(receive)

        sessions: async_sessionmaker[AsyncSession] = app_state.sessions
        caller = principal.subject
        async with session_scope(sessions) as session:
            claim = await service.claim(
                session,
                caller=caller,
                key=key,
                method="POST",
                path=scope["path"],
                request_hash=service.fingerprint(
                    method="POST",
                    path=scope["path"],
                    query=scope.get("query_string", b"").decode("latin-1"),
                    body=body,
                ),
                retention=timedelta(hours=settings.idempotency_retention_hours),
                stale_after=timedelta(seconds=settings.idempotency_in_flight_timeout_seconds),
            )
        if claim.outcome == "mismatch":
            await send_error(scope, send, IdempotencyKeyMismatch())
            return
        if claim.outcome == "in_flight":
            await send_error(scope, send, IdempotencyKeyInUse())
            return
        if claim.outcome == "replay":
            assert claim.response is not None
            await _send_stored(send, claim.response)
            return
        await self._run_owned(scope, receive, send, body, sessions, caller, key)

    async def _run_owned(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: bytes,
        sessions: async_sessionmaker[AsyncSession],
        caller: str,
        key: str,
    ) -> None:
        """Run the route holding the key; store its response before sending it (so a retry
        right after the answer replays it), or release the key."""
        body_sent = False

        async def replay_receive() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        start: Message | None = None
        chunks: list[bytes] = []
        size = 0
        passthrough = False  # the response is too large to store: stream it, release the key

        async def buffered_send(message: Message) -> None:
            nonlocal start, size, passthrough
            if passthrough:
                await send(message)
                return
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > MAX_STORED_RESPONSE_BYTES and message.get("more_body", False):
                    passthrough = True
                    assert start is not None
                    await send(start)
                    await send(
                        {"type": "http.response.body", "body": b"".join(chunks), "more_body": True}
                    )
                return
            await send(message)

        try:
            await self.app(scope, replay_receive, buffered_send)
        except BaseException:
            await asyncio.shield(_release(sessions, caller, key))
            raise
        if passthrough or start is None:
            await asyncio.shield(_release(sessions, caller, key))
            return
        status = int(start["status"])
        content = b"".join(chunks)
        if _stored_status(status):
            stored = service.StoredResponse(
                status=status,
                headers=[
                    (k.decode("latin-1"), v.decode("latin-1"))
                    for k, v in start.get("headers", [])
                    if k.decode("latin-1").lower() not in _NOT_STORED
                ],
                body=content.decode("utf-8", errors="replace"),
            )
            try:
                async with session_scope(sessions) as session:
                    await service.complete(session, caller=caller, key=key, response=stored)
            except Exception:
                # The write happened: answer it. The key stays in flight until it goes stale.
                log.warning("idempotency: storing the response failed", exc_info=True)
        else:
            await asyncio.shield(_release(sessions, caller, key))
        await send(start)
        await send({"type": "http.response.body", "body": content})


async def _read_body(receive: Receive) -> bytes:
    """The whole request body."""
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(parts)


async def _release(sessions: async_sessionmaker[AsyncSession], caller: str, key: str) -> None:
    try:
        async with session_scope(sessions) as session:
            await service.release(session, caller=caller, key=key)
    except Exception:
        log.warning("idempotency: releasing the key failed", exc_info=True)


async def _send_stored(send: Send, response: service.StoredResponse) -> None:
    content = response.body.encode()
    headers: list[tuple[bytes, bytes]] = [
        (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.headers
    ]
    headers.append((b"content-length", str(len(content)).encode()))
    headers.append((REPLAYED_HEADER.lower().encode(), b"true"))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


async def purge_loop(
    sessions: async_sessionmaker[AsyncSession],
    interval_seconds: float,
    *,
    audit_retention_days: int = 0,
) -> None:
    """Housekeeping of each API process, now and then every `interval_seconds` until
    cancelled: delete expired idempotency keys, and audit entries past their retention (when
    one is set). Both deletes are idempotent, so replicas may overlap; a failure is logged and
    retried at the next round."""
    while True:
        try:
            async with session_scope(sessions) as session:
                deleted = await service.purge_expired(session)
            if deleted:
                log.info("idempotency keys purged", deleted=deleted)
            expired = await audit.purge_expired(sessions, retention_days=audit_retention_days)
            if expired:
                log.info("audit entries past their retention purged", deleted=expired)
        except Exception:
            log.warning("housekeeping: purge failed", exc_info=True)
        await asyncio.sleep(interval_seconds)


def document_idempotency(schema: dict[str, Any]) -> None:
    """Add the Idempotency-Key header, the replay header and the two errors to every POST of
    the OpenAPI document (except the excluded paths)."""
    for path, operations in schema.get("paths", {}).items():
        operation = operations.get("post")
        if operation is None or not path.startswith("/api/") or path in EXCLUDED_PATHS:
            continue
        operation.setdefault("parameters", []).append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "Makes a retry safe: the same key with the same request returns "
                "the first response again (header `Idempotent-Replayed: true`); with another "
                "request, 422 `IDEMPOTENCY_KEY_MISMATCH`; while the first is still running, "
                "409 `IDEMPOTENCY_KEY_IN_USE`. Scoped to the caller, kept at least 24 h.",
                # The middleware's rule (VALID_KEY), so a client knows it before a 422.
                "schema": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_KEY_LENGTH,
                    "pattern": VALID_KEY.pattern,
                },
            }
        )
        responses = operation.setdefault("responses", {})
        for status, code in (
            ("409", "IDEMPOTENCY_KEY_IN_USE"),
            ("422", "IDEMPOTENCY_KEY_MISMATCH"),
        ):
            entry = responses.setdefault(
                status,
                {
                    "description": "",
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/ErrorEnvelope"}
                        }
                    },
                },
            )
            entry["description"] = ", ".join(filter(None, [entry.get("description"), code]))
        for status, response in responses.items():
            if status.startswith("2"):
                response.setdefault("headers", {}).update(
                    {
                        REPLAYED_HEADER: {
                            "description": "`true` when this is the stored response to an "
                            "earlier request with the same Idempotency-Key",
                            "schema": {"type": "string", "enum": ["true"]},
                        }
                    }
                )
