"""Who the caller is: what a dashboard asks first, to show or hide its write controls."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request

from api.deps import WRITE_ROLES, PrincipalDep
from api.envelope import ok
from api.errors import ErrorResponses
from models.api import CallerOut, Envelope

router = APIRouter(tags=["caller"])


@router.get(
    "/me",
    response_model=Envelope[CallerOut],
    summary="The caller: subject, role and scopes, as the API sees its token",
    description="Any valid token. A dashboard shows write controls only when `canWrite` is "
    "true; the API enforces the role on every write whatever a page shows.",
    responses=ErrorResponses.read,
)
async def get_me(request: Request, principal: PrincipalDep) -> dict[str, Any]:
    return ok(
        request,
        {
            "subject": principal.subject,
            "role": principal.role,
            "canWrite": principal.role in WRITE_ROLES,
            "regions": principal.regions,
            "models": principal.models,
            "orgs": principal.orgs,
            "vehicleId": principal.vehicle_id,
            "expiresAt": (
                datetime.fromtimestamp(principal.expires_at, UTC) if principal.expires_at else None
            ),
        },
    )
