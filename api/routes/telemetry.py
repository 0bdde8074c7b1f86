"""Telemetry: `POST /api/v1/telemetry` for devices (their own vehicle) and gateways.

The route parses (size limits first, then strict validation of the whole batch), authorizes,
and hands the batch to the process's group committer (services/ingest.py); it answers 202
only once the group holding its events has committed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from api.deps import require
from api.envelope import ok
from api.errors import ErrorResponses, error_responses, invalid_request
from api.ratelimit import TelemetryLimits
from core.auth import Principal
from core.errors import Forbidden, Overloaded, PayloadTooLarge, RateLimited
from core.settings import Settings
from models.api import Envelope
from models.enums import Role
from models.storable import NUL_REFUSED, STORABLE_TEXT_PATTERN, SURROGATE_REFUSED, json_problems
from models.telemetry import (
    MAX_EVENTS_PER_REQUEST,
    MAX_HEARTBEATS_PER_REQUEST,
    UNSTORABLE,
    EventIn,
    HeartbeatIn,
    TelemetryAccepted,
    TelemetryBatch,
)
from services.ingest import TelemetryIngestor

router = APIRouter(tags=["telemetry"])

TELEMETRY_ROLES = frozenset({Role.DEVICE, Role.GATEWAY})

_BODY_SCHEMA = {"$ref": "#/components/schemas/TelemetryBatch"}
DESCRIPTION = (
    f"At most {MAX_EVENTS_PER_REQUEST} events, {MAX_HEARTBEATS_PER_REQUEST} heartbeats and "
    "`MOTORCADE_TELEMETRY_MAX_BODY_BYTES` (1 MiB) per request (else 413 "
    "`PAYLOAD_TOO_LARGE`). Each device and gateway token has a budget of items (events + "
    "heartbeats) per minute; past it, 429 `RATE_LIMITED` with `Retry-After`. In production a "
    "gateway token must carry a scope claim (regions, models or orgs; else 403 `FORBIDDEN`) "
    "unless `MOTORCADE_ALLOW_FLEET_GATEWAYS=true`. One invalid item "
    "rejects the whole batch (422, `details` naming its index and field) and nothing of it is "
    "stored; a vehicle that is unknown or outside the caller's scope is 404. A device may "
    "post only for its own vehicle (403). `202` with `{accepted, duplicates}` is sent only "
    "once the events are committed. Events deduplicate on (`vehicleId`, `eventId`) and order "
    "by (`epoch`, `seq`) (`seq` from 1, `epoch` default 0: a greater epoch starts a new "
    "counter): a late event enters the timeline but never moves the status backwards; a "
    "`seq` more than MOTORCADE_MAX_SEQ_JUMP past the vehicle's newest is 422. A `sentAt`, "
    "`occurredAt` or `epoch` (Unix seconds) more than MOTORCADE_MAX_CLOCK_SKEW_SECONDS past "
    "the server's clock is 422. `lastSeenAt` is the server's receive time; heartbeats "
    "coalesce per vehicle (latest `sentAt`, capped at its arrival, wins). Past the ingest "
    "queue's bound: 503 `OVERLOADED` with `Retry-After`."
)


def check_gateway(principal: Principal, settings: Settings) -> None:
    """In production a gateway token must be bound to a scope (regions, models or orgs),
    unless MOTORCADE_ALLOW_FLEET_GATEWAYS says fleet-wide gateways are allowed."""
    if (
        principal.role is Role.GATEWAY
        and principal.scope.unrestricted
        and not settings.fleet_gateways_allowed
    ):
        raise Forbidden(
            "this gateway token has no scope (regions, models or orgs claim) and fleet-wide "
            "gateways are not allowed here: issue it a scope, or set "
            "MOTORCADE_ALLOW_FLEET_GATEWAYS=true"
        )


def parse_batch(body: bytes) -> TelemetryBatch:
    try:
        return TelemetryBatch.model_validate_json(body or b"{}")
    except ValidationError as exc:
        errors: list[Any] = exc.errors(include_url=False)
        too_many = [e for e in errors if e.get("type") == "too_long" and len(e["loc"]) == 1]
        if too_many:
            raise PayloadTooLarge(
                f"at most {MAX_EVENTS_PER_REQUEST} events and {MAX_HEARTBEATS_PER_REQUEST} "
                "heartbeats per request",
                details=[{"field": str(e["loc"][0]), "message": e["msg"]} for e in too_many],
            ) from None
        if any(
            e.get("type") == "json_invalid" and "hex escape" in e.get("msg", "") for e in errors
        ):  # how pydantic's JSON parser says it met a lone surrogate escape
            errors = _lone_surrogates(body) or errors
        raise invalid_request(
            [_located(e) for e in errors], note="; the whole batch is rejected"
        ) from None


def _located(error: Any) -> Any:
    """A validation error located in the body, down to the place inside `details` that
    PostgreSQL could not store; a storable-text pattern's mismatch said in words."""
    loc = ("body", *error["loc"], *error.get("ctx", {}).get("path", ()))
    if error.get("type") == "string_pattern_mismatch" and (
        error.get("ctx", {}).get("pattern") == STORABLE_TEXT_PATTERN
    ):
        return {**error, "loc": loc, "msg": NUL_REFUSED}
    return {**error, "loc": loc}


def _lone_surrogates(body: bytes) -> list[dict[str, Any]]:
    """A body the JSON parser refused, read again (failure path only) by one that decodes a
    lone surrogate escape (`\\ud800`) instead of refusing it: the places holding one, as
    validation errors naming their field. Empty when the body is invalid for another reason."""
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError):
        return []
    return [
        {"loc": path, "msg": problem, "type": UNSTORABLE}
        for path, problem in json_problems(raw)
        if problem.endswith(SURROGATE_REFUSED)
    ]


def check_device(principal: Principal, batch: TelemetryBatch) -> None:
    """A device posts for its own vehicle only: anything else refuses the whole batch."""
    if principal.role is not Role.DEVICE:
        return
    details: list[dict[str, Any]] = []
    named: list[tuple[str, Sequence[HeartbeatIn | EventIn]]] = [
        ("heartbeats", batch.heartbeats),
        ("events", batch.events),
    ]
    for kind, items in named:
        for index, item in enumerate(items):
            if item.vehicle_id != principal.vehicle_id:
                details.append(
                    {
                        "field": f"{kind}.{index}.vehicleId",
                        "index": index,
                        "message": "a device token may only post for its own vehicle",
                    }
                )
    if details:
        raise Forbidden("a device may only post telemetry for its own vehicle", details=details)


@router.post(
    "/telemetry",
    status_code=202,
    response_model=Envelope[TelemetryAccepted],
    summary="Heartbeats and timeline events, batched (device: own vehicle; gateway: many)",
    description=DESCRIPTION,
    responses={
        **ErrorResponses.write,
        **error_responses(PayloadTooLarge, RateLimited, Overloaded),
    },
    openapi_extra={
        # An empty body is an empty batch (`parse_batch`): 202 with nothing accepted.
        "requestBody": {
            "required": False,
            "description": "The batch; an empty body is an empty batch.",
            "content": {"application/json": {"schema": _BODY_SCHEMA}},
        }
    },
)
async def post_telemetry(
    request: Request,
    principal: Principal = Depends(require(TELEMETRY_ROLES)),
) -> Any:
    received_at = datetime.now(UTC)  # the server's clock decides liveness, not the device's
    check_gateway(principal, request.app.state.settings)
    limits: TelemetryLimits = request.app.state.telemetry_limits
    limits.charge(principal, 1)  # before the body is read: empty and invalid requests count
    # api/bodylimit.py bounds the body (413) as it is read, before any route or auth.
    batch = parse_batch(await request.body())
    limits.charge(principal, len(batch.events) + len(batch.heartbeats) - 1)
    check_device(principal, batch)
    ingestor: TelemetryIngestor = request.app.state.ingestor
    done = await ingestor.submit(batch=batch, scope=principal.scope, received_at=received_at)
    body = ok(
        request,
        TelemetryAccepted(
            accepted=done.accepted,
            duplicates=done.duplicates,
            heartbeats=len(batch.heartbeats),
        ),
    )
    return JSONResponse(body, status_code=202)
