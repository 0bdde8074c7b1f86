"""Releases: queries, and registering one (its signature verified first)."""

from __future__ import annotations

from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.errors import Conflict, NotFound
from models.api import ReleaseCreate
from models.tables import Release
from services import audit
from services.pagination import SortKey, keyset, parse_sort, split_page, timestamp_key
from services.rollouts import Actor, check_release_signature
from services.signing import TrustedKeys

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
        raise NotFound(f"release {version!r} not found")
    return release


async def create_release(
    session: AsyncSession, *, body: ReleaseCreate, actor: Actor, trusted_keys: TrustedKeys | None
) -> Release:
    """Register a release once its signature verifies against the artifact registry's trusted
    keys (else 422 RELEASE_SIGNATURE_INVALID, nothing stored). A version registered already
    is 409 CONFLICT: a release never changes. Audited as `release.created`."""
    components = [c.model_dump() for c in body.components]
    check_release_signature(
        trusted_keys,
        version=body.version,
        artifact_digest=body.artifact_digest,
        components=components,
        signature=body.signature,
        key_id=body.signing_key_id,
        field="signature",
    )
    conn = await session.connection()
    inserted = await conn.execute(
        insert(Release)
        .values(
            version=body.version,
            components=components,
            artifact_digest=body.artifact_digest,
            signature=body.signature,
            signing_key_id=body.signing_key_id,
            notes=body.notes,
            created_by=actor.subject,
        )
        .on_conflict_do_nothing(index_elements=["version"])
        .returning(col(Release.version))
    )
    if inserted.first() is None:
        raise Conflict(
            f"release {body.version!r} is registered already (a release never changes)",
            details=[{"field": "version", "message": "use a new version"}],
        )
    await audit.record(
        session,
        actor=actor.subject,
        role=actor.role,
        source=actor.source,
        action="release.created",
        target_type="release",
        target_id=body.version,
        correlation_id=actor.correlation_id,
        payload=body.model_dump(by_alias=True, mode="json"),
    )
    release = await session.get(Release, body.version)
    assert release is not None
    return release
