"""Vehicles: the fleet list and one vehicle."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request

from api.deps import CursorQuery, LimitQuery, SessionDep, SortQuery, ViewerDep, multi
from api.envelope import ok, page
from api.errors import ErrorResponses
from models.api import Envelope, ListEnvelope, VehicleOut
from models.tables import Vehicle
from services import vehicles as service

router = APIRouter(prefix="/vehicles", tags=["vehicles"])

Multi = Annotated[list[str] | None, Query()]


def vehicle_out(v: Vehicle) -> VehicleOut:
    return VehicleOut(
        id=v.id,
        model=v.model,
        region=v.region,
        ring=v.ring,
        org=v.org,
        metadata=v.metadata_ or {},
        desired={  # type: ignore[arg-type]
            "release_version": v.desired_release_version,
            "desired_state_id": str(v.desired_state_id) if v.desired_state_id else None,
            "rollout_id": v.rollout_id,
        },
        actual={"release_version": v.actual_release_version},  # type: ignore[arg-type]
        status=v.status,  # type: ignore[arg-type]
        reason_codes=list(v.reason_codes or []),
        last_seen_at=v.last_seen_at,
        battery_percent=v.battery_percent,
        stationary=v.stationary,
        updated_at=v.updated_at,
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
    session: SessionDep,
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
    """Filters are repeatable or comma-separated; `sort` is `id`, `lastSeenAt` or `status`,
    prefixed by `-` for descending. `releaseVersion` matches the release a vehicle runs."""
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
        session, scope=principal.scope, filters=filters, sort=sort, cursor=cursor, limit=limit
    )
    return page(request, [vehicle_out(v) for v in rows], limit=limit, next_cursor=next_cursor)


@router.get(
    "/{vehicle_id}",
    response_model=Envelope[VehicleOut],
    summary="One vehicle: desired vs actual, status, reason codes",
    responses=ErrorResponses.read_one,
)
async def get_vehicle(
    request: Request,
    principal: ViewerDep,
    session: SessionDep,
    vehicle_id: Annotated[str, Path(max_length=128)],
) -> Any:
    vehicle = await service.get_vehicle(session, scope=principal.scope, vehicle_id=vehicle_id)
    return ok(request, vehicle_out(vehicle))
