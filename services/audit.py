"""The audit log: who did what (`Actor`); every write adds an entry in the same transaction as
the write; reading (list, export) inside the caller's scope; retention (the only delete)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypedDict

from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.errors import InvalidInput
from core.logging import redact
from models.enums import AuditSource
from models.scope import Scope
from models.tables import AuditEntry
from services.pagination import (
    Sort,
    keyset,
    split_page,
    timestamp_key,
    where_any_of,
)
from services.scope import audit_entries_in_scope


@dataclass(frozen=True)
class Actor:
    """Who performs a write, for the audit log: the token's subject and role (None for the
    system), where the request came from, and its correlation id."""

    subject: str
    role: str | None
    source: AuditSource
    correlation_id: str | None = None


class AuditScope(TypedDict):
    """What scopes an entry (services/scope.py): the regions, models and orgs it is about."""

    regions: list[str] | None
    models: list[str] | None
    orgs: list[str] | None


def audit_scope(targets: dict[str, Any]) -> AuditScope:
    """The scope of an entry about a target set (a rollout, a desired state): its regions,
    models and orgs."""
    return AuditScope(
        regions=list(targets.get("regions") or []) or None,
        models=list(targets.get("models") or []) or None,
        orgs=list(targets.get("orgs") or []) or None,
    )


async def record(
    session: AsyncSession,
    *,
    actor: Actor,
    action: str,
    target_type: str,
    target_id: str | None,
    result: str = "ok",
    reason: str | None = None,
    payload: dict[str, Any] | None = None,
    regions: list[str] | None = None,
    models: list[str] | None = None,
    orgs: list[str] | None = None,
) -> AuditEntry:
    """Add an entry (and its `audit.created` change-feed row) in the caller's transaction;
    reason and payload are redacted first."""
    entry = AuditEntry(
        actor=actor.subject,
        role=actor.role,
        source=actor.source.value,
        action=action,
        target_type=target_type,
        target_id=target_id,
        reason=redact(reason),
        correlation_id=actor.correlation_id,
        payload=redact(payload or {}),
        result=result,
        regions=regions or None,
        models=models or None,
        orgs=orgs or None,
    )
    session.add(entry)
    await session.flush()
    # Its `audit.created` change-feed row, in the same transaction (services/stream.py scopes
    # it by `scope`: the entry's regions, models and orgs).
    await (await session.connection()).execute(_PUBLISH, {"id": entry.id})
    return entry


async def record_write(
    session: AsyncSession,
    *,
    actor: Actor,
    action: str,
    target_type: str,
    target_id: str,
    reason: str | None,
    payload: dict[str, Any],
    acknowledgement: dict[str, Any] | None,
    targets: dict[str, Any],
) -> None:
    """The audit entry of a write to a target set and, when it weakened the safety policy,
    the audited acknowledgement (`<noun>.safety_weakened`), both scoped like its targets."""
    entries = [(action, payload)]
    if acknowledgement:
        entries.append((action.split(".")[0] + ".safety_weakened", acknowledgement))
    for entry_action, entry_payload in entries:
        await record(
            session,
            actor=actor,
            action=entry_action,
            target_type=target_type,
            target_id=target_id,
            reason=reason,
            payload=entry_payload,
            **audit_scope(targets),
        )


_PUBLISH = text(
    """
    INSERT INTO change_feed (topic, event, entity_id, payload)
    SELECT 'audit', 'audit.created', a.id::text, jsonb_build_object(
        'id', a.id, 'at', a.at, 'actor', a.actor, 'role', a.role, 'source', a.source,
        'action', a.action, 'targetType', a.target_type, 'targetId', a.target_id,
        'reason', a.reason, 'correlationId', a.correlation_id, 'payload', a.payload,
        'result', a.result,
        'scope', jsonb_build_object('regions', to_jsonb(a.regions), 'models', to_jsonb(a.models),
                                    'orgs', to_jsonb(a.orgs)))
    FROM audit_log a WHERE a.id = :id
    """
)


# --- Reading -------------------------------------------------------------------------------

AUDIT_SORT = Sort(timestamp_key("at", col(AuditEntry.at)), descending=True)


@dataclass(frozen=True)
class AuditFilters:
    """SPEC.md filters of `GET /audit-log` (each list: any of its values); checked when built,
    so a bad time range is refused before a page is read or an export has begun."""

    actors: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    target_types: list[str] = field(default_factory=list)
    target_ids: list[str] = field(default_factory=list)
    since: datetime | None = None  # `from`, inclusive
    until: datetime | None = None  # `to`, exclusive

    def __post_init__(self) -> None:
        for name, value in (("from", self.since), ("to", self.until)):
            if value is not None and value.tzinfo is None:
                raise InvalidInput(
                    f"{name} needs a time zone (for example 2026-11-28T10:00:00Z)",
                    details=[{"field": name, "message": "an RFC 3339 time with a zone"}],
                )
        if self.since and self.until and self.since >= self.until:
            raise InvalidInput(
                "from must be before to",
                details=[{"field": "from", "message": "earlier than to"}],
            )


def _select(scope: Scope, filters: AuditFilters) -> Any:
    """Entries inside the caller's scope matching the filters. An entry carries the regions,
    models and orgs of its target; a scoped caller sees an entry only when, for each dimension
    it is scoped on, the entry names at least one value and all of them are inside the scope,
    the rule rollouts follow (`services.scope`): an entry about a
    rollout the caller cannot see is not visible either. An entry about nothing scoped (a
    release, the fleet) is outside every scope."""
    stmt = select(AuditEntry).where(*audit_entries_in_scope(scope))
    stmt = where_any_of(
        stmt,
        (col(AuditEntry.actor), filters.actors),
        (col(AuditEntry.action), filters.actions),
        (col(AuditEntry.target_type), filters.target_types),
        (col(AuditEntry.target_id), filters.target_ids),
    )
    if filters.since is not None:
        stmt = stmt.where(col(AuditEntry.at) >= filters.since)
    if filters.until is not None:
        stmt = stmt.where(col(AuditEntry.at) < filters.until)
    return stmt


async def list_entries(
    session: AsyncSession, *, scope: Scope, filters: AuditFilters, cursor: str | None, limit: int
) -> tuple[list[AuditEntry], str | None]:
    """Newest first, keyset on (at, id): each filter narrows an (x, at, id) index range."""
    stmt = keyset(
        _select(scope, filters),
        sort=AUDIT_SORT,
        id_column=col(AuditEntry.id),
        id_kind="int",
        cursor=cursor,
        limit=limit,
    )
    rows = list((await session.exec(stmt)).all())
    return split_page(
        rows, sort=AUDIT_SORT, limit=limit, value_of=lambda e: e.at, id_of=lambda e: e.id
    )


async def iter_entries(
    sessions: async_sessionmaker[AsyncSession],
    *,
    scope: Scope,
    filters: AuditFilters,
    batch: int = 1000,
) -> AsyncIterator[AuditEntry]:
    """Every matching entry, newest first, read in keyset batches of `batch`, each in its own
    short transaction: an export of any size holds one batch in memory and no transaction
    open while the client reads."""
    cursor: str | None = None
    while True:
        async with sessions() as session:
            rows, cursor = await list_entries(
                session, scope=scope, filters=filters, cursor=cursor, limit=batch
            )
        for row in rows:
            yield row
        if cursor is None:
            return


# --- Retention -----------------------------------------------------------------------------

# Migration 0007: the trigger on audit_log refuses DELETE unless the transaction set this to
# `on`; only `purge_expired` does. UPDATE is refused always.
PURGE_SETTING = "motorcade.audit_purge"


async def purge_expired(
    sessions: async_sessionmaker[AsyncSession],
    *,
    retention_days: int,
    batch: int = 10_000,
    now: datetime | None = None,
) -> int:
    """Delete entries older than `retention_days` (0: keep forever), oldest first, `batch` at
    a time, each batch its own transaction (`purge_batch`). Returns how many went."""
    if retention_days <= 0:
        return 0
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    total = 0
    while True:
        async with sessions() as session:
            deleted = await purge_batch(session, cutoff=cutoff, batch=batch)
            await session.commit()
        total += deleted
        if deleted < batch:
            return total


async def purge_batch(session: AsyncSession, *, cutoff: datetime, batch: int) -> int:
    """Delete up to `batch` entries older than `cutoff`, oldest first (the `(at, id)` index
    finds them): the only delete of the audit log (a trigger refuses any other DELETE, and
    every UPDATE). The caller commits; idempotent. Returns how many went."""
    conn = await session.connection()
    # The one path allowed to delete (migration 0007): transaction-local, so it ends with
    # this batch's transaction.
    await conn.execute(text("SELECT set_config(:name, 'on', true)"), {"name": PURGE_SETTING})
    result = await conn.execute(
        text(
            "DELETE FROM audit_log WHERE id IN (SELECT id FROM audit_log"
            " WHERE at < :cutoff ORDER BY at, id LIMIT :batch)"
        ),
        {"cutoff": cutoff, "batch": batch},
    )
    return max(result.rowcount or 0, 0)  # type: ignore[attr-defined]
