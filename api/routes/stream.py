"""Live updates (SPEC.md, Server-Sent Events): the stream and its tickets (docs/api.md)."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import anyio
import structlog
from fastapi import APIRouter, Header, Query, Request
from prometheus_client import Counter
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.types import Message, Receive, Scope, Send

from api.deps import READ_ROLES, ViewerDep, get_principal, multi
from api.envelope import ok
from api.errors import ErrorResponses, error_responses
from core.auth import Principal
from core.errors import DependencyUnavailable, Forbidden, InvalidInput, RateLimited, Unauthenticated
from models.api import Envelope, StreamTicketOut
from services import stream as service

router = APIRouter(tags=["stream"])
log = structlog.stdlib.get_logger("motorcade.stream")
WRITE_BATCH = 100  # events joined into one write at most
_PING = b": ping"  # how every keep-alive comment starts (`_ping_event`)
STALLED = Counter(
    "motorcade_sse_stalled_total",
    "Streams closed because their client read nothing for MOTORCADE_STREAM_STALL_SECONDS.",
)

TOPICS_DESCRIPTION = (
    "Comma-separated or repeated: `vehicles` (vehicle.updated, fleet.summary), `rollouts` "
    "(rollout.updated), `audit` (audit.created). Default: all three."
)


@router.post(
    "/stream/tickets",
    status_code=201,
    response_model=Envelope[StreamTicketOut],
    summary="A short-lived ticket for a browser EventSource",
    description="A ticket valid for `MOTORCADE_STREAM_TICKET_SECONDS` (default 60 s; never "
    "past the caller's token's expiry), bound to the caller (subject, role, scopes): "
    "`GET /api/v1/stream?ticket=...` accepts it in place of the Authorization header, "
    "as often as needed until it expires; a stream opened with it ends when it expires. "
    "Not subject to Idempotency-Key (each call returns a new ticket; nothing is stored).",
    responses=ErrorResponses.read,
)
async def create_ticket(request: Request, principal: ViewerDep) -> dict[str, Any]:
    ticket, expires = service.issue_ticket(
        principal,
        request.app.state.stream_secret,
        seconds=request.app.state.settings.stream_ticket_seconds,
    )
    return ok(request, {"ticket": ticket, "expiresAt": expires})


async def _stream_principal(request: Request, ticket: str | None) -> Principal:
    if ticket is None:
        principal = await get_principal(request)
    else:
        principal = service.verify_ticket(
            ticket,
            request.app.state.stream_secret,
            max_seconds=request.app.state.settings.stream_ticket_seconds,
        )
        request.state.principal = principal
    if principal.role not in READ_ROLES:
        raise Forbidden(f"the {principal.role.value} role may not do this")
    return principal


# ASCII digits only: str.isdigit also takes "²" (int() does not) and other scripts' digits.
_EVENT_ID = re.compile(r"[0-9]{1,18}")
LAST_EVENT_ID_PATTERN = r"^ *([0-9]{1,18})? *$"  # the document's form of `_last_event_id`
_TOPIC = f"({'|'.join(service.TOPICS)})"
TOPICS_PATTERN = f"^ *{_TOPIC}? *(, *{_TOPIC}? *)*$"  # comma-separated, blanks skipped


def _last_event_id(query: str | None, header: str | None) -> int | None:
    """The event to resume after: `lastEventId=` or `Last-Event-ID`; with both, the later
    (a browser's EventSource reconnecting to a URL that carries `lastEventId=` sends the id of
    the last event it received in the header)."""
    found: list[int] = []
    for field, raw in (("lastEventId", query), ("Last-Event-ID", header)):
        if raw is None or raw.strip() == "":
            continue
        if not _EVENT_ID.fullmatch(raw.strip()):
            raise InvalidInput(
                "the last event id must be an event id this stream sent",
                details=[{"field": field, "message": "an event id: 1 to 18 digits 0-9"}],
            )
        found.append(int(raw.strip()))
    return max(found) if found else None


class StreamResponse(EventSourceResponse):
    """sse-starlette's response, sending each event chunk straight to the server: a per-send
    cancel scope (sse-starlette's `send_timeout`) is work on every event to every subscriber
    (40,000 sends a second in bench/sse.py). A client that stops reading is caught by the
    keep-alive task instead: each event write notes when it started, and the keep-alive,
    before its own write (bounded by a deadline), ends the stream when a write has been
    blocked for `stalled_after` seconds. A slow but reading subscriber is dropped by the hub's
    bounded queue; this is for one that reads nothing at all, whose socket would otherwise be
    held until TCP gives up."""

    def __init__(
        self,
        *args: Any,
        stalled_after: float,
        on_close: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.stalled_after = stalled_after
        self.on_close = on_close  # runs once the response has ended, however it ended
        self._writing_since: float | None = None

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if not message.get("body", b"").startswith(_PING):
            self._writing_since = time.monotonic()
            try:
                await send(message)
            finally:
                self._writing_since = None
            return
        since = self._writing_since
        if since is not None and time.monotonic() - since >= self.stalled_after:
            raise SendTimeoutError
        with anyio.move_on_after(self.stalled_after) as deadline:
            await send(message)
        if deadline.cancel_called:
            raise SendTimeoutError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            # The task group has cancelled the blocked write and closed the generator (its
            # subscription is gone); returning lets the server close the connection.
            STALLED.inc()
            log.warning("stream.stalled", seconds=self.stalled_after)
        finally:
            if self.on_close is not None:
                self.on_close()


def _ping_event() -> ServerSentEvent:
    """The keep-alive comment (`: ping - <time>`): ours, so `StreamResponse` can tell it
    from an event write by its first bytes."""
    return ServerSentEvent(comment=f"ping - {datetime.now(UTC).isoformat()}")


def _resync(reason: str) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps({"reason": reason}), event=service.RESYNC)


@router.get(
    "/stream",
    summary="Live updates (Server-Sent Events)",
    description="`text/event-stream` of `vehicle.updated`, `rollout.updated`, `audit.created` "
    "and `fleet.summary` events, each with its change-feed `id` and a JSON delta, inside the "
    "caller's scope. Resume with `Last-Event-ID` (or `lastEventId=`): every missed event, "
    "then live ones; from before the oldest event still kept (retention), one `resync` "
    "event (`EVENTS_EXPIRED`: re-read the state), then live ones. A `resync` event (no id) "
    "with `SLOW_SUBSCRIBER` ends the stream: re-read the state, then open a new stream without "
    "a last event id. A caller holds at most `MOTORCADE_STREAM_MAX_PER_CALLER` streams per "
    "server (one more: 429 RATE_LIMITED). The stream opens with the comment `: subscribed`, "
    "then (without a last event id, or after a resume's backfill) a message with an `id:` "
    "line alone: the stream's position, which sets a browser's last event id without "
    "dispatching an event. Keep-alive comments every 15 s. Authorization "
    "header, or `ticket=` from POST /api/v1/stream/tickets; the stream "
    "ends when that token or ticket expires (resume with a fresh one and `lastEventId=`).",
    responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
        **ErrorResponses.read,
        **error_responses(RateLimited),
    },
    response_model=None,
)
async def stream(
    request: Request,
    topics: Annotated[list[str] | None, Query(description=TOPICS_DESCRIPTION)] = None,
    ticket: Annotated[
        str | None,
        Query(max_length=2048, description="A ticket from POST /api/v1/stream/tickets."),
    ] = None,
    last_event_id_query: Annotated[
        str | None,
        Query(alias="lastEventId", max_length=32, description="As the Last-Event-ID header."),
    ] = None,
    last_event_id_header: Annotated[
        str | None, Header(alias="Last-Event-ID", max_length=32)
    ] = None,
) -> StreamResponse:
    principal = await _stream_principal(request, ticket)
    expires_at = principal.expires_at
    seconds_left = math.inf if expires_at is None else expires_at - time.time()
    if seconds_left <= 0:  # a token inside its clock-skew leeway: a stream would end at once
        raise Unauthenticated("the token has expired: open the stream with a fresh one")
    chosen = multi(topics) or list(service.TOPICS)
    unknown = [t for t in chosen if t not in service.TOPICS]
    if unknown:
        raise InvalidInput(
            f"unknown topics: {', '.join(unknown)}",
            details=[{"field": "topics", "message": f"one of {', '.join(service.TOPICS)}"}],
        )
    last = _last_event_id(last_event_id_query, last_event_id_header)
    hub: service.StreamHub = request.app.state.stream
    if not hub.ready:
        raise DependencyUnavailable("the change feed is not reachable yet")
    caller = principal.subject
    if not hub.claim(caller):
        raise RateLimited(
            f"this caller already has {hub.max_per_caller} streams open on this server: "
            "close one (or reuse it) and retry",
            retry_after=5,
        )
    topic_set, scope = frozenset(chosen), principal.scope
    shutdown = anyio.Event()  # set by sse-starlette when the server is stopping

    async def events() -> AsyncIterator[ServerSentEvent | bytes]:
        # Registered only once the response streams, so a client gone before is never held.
        sub, cursor = hub.subscribe(topic_set, scope)
        if last is not None and last > cursor:
            sub.after = last  # another replica may be a little ahead: never send twice

        async def end_on_shutdown_or_expiry() -> None:
            # The stream ends when the server stops, or when the credential it was opened
            # with (the token's exp, the ticket's) expires: the client reconnects with a
            # fresh one and resumes from its last event id.
            left = math.inf if expires_at is None else expires_at - time.time()
            with anyio.move_on_after(max(0.0, left)):
                await shutdown.wait()
            sub.stop()

        watcher = asyncio.create_task(end_on_shutdown_or_expiry())
        try:
            yield ServerSentEvent(comment="subscribed")  # registered: nothing after is missed
            if last is not None and last < cursor:
                try:
                    async for page in hub.backfill(after=last, upto=cursor, sub=sub):
                        if page:
                            yield b"".join(event.wire() for event in page)
                        if expires_at is not None and time.time() >= expires_at:
                            return  # a long backfill ends with its credential too
                except service.HistoryExpired:
                    # What it asked for was purged: re-read the state; live events follow.
                    yield _resync("EVENTS_EXPIRED")
            if last is None or last < cursor:
                # The stream's position, as an `id:` alone (no event is dispatched): a client
                # that has received no event yet still resumes from here after a drop.
                yield ServerSentEvent(id=str(cursor))
            while True:
                # What has queued up goes out in one write (one wake-up per burst).
                batch = [await sub.get()]
                while len(batch) < WRITE_BATCH and not sub.queue.empty():
                    batch.append(sub.get_nowait())
                ending = next((e for e in batch if e.event in (service.RESYNC, "")), None)
                wire = b"".join(e.wire() for e in batch if e.event not in (service.RESYNC, ""))
                if wire:
                    yield wire
                if ending is not None:
                    if ending.event == service.RESYNC:  # nothing else is queued after it
                        yield _resync(str(ending.data.get("reason", "")))
                    return
        finally:
            watcher.cancel()
            hub.unsubscribe(sub)

    return StreamResponse(
        events(),
        ping=request.app.state.settings.stream_keepalive_seconds,
        ping_message_factory=_ping_event,
        stalled_after=request.app.state.settings.stream_stall_seconds,
        shutdown_event=shutdown,
        shutdown_grace_period=1,
        on_close=lambda: hub.release(caller),
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


# --- The stream in the OpenAPI document -------------------------------------------------------

_REF = "#/components/schemas/"
_NULLABLE_STRING = {"anyOf": [{"type": "string"}, {"type": "null"}]}
_NULLABLE_INT = {"anyOf": [{"type": "integer"}, {"type": "null"}]}

# The `data` of each event (a JSON object), as components beside the REST resources whose
# schemas they share (VehicleStatus, VehicleDesired, RolloutStatus, RolloutCounts,
# AuditEntryOut). Open objects: a delta names only what changed.
EVENT_PAYLOADS: dict[str, dict[str, Any]] = {
    "VehicleDelta": {
        "type": "object",
        "description": "What changed on one vehicle (a partial Vehicle), with its scope.",
        "required": ["id", "region", "model", "org"],
        "properties": {
            "id": {"type": "string"},
            "region": {"type": "string"},
            "model": {"type": "string"},
            "org": {"type": "string"},
            "status": {"$ref": _REF + "VehicleStatus"},
            "reasonCodes": {"type": "array", "items": {"type": "string"}},
            "desired": {"$ref": _REF + "VehicleDesired"},
            "registered": {"type": "boolean", "description": "Present when just registered."},
        },
    },
    "VehicleUpdatedEvent": {
        "type": "object",
        "description": "`vehicle.updated`: up to 500 vehicles' deltas, in id order (each inside "
        "the subscriber's scope).",
        "required": ["vehicles"],
        "properties": {
            "vehicles": {"type": "array", "minItems": 1, "items": {"$ref": _REF + "VehicleDelta"}}
        },
    },
    "RolloutUpdatedEvent": {
        "type": "object",
        "description": "`rollout.updated`: the fields of the rollout that move, as GET "
        "/api/v1/rollouts/{id} shows them now (every event, the first at creation included, "
        "carries all of them); `counts` is the same as `progress`, its name before 1.6.0.",
        "required": [
            "id",
            "status",
            "statusReason",
            "stage",
            "stageIndex",
            "stageCount",
            "waitingFor",
            "progress",
        ],
        "properties": {
            "id": {"type": "integer"},
            "status": {"$ref": _REF + "RolloutStatus"},
            "statusReason": _NULLABLE_STRING,
            "stage": _NULLABLE_STRING,
            "stageIndex": _NULLABLE_INT,
            "stageCount": _NULLABLE_INT,
            "waitingFor": _NULLABLE_STRING,
            "progress": {"$ref": _REF + "RolloutCounts"},
            "counts": {"$ref": _REF + "RolloutCounts", "deprecated": True},
        },
    },
    "AuditCreatedEvent": {
        "description": "`audit.created`: the new entry as GET /api/v1/audit-log lists it, with "
        "the scope it was recorded in.",
        "allOf": [
            {"$ref": _REF + "AuditEntryOut"},
            {
                "type": "object",
                "properties": {
                    "scope": {
                        "type": "object",
                        "properties": {
                            name: {
                                "anyOf": [
                                    {"type": "array", "items": {"type": "string"}},
                                    {"type": "null"},
                                ]
                            }
                            for name in ("regions", "models", "orgs")
                        },
                    }
                },
            },
        ],
    },
    "FleetSummaryEvent": {
        "type": "object",
        "description": "`fleet.summary`: the counts changed; re-read GET /api/v1/fleet/summary "
        "(it carries no counts: they are scoped there).",
        "required": ["reason"],
        "properties": {
            "reason": {"type": "string", "enum": ["refreshed", "reconcile"]},
            "refreshedAt": {"type": "string", "format": "date-time"},
            "seconds": {"type": "number"},
            "runId": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        },
    },
    "ResyncEvent": {
        "type": "object",
        "description": "`resync` (no id): re-read the state. `SLOW_SUBSCRIBER`: the stream "
        "ends after it (open a new one without a last event id); `EVENTS_EXPIRED` (the last "
        "event id is older than the feed keeps): live events follow.",
        "required": ["reason"],
        "properties": {"reason": {"type": "string", "enum": ["EVENTS_EXPIRED", "SLOW_SUBSCRIBER"]}},
    },
}
_EVENTS = {
    "vehicle.updated": "VehicleUpdatedEvent",
    "rollout.updated": "RolloutUpdatedEvent",
    "audit.created": "AuditCreatedEvent",
    "fleet.summary": "FleetSummaryEvent",
}


def _event_schema(name: str, payload: str, *, with_id: bool) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "title": name,
        "required": ["event", "data", *(["id"] if with_id else [])],
        "properties": {
            "event": {"const": name},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"$ref": _REF + payload},
            },
            "id": {
                "type": "string",
                "pattern": "^[1-9][0-9]*$",
                "description": "The change-feed id: resume after it with Last-Event-ID.",
            },
        },
    }
    return schema


def document_stream_events(schema: dict[str, Any], path: str) -> None:
    """Describe each event of GET /api/v1/stream in the OpenAPI document: under OpenAPI 3.1, a
    `text/event-stream` schema describes one event (`event`, `data`, `id`), and each event's
    `data` is JSON (`contentSchema`) of its payload component."""
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(EVENT_PAYLOADS)
    operation = schema["paths"][path]["get"]
    # What the route takes, so a client knows it before a 422: `_last_event_id` (blank is
    # none; a header carries no surrounding spaces) and `multi` over the topics.
    patterns = {
        "lastEventId": LAST_EVENT_ID_PATTERN,
        "Last-Event-ID": "^([0-9]{1,18})?$",
        "topics": TOPICS_PATTERN,
    }
    for parameter in operation.get("parameters", []):
        name = parameter["name"]
        if name not in patterns:
            continue
        # Absent or a value: FastAPI's `anyOf [..., null]` would read as the text "null".
        (schema,) = [
            b
            for b in parameter["schema"].get("anyOf", [parameter["schema"]])
            if b.get("type") != "null"
        ]
        schema = {
            **schema,
            "title": parameter["schema"].get("title"),
            "description": parameter["schema"].get("description"),
        }
        schema = {k: v for k, v in schema.items() if v is not None}
        if schema.get("type") == "array":
            schema["items"] = {**schema.get("items", {}), "pattern": patterns[name]}
        else:
            schema["pattern"] = patterns[name]
        parameter["schema"] = schema
        if name == "lastEventId":  # resume from the oldest event still kept
            parameter["example"] = "0"
    variants = [_event_schema(name, payload, with_id=True) for name, payload in _EVENTS.items()]
    variants.append(_event_schema(service.RESYNC, "ResyncEvent", with_id=False))
    operation["responses"]["200"] = {
        "description": "One event per change inside the caller's scope (see the description).",
        "content": {"text/event-stream": {"schema": {"oneOf": variants}}},
    }
