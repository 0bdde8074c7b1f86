"""`Idempotency-Key` on every POST under /api/ (SPEC.md, Conventions), as pure ASGI middleware
so one mechanism serves every route, present and future.

- No key: the request runs as usual. A key is 1 to 255 visible ASCII characters (else 422).
- The key is scoped to the caller (the verified token's subject); without a valid token the
  request runs as usual and the route answers 401.
- The request's fingerprint is a sha256 of method, path, query and (canonical JSON) body; the
  body itself is never stored.
- First request: the key is claimed `in_flight` under a fresh fencing token (committed at
  once), the route runs, and its response (status, headers, body) is stored before it is sent
  if the endpoint succeeded (a status below 400). Any error answer (422, 401, 403, 404, 409,
  413, 429, 5xx: a validation failure, a refusal, a conflict with a concurrent request, a
  rate limit or a fault; the route's transaction rolled back, or the route says a retry is
  safe) releases the key instead, so the client may retry (`stored_status`, docs/api.md).
- Fencing: a key in flight for longer than `MOTORCADE_IDEMPOTENCY_IN_FLIGHT_TIMEOUT_SECONDS`
  is taken over by a retry of the same request, under a new token. Only the current token
  completes or releases the key; the slow original's transaction cannot even commit (the key's
  execution mark, written in that transaction, matches no row).
- Executed: every transaction the route commits marks the key executed in the same
  transaction (core/db.py, `idempotency_guard`), with what the route says it created
  (`note_created`). A key whose work committed is never taken over; if its response was never
  stored (the process died in between), a retry answers the created resource re-read (its
  route's status, `Idempotent-Replayed: true`), or 409 `IDEMPOTENCY_KEY_IN_USE` saying so.
- Same key, same request: the stored response is sent again, with `Idempotent-Replayed: true`.
  Same key, other request: 422 `IDEMPOTENCY_KEY_MISMATCH`. Still in flight: 409
  `IDEMPOTENCY_KEY_IN_USE`.
- The database unavailable (lost, too slow, the pool exhausted) while claiming: 503
  `UNAVAILABLE` with `Retry-After`, like any route.
- Keys live `MOTORCADE_IDEMPOTENCY_RETENTION_HOURS` (at least 24), then `purge_loop` deletes
  them.

Excluded: `POST /api/v1/telemetry`, deduplicated per event by (`vehicleId`, `eventId`) (SPEC.md)
and on the hot ingestion path, where a database round trip per request would cost throughput.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import timedelta
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.caller import caller_of, send_error
from api.errors import unavailable
from core.db import IdempotencyGuard, database_unavailable, idempotency_guard, session_scope
from core.errors import IdempotencyKeyInUse, IdempotencyKeyMismatch, InvalidInput
from core.settings import Settings
from models.storable import storable_text
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


def stored_status(status: int) -> bool:
    """The responses a replay returns: the endpoint executed and succeeded. Every error
    answer releases the key instead (Stripe saves neither a validation failure nor a
    conflict with a concurrent request): a 422 of any code, 401, 403, 404, 409 (`CONFLICT`,
    `INVALID_STATE_TRANSITION`, `IDEMPOTENCY_*`), 413, 429 and 5xx. The route's transaction
    rolled back (nothing was written), or the route answered that a retry is safe."""
    return status < 400


EXECUTED_WITHOUT_RESPONSE = (
    "a request with this Idempotency-Key was executed, but its server stopped before it "
    "could answer; it will not run again: look its result up, or send a new key"
)


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
        try:
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
        except Exception as exc:
            why = database_unavailable(exc)
            if why is None:
                raise
            log.warning("idempotency: the database is unavailable", why=why)
            await send_error(scope, send, unavailable(why))
            return
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
        if claim.outcome == "executed":
            await self._answer_executed(scope, send, claim)
            return
        assert claim.token is not None
        await self._run_owned(scope, receive, send, body, sessions, caller, key, claim.token)

    async def _answer_executed(self, scope: Scope, send: Send, claim: service.Claim) -> None:
        """A retry of a request whose work committed but whose response was never stored:
        the resource it created, re-read through its own GET route with the caller's
        credentials, under the status the route named; else 409 saying what happened."""
        if claim.resource is None or not claim.resource.startswith("/api/"):
            await send_error(scope, send, IdempotencyKeyInUse(EXECUTED_WITHOUT_RESPONSE))
            return
        path = claim.resource
        dropped = {HEADER, b"content-length", b"content-type", b"transfer-encoding"}
        read_scope = {
            **scope,
            "method": "GET",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": [(k, v) for k, v in scope.get("headers") or [] if k not in dropped],
        }
        start: Message | None = None
        chunks: list[bytes] = []

        async def no_body() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(read_scope, no_body, capture)
        if start is None or int(start["status"]) != 200:
            await send_error(scope, send, IdempotencyKeyInUse(EXECUTED_WITHOUT_RESPONSE))
            return
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in start.get("headers", [])
            if k.decode("latin-1").lower() not in _NOT_STORED and k.lower() != b"etag"
        ]
        headers.append(("location", path))
        log.info("idempotency: answered a lost response from its resource", resource=path)
        await _send_stored(
            send,
            service.StoredResponse(
                status=claim.status or 200, headers=headers, body=b"".join(chunks).decode()
            ),
        )

    async def _run_owned(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: bytes,
        sessions: async_sessionmaker[AsyncSession],
        caller: str,
        key: str,
        token: uuid.UUID,
    ) -> None:
        """Run the route holding the key (every commit marks it executed); store its
        response before sending it (so a retry right after the answer replays it), or
        release the key. Both only under `token`: a takeover made them no-ops."""
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

        guard = IdempotencyGuard(caller=caller, key=key, token=token)
        try:
            with idempotency_guard(guard):
                await self.app(scope, replay_receive, buffered_send)
        except BaseException:
            if not guard.executed:  # committed work keeps its mark: never run again
                await asyncio.shield(_release(sessions, caller, key, token))
            raise
        if passthrough or start is None:
            if not guard.executed:
                await asyncio.shield(_release(sessions, caller, key, token))
            return
        status = int(start["status"])
        content = b"".join(chunks)
        if stored_status(status):
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
                    stored_it = await service.complete(
                        session, caller=caller, key=key, token=token, response=stored
                    )
                if not stored_it:
                    log.warning("idempotency: the key was taken over; the response not stored")
            except Exception:
                # The write happened: answer it. The key stays marked executed (a retry
                # answers from what it created, or 409).
                log.warning("idempotency: storing the response failed", exc_info=True)
        elif not guard.executed:
            await asyncio.shield(_release(sessions, caller, key, token))
        # else: an error after the work committed (the answer could not be built): the key
        # keeps its executed mark, so a retry answers from what was created, never runs again.
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


async def _release(
    sessions: async_sessionmaker[AsyncSession], caller: str, key: str, token: uuid.UUID
) -> None:
    try:
        async with session_scope(sessions) as session:
            released = await service.release(session, caller=caller, key=key, token=token)
        if not released:
            log.info("idempotency: nothing to release (the key was taken over)")
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


async def purge_loop(sessions: async_sessionmaker[AsyncSession], interval_seconds: float) -> None:
    """Housekeeping of each API process, now and then every `interval_seconds` until
    cancelled: delete expired idempotency keys. Idempotent, so replicas may overlap; a failure
    is logged and retried at the next round. (The audit log, the change feed and the timeline
    are purged by the worker's `motorcade-retention` Schedule, activities/retention.py.)"""
    while True:
        try:
            async with session_scope(sessions) as session:
                deleted = await service.purge_expired(session)
            if deleted:
                log.info("idempotency keys purged", deleted=deleted)
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
