"""Desired states: the list (per vehicle, rollout, release) and direct desired states for a
target set, under the same safety policy and overlap rule as rollouts."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from api.deps import (
    CursorQuery,
    LimitQuery,
    OperatorDep,
    SessionDep,
    SettingsDep,
    ViewerDep,
    assignment_request,
    multi,
)
from api.envelope import ok, page
from api.errors import ErrorResponses
from models.api import (
    DesiredStateConstraints,
    DesiredStateCreate,
    DesiredStateOut,
    DesiredStatesCreated,
    Envelope,
    ListEnvelope,
)
from models.tables import DesiredState
from services import desired_states as service

router = APIRouter(prefix="/desired-states", tags=["desired-states"])


def desired_state_out(d: DesiredState) -> DesiredStateOut:
    return DesiredStateOut(
        id=str(d.id),
        vehicle_id=d.vehicle_id,
        release_version=d.release_version,
        rollout_id=d.rollout_id,
        previous_desired_state_id=(
            str(d.previous_desired_state_id) if d.previous_desired_state_id else None
        ),
        reason=d.reason,
        created_by=d.created_by,
        created_at=d.created_at,
        constraints=DesiredStateConstraints.stored(d.constraints),
    )


@router.get(
    "",
    response_model=ListEnvelope[DesiredStateOut],
    summary="List desired states, newest first",
    responses=ErrorResponses.read,
)
async def list_desired_states(
    request: Request,
    principal: ViewerDep,
    session: SessionDep,
    vehicle_id: Annotated[list[str] | None, Query(alias="vehicleId")] = None,
    rollout_id: Annotated[list[str] | None, Query(alias="rolloutId")] = None,
    release_version: Annotated[list[str] | None, Query(alias="releaseVersion")] = None,
    cursor: CursorQuery = None,
    limit: LimitQuery = 50,
) -> Any:
    """Filters are repeatable or comma-separated. Keyset on (createdAt, id), newest first."""
    rows, next_cursor = await service.list_desired_states(
        session,
        scope=principal.scope,
        filters=service.DesiredStateFilters(
            vehicle_ids=multi(vehicle_id),
            rollout_ids=multi(rollout_id),
            release_versions=multi(release_version),
        ),
        cursor=cursor,
        limit=limit,
    )
    return page(request, [desired_state_out(d) for d in rows], limit=limit, next_cursor=next_cursor)


@router.post(
    "",
    status_code=201,
    response_model=Envelope[DesiredStatesCreated],
    summary="Set the desired release of a target set of vehicles directly (no rollout)",
    responses=ErrorResponses.create,
)
async def create_desired_states(
    request: Request,
    body: DesiredStateCreate,
    principal: OperatorDep,
    session: SessionDep,
    settings: SettingsDep,
) -> Any:
    """`targets` select vehicles like a rollout's (lists AND together, at least one given).
    The release must exist and its signature verify (else 422 `RELEASE_SIGNATURE_INVALID`);
    `safetyChecks` weaker than the fleet default need `acknowledgeWeakenedSafety` and a
    `reason` (else 422 `SAFETY_POLICY_WEAKENED`); a vehicle inside an active rollout is
    refused (409 `CONFLICT`); at most 10,000 vehicles per request (else 422: use a rollout).
    One desired state per vehicle, its previous one linked; the vehicles become `pending`.
    Audited as `desired_states.created` (and `desired_states.safety_weakened`)."""
    created = await service.create_desired_states(
        session, body=body, request=assignment_request(request, principal, settings)
    )
    return JSONResponse(ok(request, created), status_code=201)
