"""Reports: the fleet summary, fleet health and the reconcile outcome (desired-vs-actual
drift)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from api.deps import ReadConnectionDep, SessionDep, ViewerDep
from api.envelope import ok, ok_json
from api.errors import ErrorResponses
from models.api import Envelope
from models.reports import FleetSummary, HealthReport, ReconcileReport
from services import fleet
from services import reconcile as service

router = APIRouter(prefix="/reports", tags=["reports"])
fleet_router = APIRouter(prefix="/fleet", tags=["reports"])


@fleet_router.get(
    "/summary",
    response_model=Envelope[FleetSummary],
    summary="Fleet summary: vehicles by status, by model, region and ring, top reason codes",
    responses=ErrorResponses.read,
)
async def fleet_summary(request: Request, principal: ViewerDep, conn: ReadConnectionDep) -> Any:
    """Counts of the vehicles inside the caller's scope, from the materialization each
    reconcile run refreshes (`asOf`; every MOTORCADE_RECONCILE_INTERVAL_SECONDS): a few
    hundred rows read, never the fleet. `byModel`, `byRegion` and `byRing` give each value's
    total and statuses; `topReasonCodes` the 10 most frequent."""
    summary = await fleet.fleet_summary(
        conn, scope=principal.scope, cache=request.app.state.fleet_summaries
    )
    return ok_json(request, summary)


@router.get(
    "/reconcile",
    response_model=Envelope[ReconcileReport],
    summary="The latest reconcile run: desired-vs-actual drift, and the recent runs",
    responses=ErrorResponses.read,
)
async def reconcile_report(request: Request, principal: ViewerDep, session: SessionDep) -> Any:
    """The latest finished run of the periodic reconcile (a Temporal Schedule, every minute)
    with its drift rows (vehicles whose desired release differs from the one they run, by
    desired and actual release, status, region, model and org; largest first, at most 500,
    `driftTruncated` when there are more) and the last 10 runs. A scoped caller sees only
    the rows and counts inside its scope, and `markedOffline` (fleet-wide) as null."""
    report = await service.latest_report(session, scope=principal.scope)
    return ok(request, report)


@router.get(
    "/health",
    response_model=Envelope[HealthReport],
    summary="Fleet health: vehicles by status, offline count, top reason codes",
    responses=ErrorResponses.read,
)
async def health_report(request: Request, principal: ViewerDep, session: SessionDep) -> Any:
    """Counts of the vehicles inside the caller's scope by status (every status present,
    zeros included), how many are offline, and the 10 most frequent reason codes."""
    # Counted live (a scan): the dashboard's counts come from GET /fleet/summary instead.
    report = await service.fleet_health(session, scope=principal.scope)
    return ok(request, report)
