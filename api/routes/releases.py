"""Releases: stack versions with components and signature."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request

from api.deps import CursorQuery, LimitQuery, SessionDep, SortQuery, ViewerDep
from api.envelope import ok, page
from api.errors import ErrorResponses
from models.api import Envelope, ListEnvelope, ReleaseOut
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
    return page(
        request,
        [ReleaseOut.model_validate(r) for r in rows],
        limit=limit,
        next_cursor=next_cursor,
    )


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
