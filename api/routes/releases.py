"""Releases: stack versions with components and signature."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse

from api.deps import (
    CursorQuery,
    LimitQuery,
    OperatorDep,
    SessionDep,
    SettingsDep,
    SortQuery,
    ViewerDep,
    actor_of,
    trusted_keys_of,
)
from api.envelope import ok, page
from api.errors import ErrorResponses
from core.db import note_created
from models.api import Envelope, ListEnvelope, ReleaseCreate, ReleaseOut
from services import releases as service

router = APIRouter(prefix="/releases", tags=["releases"])


@router.get(
    "",
    response_model=ListEnvelope[ReleaseOut],
    summary="List releases, newest first by default",
    responses=ErrorResponses.read,
)
async def list_releases(
    request: Request,
    _: ViewerDep,
    session: SessionDep,
    sort: SortQuery = None,
    cursor: CursorQuery = None,
    limit: LimitQuery = 50,
) -> Any:
    """`sort` is `createdAt` or `version` (prefix `-` for descending; default `-createdAt`)."""
    rows, next_cursor = await service.list_releases(session, sort=sort, cursor=cursor, limit=limit)
    items = [ReleaseOut.model_validate(r) for r in rows]
    return page(request, items, limit=limit, next_cursor=next_cursor)


@router.get(
    "/{version}",
    response_model=Envelope[ReleaseOut],
    summary="One release",
    responses=ErrorResponses.read_one,
)
async def get_release(
    request: Request,
    _: ViewerDep,
    session: SessionDep,
    version: Annotated[str, Path(max_length=128)],
) -> Any:
    release = await service.get_release(session, version=version)
    return ok(request, ReleaseOut.model_validate(release))


@router.post(
    "",
    status_code=201,
    response_model=Envelope[ReleaseOut],
    summary="Register a release (its signature verified against the trusted keys)",
    responses=ErrorResponses.create,
)
async def create_release(
    request: Request,
    body: ReleaseCreate,
    principal: OperatorDep,
    session: SessionDep,
    settings: SettingsDep,
) -> Any:
    """The signature (ed25519, base64, by `signingKeyId`) must verify against the artifact
    registry's trusted keys over the canonical `version`, `artifactDigest` and `components`,
    else 422 `RELEASE_SIGNATURE_INVALID` (`details[].code`: `no_keys`, `unknown_key`,
    `malformed`, `mismatch`) and nothing is stored. A version registered already is 409
    `CONFLICT`. Audited as `release.created`."""
    release = await service.create_release(
        session,
        body=body,
        actor=actor_of(request, principal),
        trusted_keys=trusted_keys_of(settings),
    )
    note_created(f"/api/v1/releases/{release.version}")  # a retry's lost answer (idempotency)
    return JSONResponse(
        ok(request, ReleaseOut.model_validate(release)),
        status_code=201,
        headers={"Location": f"/api/v1/releases/{release.version}"},
    )
