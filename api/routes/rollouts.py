"""Rollouts: create and start, list, one rollout."""

from __future__ import annotations

from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from temporalio.exceptions import WorkflowAlreadyStartedError

from api.deps import (
    CursorQuery,
    LimitQuery,
    OperatorDep,
    SessionDep,
    SettingsDep,
    SortQuery,
    ViewerDep,
    get_temporal,
    multi,
)
from api.envelope import ok, page
from api.errors import DependencyUnavailable, ErrorResponses
from core import temporal
from core.db import session_scope
from core.settings import Settings
from models.api import Envelope, ListEnvelope, RolloutCreate, RolloutOut
from models.enums import AuditSource, RolloutStatus
from models.tables import Rollout
from models.workflows import RolloutCounts, RolloutInput
from services import rollouts as service
from services.safety import SafetyDefaults

router = APIRouter(prefix="/rollouts", tags=["rollouts"])
log = structlog.stdlib.get_logger("motorcade.api.rollouts")


def rollout_out(r: Rollout, settings: Settings) -> RolloutOut:
    assert r.id is not None
    return RolloutOut(
        id=r.id,
        name=r.name,
        release_version=r.release_version,
        status=r.status,  # type: ignore[arg-type]
        status_reason=r.status_reason,
        stage=r.stage,
        stage_index=r.stage_index,
        stage_count=r.stage_count,
        waiting_for=r.waiting_for,
        targets=r.targets or {},
        strategy=r.strategy or {},
        gates=r.gates or {},
        timeouts=r.timeouts or {},
        retry=r.retry or {},
        progress=RolloutCounts(
            targeted=r.targeted,
            notified=r.notified,
            updating=r.updating,
            succeeded=r.succeeded,
            failed=r.failed,
            blocked=r.blocked,
            pending=r.pending,
        ),
        workflow_id=r.workflow_id,
        temporal_ui_url=(
            temporal.temporal_ui_link(
                settings.temporal_ui_url, settings.temporal_namespace, r.workflow_id
            )
            if r.workflow_id
            else None
        ),
        created_by=r.created_by,
        created_at=r.created_at,
        updated_at=r.updated_at,
        started_at=r.started_at,
        finished_at=r.finished_at,
    )


@router.post(
    "",
    status_code=201,
    response_model=Envelope[RolloutOut],
    summary="Create a rollout and start its workflow",
    responses=ErrorResponses.write,
)
async def create_rollout(
    request: Request,
    body: RolloutCreate,
    principal: OperatorDep,
    session: SessionDep,
    settings: SettingsDep,
) -> Any:
    """Stores the rollout, commits, then starts workflow `rollout-{id}` on task queue
    `motorcade-rollouts`. If Temporal cannot be reached the rollout is marked `failed`
    (`WORKFLOW_START_FAILED`) and the answer is 503 with `Retry-After`."""
    actor = service.Actor(
        subject=principal.subject,
        role=principal.role.value,
        source=AuditSource.API,
        correlation_id=request.state.request_id,
    )
    rollout = await service.create_rollout(
        session,
        body=body,
        actor=actor,
        scope=principal.scope,
        safety_defaults=SafetyDefaults(
            require_stationary=settings.safety_require_stationary,
            min_battery_percent=settings.safety_min_battery_percent,
        ),
    )
    await session.commit()  # the workflow starts only once the row it refers to is durable
    await session.refresh(rollout)
    assert rollout.id is not None and rollout.workflow_id is not None
    try:
        client = await get_temporal(request)
        await client.start_workflow(
            temporal.ROLLOUT_WORKFLOW_TYPE,
            RolloutInput(
                rollout_id=rollout.id,
                release_version=rollout.release_version,
                correlation_id=actor.correlation_id,
            ),
            id=rollout.workflow_id,
            task_queue=temporal.ROLLOUT_TASK_QUEUE,
            search_attributes=temporal.initial_search_attributes(
                rollout_id=rollout.id,
                release_version=rollout.release_version,
                status=RolloutStatus.PENDING.value,
            ),
            memo={"correlationId": actor.correlation_id, "createdBy": actor.subject},
        )
    except WorkflowAlreadyStartedError:
        pass
    except Exception as exc:
        log.warning("workflow start failed", rollout_id=rollout.id, error=repr(exc)[:300])
        async with session_scope(request.app.state.sessions) as failed_session:
            await service.mark_start_failed(failed_session, rollout_id=rollout.id, actor=actor)
        raise DependencyUnavailable(
            "the rollout was stored but its workflow could not be started; "
            "it is marked failed (WORKFLOW_START_FAILED): create it again"
        ) from None
    return JSONResponse(
        ok(request, rollout_out(rollout, settings)),
        status_code=201,
        headers={"Location": f"/api/v1/rollouts/{rollout.id}"},
    )


@router.get(
    "",
    response_model=ListEnvelope[RolloutOut],
    summary="List rollouts",
    responses=ErrorResponses.read,
)
async def list_rollouts(
    request: Request,
    principal: ViewerDep,
    session: SessionDep,
    settings: SettingsDep,
    status: Annotated[list[str] | None, Query()] = None,
    release_version: Annotated[list[str] | None, Query(alias="releaseVersion")] = None,
    sort: SortQuery = None,
    cursor: CursorQuery = None,
    limit: LimitQuery = 50,
) -> Any:
    """`sort` is `id`, `createdAt` or `status` (default `-id`: newest first)."""
    rows, next_cursor = await service.list_rollouts(
        session,
        scope=principal.scope,
        statuses=multi(status),
        release_versions=multi(release_version),
        sort=sort,
        cursor=cursor,
        limit=limit,
    )
    return page(
        request,
        [rollout_out(r, settings) for r in rows],
        limit=limit,
        next_cursor=next_cursor,
    )


@router.get(
    "/{rollout_id}",
    response_model=Envelope[RolloutOut],
    summary="One rollout: status, stage, gates, progress, workflow id and Temporal UI link",
    responses=ErrorResponses.read_one,
)
async def get_rollout(
    request: Request,
    principal: ViewerDep,
    session: SessionDep,
    settings: SettingsDep,
    rollout_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
) -> Any:
    rollout = await service.get_rollout(session, scope=principal.scope, rollout_id=rollout_id)
    return ok(request, rollout_out(rollout, settings))
