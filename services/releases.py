"""Release queries."""

from __future__ import annotations

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from models.tables import Release
from services.errors import NotFoundError
from services.pagination import SortKey, keyset, parse_sort, split_page, timestamp_key

RELEASE_SORTS = (
    timestamp_key("createdAt", col(Release.created_at)),
    SortKey("version", col(Release.version)),
)


async def list_releases(
    session: AsyncSession, *, sort: str | None, cursor: str | None, limit: int
) -> tuple[list[Release], str | None]:
    order = parse_sort(sort, RELEASE_SORTS, "-createdAt")
    stmt = keyset(
        select(Release), sort=order, id_column=col(Release.version), cursor=cursor, limit=limit
    )
    rows = list((await session.exec(stmt)).all())
    attr = "created_at" if order.key.name == "createdAt" else "version"
    return split_page(
        rows,
        sort=order,
        limit=limit,
        value_of=lambda r: getattr(r, attr),
        id_of=lambda r: r.version,
    )


async def get_release(session: AsyncSession, *, version: str) -> Release:
    release = await session.get(Release, version)
    if release is None:
        raise NotFoundError(f"release {version!r} not found")
    return release
