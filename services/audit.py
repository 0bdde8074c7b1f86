"""The audit log: every write adds an entry in the same transaction as the write."""

from __future__ import annotations

from typing import Any

from sqlmodel.ext.asyncio.session import AsyncSession

from core.logging import redact
from models.enums import AuditSource
from models.tables import AuditEntry


async def record(
    session: AsyncSession,
    *,
    actor: str,
    role: str | None,
    source: AuditSource,
    action: str,
    target_type: str,
    target_id: str | None,
    result: str = "ok",
    reason: str | None = None,
    correlation_id: str | None = None,
    payload: dict[str, Any] | None = None,
    regions: list[str] | None = None,
    models: list[str] | None = None,
    orgs: list[str] | None = None,
) -> AuditEntry:
    entry = AuditEntry(
        actor=actor,
        role=role,
        source=source.value,
        action=action,
        target_type=target_type,
        target_id=target_id,
        reason=reason,
        correlation_id=correlation_id,
        payload=redact(payload or {}),
        result=result,
        regions=regions or None,
        models=models or None,
        orgs=orgs or None,
    )
    session.add(entry)
    await session.flush()
    return entry
