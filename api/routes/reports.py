"""Reports: fleet health and the reconcile outcome (desired-vs-actual drift)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from api.deps import SessionDep, ViewerDep
from api.envelope import ok
from api.errors import ErrorResponses
from models.api import Envelope
from models.reconcile import HealthReport, ReconcileReport
from services import reconcile as service

router = APIRouter(prefix="/reports", tags=["reports"])


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
    # A scan (GROUP BY status over the (status, id) index) for now; issue 5 moves it to
    # counters kept by the writers.
    report = await service.fleet_health(session, scope=principal.scope)
    return ok(request, report)
