"""Releases: queries, registering one (its signature verified first), and the release a
rollout or a desired state names, verified again before it is used."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.errors import Conflict, InvalidInput, NotFound, ReleaseSignatureInvalid
from models.api import ReleaseCreate
from models.tables import Release
from services import audit
from services.audit import Actor
from services.pagination import SortKey, keyset, parse_sort, split_page, timestamp_key
from services.signing import SignatureInvalid, TrustedKeys, verify_release

RELEASE_SORTS = (
    timestamp_key("createdAt", col(Release.created_at)),
    SortKey("version", col(Release.version)),
)


async def list_releases(
    session: AsyncSession, *, sort: str | None, cursor: str | None, limit: int
) -> tuple[list[Release], str | None]:
    order = parse_sort(sort, RELEASE_SORTS, "-createdAt")
    stmt = keyset(
        select(Release),
        sort=order,
        id_column=col(Release.version),
        id_kind="text",
        cursor=cursor,
        limit=limit,
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
        actor=actor,
        action="release.created",
        target_type="release",
        target_id=body.version,
        payload=body.model_dump(by_alias=True, mode="json"),
    )
    release = await session.get(Release, body.version)
    assert release is not None
    return release


async def load_verified_release(
    session: AsyncSession, *, version: str, trusted_keys: TrustedKeys | None
) -> Release:
    """The release, once its stored signature verifies against the trusted keys."""
    release = await session.get(Release, version)
    if release is None:
        raise InvalidInput(
            f"release {version!r} does not exist",
            details=[{"field": "releaseVersion", "message": "register the release first"}],
        )
    check_release_signature(
        trusted_keys,
        version=release.version,
        artifact_digest=release.artifact_digest,
        components=list(release.components or []),
        signature=release.signature,
        key_id=release.signing_key_id,
        field="releaseVersion",
    )
    return release


def check_release_signature(
    trusted_keys: TrustedKeys | None,
    *,
    version: str,
    artifact_digest: str,
    components: list[dict[str, Any]],
    signature: str,
    key_id: str,
    field: str,
) -> None:
    """Return if the release's signature verifies against the artifact registry's trusted
    keys; else `ReleaseSignatureInvalid` (422 RELEASE_SIGNATURE_INVALID) naming `field` and
    why (`no_keys`, `unknown_key`, `malformed`, `mismatch`)."""
    if trusted_keys is None:
        raise ReleaseSignatureInvalid(
            "no trusted release-signing keys are configured (MOTORCADE_TRUSTED_KEYS_FILE); "
            "no release can be verified",
            details=[{"field": field, "message": "no trusted keys", "code": "no_keys"}],
        )
    try:
        verify_release(
            trusted_keys,
            version=version,
            artifact_digest=artifact_digest,
            components=components,
            signature=signature,
            key_id=key_id,
        )
    except SignatureInvalid as exc:
        raise ReleaseSignatureInvalid(
            f"release {version!r} fails signature verification: {exc}",
            details=[{"field": field, "message": str(exc), "code": exc.reason}],
        ) from None
