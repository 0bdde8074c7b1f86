"""The audit log (SPEC.md, Audit): the list and the NDJSON export, inside the caller's scope."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from api.deps import CursorQuery, LimitQuery, SessionDep, ViewerDep, multi
from api.envelope import page
from api.errors import ErrorResponses
from models.api import AuditEntryOut, ListEnvelope, ZonedDateTime
from models.tables import AuditEntry
from services import audit as service

router = APIRouter(prefix="/audit-log", tags=["audit"])

ActorQuery = Annotated[list[str] | None, Query(description="Repeatable or comma-separated.")]
FromQuery = Annotated[
    ZonedDateTime | None,
    Query(alias="from", description="Entries at or after (ISO-8601 with a zone)."),
]
ToQuery = Annotated[
    ZonedDateTime | None, Query(alias="to", description="Entries before (ISO-8601 with a zone).")
]


def audit_out(e: AuditEntry) -> AuditEntryOut:
    return AuditEntryOut(
        id=int(e.id or 0),
        at=e.at,
        actor=e.actor,
        role=e.role,
        source=e.source,
        action=e.action,
        target_type=e.target_type,
        target_id=e.target_id,
        reason=e.reason,
        correlation_id=e.correlation_id,
        payload=e.payload or {},
        result=e.result,
    )


def audit_filters(
    actor: ActorQuery = None,
    action: ActorQuery = None,
    target_type: Annotated[list[str] | None, Query(alias="targetType")] = None,
    target_id: Annotated[list[str] | None, Query(alias="targetId")] = None,
    since: FromQuery = None,
    until: ToQuery = None,
) -> service.AuditFilters:
    """The list's and the export's filters (one dependency serves both)."""
    return service.AuditFilters(
        actors=multi(actor),
        actions=multi(action),
        target_types=multi(target_type),
        target_ids=multi(target_id),
        since=since,
        until=until,
    )


FiltersDep = Annotated[service.AuditFilters, Depends(audit_filters)]


@router.get(
    "",
    response_model=ListEnvelope[AuditEntryOut],
    summary="List audit entries, newest first",
    responses=ErrorResponses.read,
)
async def list_audit_log(
    request: Request,
    principal: ViewerDep,
    session: SessionDep,
    filters: FiltersDep,
    cursor: CursorQuery = None,
    limit: LimitQuery = 50,
) -> Any:
    """Keyset on (at, id), newest first. A scoped caller sees only entries about what is
    inside its scope."""
    rows, next_cursor = await service.list_entries(
        session,
        scope=principal.scope,
        filters=filters,
        cursor=cursor,
        limit=limit,
    )
    return page(request, [audit_out(e) for e in rows], limit=limit, next_cursor=next_cursor)


@router.get(
    "/export",
    summary="Export audit entries as NDJSON (streamed), newest first",
    responses={
        200: {
            "description": "One JSON audit entry (as in the list) per line.",
            "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
        },
        **ErrorResponses.read,
    },
    response_class=StreamingResponse,
)
async def export_audit_log(
    request: Request,
    principal: ViewerDep,
    filters: FiltersDep,
) -> StreamingResponse:
    """The same filters and scope as the list, every matching entry, read in keyset batches
    so an export of any size holds one batch in memory."""
    sessions = request.app.state.sessions

    async def lines() -> AsyncIterator[bytes]:
        async for entry in service.iter_entries(sessions, scope=principal.scope, filters=filters):
            body = audit_out(entry).model_dump(mode="json", by_alias=True)
            yield json.dumps(body, separators=(",", ":")).encode() + b"\n"

    return StreamingResponse(
        lines(),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": 'attachment; filename="audit-log.ndjson"'},
    )
