"""Vehicles: the fleet list and one vehicle."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from api.deprecation import Deprecation
from api.deps import (
    CursorQuery,
    LimitQuery,
    OperatorDep,
    ReadConnectionDep,
    SessionDep,
    SettingsDep,
    SortQuery,
    ViewerDep,
    actor_of,
    multi,
    require,
)
from api.envelope import ok, ok_json, page_json
from api.errors import ErrorResponses
from core.auth import Principal
from core.errors import Forbidden
from models.api import (
    DesiredStateConstraints,
    Envelope,
    ListEnvelope,
    VehicleBatchIn,
    VehicleIn,
    VehicleOut,
)
from models.enums import Role
from models.telemetry import TimelineEventOut, VehicleDesiredStateOut
from services import vehicles as service

router = APIRouter(prefix="/vehicles", tags=["vehicles"])
# The devices' side (served by `motorcade ingest` too): their desired state.
device_router = APIRouter(prefix="/vehicles", tags=["vehicles"])

Multi = Annotated[list[str] | None, Query()]
DeviceDep = Annotated[Principal, Depends(require(frozenset({Role.DEVICE})))]
VehicleIdPath = Annotated[str, Path(max_length=128)]


def vehicle_out(v: Mapping[str, Any]) -> VehicleOut:
    """A vehicle row (services.vehicles.VEHICLE_COLUMNS) as the API shows it."""
    return VehicleOut(
        id=v["id"],
        model=v["model"],
        region=v["region"],
        ring=v["ring"],
        org=v["org"],
        metadata=v["metadata"] or {},
        desired={  # type: ignore[arg-type]
            "release_version": v["desired_release_version"],
            "desired_state_id": str(v["desired_state_id"]) if v["desired_state_id"] else None,
            "rollout_id": v["rollout_id"],
        },
        actual={"release_version": v["actual_release_version"]},  # type: ignore[arg-type]
        status=v["status"],
        reason_codes=list(v["reason_codes"] or []),
        last_seen_at=v["last_seen_at"],
        battery_percent=v["battery_percent"],
        stationary=v["stationary"],
        updated_at=v["updated_at"],
    )


@router.get(
    "",
    response_model=ListEnvelope[VehicleOut],
    summary="List vehicles (keyset pagination, filters, search, sort)",
    responses=ErrorResponses.read,
)
async def list_vehicles(
    request: Request,
    principal: ViewerDep,
    conn: ReadConnectionDep,
    model: Multi = None,
    region: Multi = None,
    ring: Multi = None,
    status: Multi = None,
    reason_code: Annotated[list[str] | None, Query(alias="reasonCode")] = None,
    release_version: Annotated[list[str] | None, Query(alias="releaseVersion")] = None,
    rollout_id: Annotated[list[str] | None, Query(alias="rolloutId")] = None,
    q: Annotated[str | None, Query(description="Prefix of the vehicle id.")] = None,
    sort: SortQuery = None,
    cursor: CursorQuery = None,
    limit: LimitQuery = 50,
) -> Any:
    """Filters are repeatable or comma-separated; `sort` is `id`, `lastSeenAt` or `status`
    (by the status's name, then id), prefixed by `-` for descending. `releaseVersion`
    matches the release a vehicle runs."""
    filters = service.VehicleFilters(
        models=multi(model),
        regions=multi(region),
        rings=multi(ring),
        statuses=multi(status),
        reason_codes=multi(reason_code),
        release_versions=multi(release_version),
        rollout_ids=multi(rollout_id),
        q=q,
    )
    rows, next_cursor = await service.list_vehicles(
        conn, scope=principal.scope, filters=filters, sort=sort, cursor=cursor, limit=limit
    )
    return page_json(request, [vehicle_out(v) for v in rows], limit=limit, next_cursor=next_cursor)


@router.post(
    "",
    status_code=201,
    response_model=Envelope[list[VehicleOut]],
    summary="Register one vehicle or a batch (operator)",
    responses=ErrorResponses.create,
)
async def register_vehicles(
    request: Request,
    body: VehicleIn | VehicleBatchIn,
    principal: OperatorDep,
    session: SessionDep,
    settings: SettingsDep,
) -> Any:
    """One vehicle (`{"id", "model", "region", "ring", "org", "metadata"}`) or a batch
    (`{"vehicles": [...]}`, at most 500), all or none: an id twice in the request is 422, an
    id registered already 409 `CONFLICT` (`details` name each), and nothing is stored. Vehicle
    ids are one namespace for the fleet, so registering tells whether an id is taken: an
    operator with scopes gets 403 `FORBIDDEN` (the same answer whatever the ids), unless
    `MOTORCADE_SCOPED_VEHICLE_REGISTRATION` lets it register inside its scope (a vehicle
    outside it 403). A new vehicle has no desired state: its
    status is `in_sync` until a desired state or a rollout reaches it. Audited as
    `vehicle.registered`; announced on the stream (`vehicle.updated`, `registered: true`)."""
    vehicles = body.vehicles if isinstance(body, VehicleBatchIn) else [body]
    created = await service.register_vehicles(
        session,
        vehicles=vehicles,
        scope=principal.scope,
        actor=actor_of(request, principal),
        scoped_registration=settings.scoped_vehicle_registration,
    )
    headers = {"Location": f"/api/v1/vehicles/{created[0]['id']}"} if len(created) == 1 else {}
    return JSONResponse(
        ok(request, [vehicle_out(v) for v in created]), status_code=201, headers=headers
    )


@router.get(
    "/{vehicle_id}",
    response_model=Envelope[VehicleOut],
    summary="One vehicle: desired vs actual, status, reason codes",
    responses=ErrorResponses.read_one,
)
async def get_vehicle(
    request: Request,
    principal: ViewerDep,
    conn: ReadConnectionDep,
    vehicle_id: Annotated[str, Path(max_length=128)],
) -> Any:
    row = await service.get_vehicle_view(conn, scope=principal.scope, vehicle_id=vehicle_id)
    return ok_json(request, vehicle_out(row))


@device_router.get(
    "/{vehicle_id}/desired-state",
    response_model=Envelope[VehicleDesiredStateOut],
    summary="What this vehicle should run (device token of that vehicle); ETag and 304",
    responses={**ErrorResponses.read_one, 304: {"description": "Not modified (If-None-Match)"}},
)
async def get_desired_state(
    request: Request,
    principal: DeviceDep,
    session: SessionDep,
    vehicle_id: VehicleIdPath,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Any:
    """A device reads its own vehicle's desired state only (another vehicle: 403). Poll with
    `If-None-Match: <ETag>`: `304` with no body while the desired state is unchanged.
    `constraints` are the safety checks to apply again before applying (`minBatteryPercent`,
    `requireStationary`, `maintenanceWindow`): report `blocked` when one fails."""
    if principal.vehicle_id != vehicle_id:
        raise Forbidden("a device may only read its own vehicle's desired state")
    view = await service.get_desired_state(session, vehicle_id=vehicle_id)
    headers = {"ETag": view.etag, "Cache-Control": "no-cache"}
    if if_none_match is not None and (
        if_none_match.strip() == "*"
        or view.etag in [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    ):
        return Response(status_code=304, headers=headers)
    body = ok(
        request,
        VehicleDesiredStateOut(
            vehicle_id=view.vehicle_id,
            desired_state_id=view.desired_state_id,
            release_version=view.release_version,
            rollout_id=view.rollout_id,
            components=view.components,
            artifact_digest=view.artifact_digest,
            signature=view.signature,
            signing_key_id=view.signing_key_id,
            created_at=view.created_at,
            constraints=DesiredStateConstraints.stored(view.constraints),
        ),
    )
    return JSONResponse(body, headers=headers)


def timeline_out(e: Mapping[str, Any]) -> TimelineEventOut:
    """A timeline row (services.vehicles.TIMELINE_COLUMNS) as the API shows it."""
    return TimelineEventOut(
        event_id=str(e["event_id"]),
        vehicle_id=e["vehicle_id"],
        seq=e["seq"],
        epoch=e["epoch"],
        type=e["type"],
        occurred_at=e["occurred_at"],
        received_at=e["received_at"],
        desired_state_id=str(e["desired_state_id"]) if e["desired_state_id"] else None,
        release_version=e["release_version"],
        reason_code=e["reason_code"],
        details=e["details"] or {},
    )


@router.get(
    "/{vehicle_id}/timeline",
    response_model=ListEnvelope[TimelineEventOut],
    summary="The vehicle's timeline events, newest first (keyset pagination)",
    responses=ErrorResponses.read_one,
)
async def get_timeline(
    request: Request,
    principal: ViewerDep,
    conn: ReadConnectionDep,
    vehicle_id: VehicleIdPath,
    cursor: CursorQuery = None,
    limit: LimitQuery = 50,
) -> Any:
    """Newest first by (`epoch`, `seq`) (a late event appears in its place), then event id."""
    rows, next_cursor = await service.list_timeline(
        conn, scope=principal.scope, vehicle_id=vehicle_id, cursor=cursor, limit=limit
    )
    return page_json(request, [timeline_out(e) for e in rows], limit=limit, next_cursor=next_cursor)


# The timeline under its older name: `events` (SPEC.md calls them "timeline events").
# Kept for clients written against that name; deprecated, answers with Deprecation, Sunset
# and a successor Link (docs/api.md, Versioning and deprecation).
LEGACY_EVENTS = Deprecation(
    since=datetime(2026, 11, 28, tzinfo=UTC),
    sunset=datetime(2027, 5, 31, tzinfo=UTC),
    successor="/api/v1/vehicles/{vehicle_id}/timeline",
)


@router.get(
    "/{vehicle_id}/events",
    response_model=ListEnvelope[TimelineEventOut],
    summary="Deprecated alias of GET /vehicles/{vehicle_id}/timeline",
    responses=ErrorResponses.read_one,
    **LEGACY_EVENTS.route_kwargs(),
)
async def get_timeline_legacy(
    request: Request,
    principal: ViewerDep,
    conn: ReadConnectionDep,
    vehicle_id: VehicleIdPath,
    cursor: CursorQuery = None,
    limit: LimitQuery = 50,
) -> Any:
    """The same as `GET /vehicles/{vehicle_id}/timeline`; removed after its sunset
    (2027-05-31). Use the timeline."""
    return await get_timeline(
        request, principal, conn, vehicle_id=vehicle_id, cursor=cursor, limit=limit
    )
