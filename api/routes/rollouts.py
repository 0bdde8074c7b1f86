"""Rollouts: create and start (or plan: `dryRun`), list, one rollout, its vehicles, and the
operator's controls (pause, resume, rollback, abort) through the workflow's `control` Update."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

import structlog
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from api.deps import (
    CursorQuery,
    LimitQuery,
    OperatorDep,
    SessionDep,
    SettingsDep,
    SortQuery,
    ViewerDep,
    actor_of,
    assignment_request,
    get_temporal,
    multi,
)
from api.envelope import ok, ok_json, page, page_json
from api.errors import ErrorResponses
from core import temporal
from core.auth import Principal
from core.db import note_created, unmarked
from core.errors import DependencyUnavailable, InvalidStateTransition
from core.settings import Settings
from models.api import (
    STORED,
    ControlBody,
    ControlOutcome,
    Envelope,
    Gates,
    ListEnvelope,
    PlannedStage,
    RetryPolicy,
    RolloutControlOut,
    RolloutCreate,
    RolloutOut,
    RolloutPlanOut,
    RolloutTargets,
    RolloutVehicleOut,
    Strategy,
    Timeouts,
)
from models.enums import RolloutStatus
from models.tables import Rollout
from models.workflows import ControlRequest, ControlResult, RolloutCounts
from services.rollouts import control, create, queries, status

router = APIRouter(prefix="/rollouts", tags=["rollouts"])
log = structlog.stdlib.get_logger("motorcade.api.rollouts")

RolloutId = Annotated[int, Path(ge=1, le=2**63 - 1)]


M = TypeVar("M", bound=BaseModel)


def _stored(model: type[M], value: dict[str, Any] | None, rollout_id: int) -> M:
    """A rollout's stored JSON (its RolloutCreate part, dumped by alias) as its model. A row
    that no longer validates (a rule made stricter since) is still shown as stored, and
    logged, never a 500."""
    try:
        return model.model_validate(value or {}, context={STORED: True})
    except ValidationError:
        log.warning(
            "stored rollout field does not validate", rollout_id=rollout_id, model=model.__name__
        )
        return model.model_construct(**(value if isinstance(value, dict) else {}))


# The parts of RolloutCreate a rollout row stores as JSON (dumped by alias), typed on reading.
_STORED_PARTS: dict[str, type[BaseModel]] = {
    "targets": RolloutTargets,
    "strategy": Strategy,
    "gates": Gates,
    "timeouts": Timeouts,
    "retry": RetryPolicy,
}


def rollout_out(r: Rollout, settings: Settings) -> RolloutOut:
    assert r.id is not None
    fields = _rollout_fields(r, settings)
    try:  # one validation pass, the stored parts included
        return RolloutOut.model_validate(fields, context={STORED: True})
    except ValidationError:  # a stored part no longer validates: shown as stored, not checked
        for name, model in _STORED_PARTS.items():
            fields[name] = _stored(model, fields[name], r.id)
        return RolloutOut.model_construct(**fields)


def _rollout_fields(r: Rollout, settings: Settings) -> dict[str, Any]:
    """The answer's fields, the stored parts as their JSON."""
    return dict(
        id=r.id,
        name=r.name,
        release_version=r.release_version,
        status=RolloutStatus(r.status),
        status_reason=r.status_reason,
        stage=r.stage,
        stage_index=r.stage_index,
        stage_count=r.stage_count,
        waiting_for=r.waiting_for,
        **{name: getattr(r, name) or {} for name in _STORED_PARTS},
        progress=RolloutCounts(
            targeted=r.targeted,
            notified=r.notified,
            updating=r.updating,
            succeeded=r.succeeded,
            failed=r.failed,
            blocked=r.blocked,
            pending=r.pending,
        ),
        stages=_stages(r),
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


def _stages(r: Rollout) -> list[PlannedStage]:
    """The plan of an expanded rollout (none before its targets are counted, or when its
    stored strategy no longer plans)."""
    return create.rollout_stages(r.targeted, r.strategy) if r.stage_count else []


@router.post(
    "",
    status_code=201,
    response_model=Envelope[RolloutOut],
    summary="Create a rollout and start its workflow (or, with dryRun=true, only plan it)",
    responses={
        200: {"model": Envelope[RolloutPlanOut], "description": "dryRun=true: the plan"},
        **ErrorResponses.create,
    },
)
async def create_rollout(
    request: Request,
    body: RolloutCreate,
    principal: OperatorDep,
    session: SessionDep,
    settings: SettingsDep,
    dry_run: Annotated[
        bool,
        Query(
            alias="dryRun",
            description="Validate and return the plan (200); store and start nothing.",
        ),
    ] = False,
) -> Any:
    """Validates (the release exists and its signature verifies against the trusted keys,
    targets inside the caller's scope, safety policy not weaker than the fleet default unless
    acknowledged, no targeted vehicle inside another active rollout: else 409 `CONFLICT`),
    stores the rollout `pending` (`waitingFor` "its workflow to start"), commits, then tries
    once to start workflow `rollout-{id}` on task queue `motorcade-rollouts`. The committed
    `pending` row is the durable intent to start: 201 with the rollout as stored, whether the
    start went through or not. When Temporal was unreachable or did not answer within 5 s
    (the outcome is ambiguous: the workflow may exist), the answer carries
    `metadata.workflowStart: "pending"` (else `"started"`), a warning is logged, and the
    reconcile Schedule starts it within a minute once its row is older than
    MOTORCADE_ROLLOUT_START_GRACE_SECONDS (30 s). Starting twice is harmless (id conflict
    policy USE_EXISTING, reuse policy REJECT_DUPLICATE): never a second workflow, never a
    doubled rollout; meanwhile its vehicles stay reserved (the overlap check) and it can be
    aborted. So during a Temporal outage this answers 201 and the rollout starts later; only
    a database outage answers 503.

    `?dryRun=true` validates the same way, then answers 200 with the plan: vehicles per
    stage, how many the safety checks would block now, the overlap with active rollouts and
    `canStart`. Nothing is written (no row, no audit entry, no workflow)."""
    assignment = assignment_request(request, principal, settings)
    actor = assignment.actor
    if dry_run:
        plan = await create.plan_rollout_request(session, body=body, request=assignment)
        await session.rollback()  # read-only: nothing to commit
        return JSONResponse(ok(request, plan, dryRun=True), status_code=200)
    rollout = await create.create_rollout(session, body=body, request=assignment)
    note_created(f"/api/v1/rollouts/{rollout.id}")  # a retry's lost answer (idempotency)
    await session.commit()  # the intent to start is durable before the workflow starts
    await session.refresh(rollout)
    assert rollout.id is not None
    started = "started"
    try:
        if not await temporal.start_rollout_workflow(
            await get_temporal(request),
            rollout_id=rollout.id,
            release_version=rollout.release_version,
            correlation_id=actor.correlation_id,
            created_by=actor.subject,
        ):
            # Its workflow id is held by a closed workflow (a Temporal namespace older than
            # this database): never started; the reconcile marks it WORKFLOW_START_FAILED.
            started = "pending"
            log.warning("rollout.workflow_id_taken", rollout_id=rollout.id)
    except Exception as exc:  # ambiguous: the reconcile finishes the start
        started = "pending"
        log.warning(
            "rollout.workflow_start_pending",
            rollout_id=rollout.id,
            error=repr(exc)[:300],
            note="the reconcile starts it after MOTORCADE_ROLLOUT_START_GRACE_SECONDS",
        )
    return JSONResponse(
        ok(request, rollout_out(rollout, settings), workflowStart=started),
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
    rows, next_cursor = await queries.list_rollouts(
        session,
        scope=principal.scope,
        statuses=multi(status),
        release_versions=multi(release_version),
        sort=sort,
        cursor=cursor,
        limit=limit,
    )
    items = [rollout_out(r, settings) for r in rows]
    # Encoded as built, not validated again: a stored part shown as stored (`_stored`) must
    # not turn the page into a 500.
    return page_json(request, items, limit=limit, next_cursor=next_cursor)


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
    rollout_id: RolloutId,
) -> Any:
    rollout = await queries.get_rollout(session, scope=principal.scope, rollout_id=rollout_id)
    return ok_json(request, rollout_out(rollout, settings))  # as list_rollouts


@router.get(
    "/{rollout_id}/vehicles",
    response_model=ListEnvelope[RolloutVehicleOut],
    summary="Per-vehicle state inside a rollout (keyset on vehicle id)",
    responses=ErrorResponses.read_one,
)
async def list_rollout_vehicles(
    request: Request,
    principal: ViewerDep,
    session: SessionDep,
    rollout_id: RolloutId,
    state: Annotated[
        list[str] | None,
        Query(description="planned, notified, updating, succeeded, failed, blocked, ..."),
    ] = None,
    stage: Annotated[list[str] | None, Query(description="canary, wave-1, ...")] = None,
    cursor: CursorQuery = None,
    limit: LimitQuery = 50,
) -> Any:
    """Filters are repeatable or comma-separated. Ordered by vehicle id."""
    rows, next_cursor = await queries.list_rollout_vehicles(
        session,
        scope=principal.scope,
        rollout_id=rollout_id,
        states=multi(state),
        stages=multi(stage),
        cursor=cursor,
        limit=limit,
    )
    items = [
        RolloutVehicleOut(
            vehicle_id=r.target.vehicle_id,
            stage=r.stage_name,
            stage_index=r.target.stage,
            state=r.target.state,
            attempt=r.target.attempt,
            reason_code=r.target.reason_code,
            desired_state_id=str(r.target.desired_state_id) if r.target.desired_state_id else None,
            notified_at=r.target.notified_at,
            updated_at=r.target.updated_at,
            model=r.vehicle.model,
            region=r.vehicle.region,
            ring=r.vehicle.ring,
            vehicle_status=r.vehicle.status,
        )
        for r in rows
    ]
    return page(request, items, limit=limit, next_cursor=next_cursor)


async def _control(
    request: Request,
    principal: Principal,
    session: Any,
    settings: Settings,
    rollout_id: int,
    action: str,
    body: ControlBody,
) -> JSONResponse:
    """Audit the request (committed), then ask the workflow through its `control` Update,
    which carries the marker of that entry (so the workflow does not audit it again); a
    refusal by its validator is 409 INVALID_STATE_TRANSITION, and is audited too.

    The Update's id comes from the request's Idempotency-Key (`temporal.control_update_id`,
    scoped to caller, action and rollout; without a key, a fresh id): a retry of a request
    whose answer was lost (503, a dropped connection) gets the first Update's outcome from
    Temporal, applied once, and writes no second `requested` entry. The commits of that
    bookkeeping do not mark the key executed (`core.db.unmarked`), so such a retry runs.

    An abort of a `pending` rollout whose workflow does not exist (its start is still to
    come) is written here (`status.abort_unstarted`: the row locked, still `pending`); a
    workflow started later finds it `aborted` and ends at once."""
    actor = actor_of(request, principal)
    update_id = temporal.control_update_id(
        action=action,
        rollout_id=rollout_id,
        caller=principal.subject,
        idempotency_key=request.headers.get("idempotency-key"),
    )
    rollout, refusal, marker = await control.request_control(
        session,
        scope=principal.scope,
        rollout_id=rollout_id,
        action=action,
        reason=body.reason,
        actor=actor,
        force=body.force,
        update_id=update_id,
    )
    with unmarked():  # bookkeeping: a retry under the key must still send the Update
        await session.commit()  # the request is on record whatever happens next

    async def outcome(kind: str, result: str, message: str) -> None:
        await control.record_control(
            session,
            rollout=rollout,
            action=action,
            outcome=kind,
            reason=body.reason,
            actor=actor,
            result=result,
            detail={"message": message},
        )
        with unmarked():
            await session.commit()

    if refusal is not None:
        raise InvalidStateTransition(refusal)
    control_request = ControlRequest(
        action=action,  # type: ignore[arg-type]
        reason=body.reason,
        actor=principal.subject,
        correlation_id=actor.correlation_id,
        force=body.force,
        api_marker=marker,
    )
    try:
        try:
            answer = await temporal.control_rollout(
                lambda: get_temporal(request),
                rollout_id=rollout_id,
                request=control_request,
                update_id=update_id,
            )
        except temporal.WorkflowMissing:
            if action != "abort":
                raise
            if await status.abort_unstarted(
                session, rollout_id=rollout_id, actor=actor, reason=body.reason
            ):
                await session.commit()
                log.info("rollout.aborted_before_start", rollout_id=rollout_id)
                answer = ControlResult(action="abort", status=RolloutStatus.ABORTED, paused=False)
            else:  # its workflow started meanwhile (the row is no longer pending): ask it
                with unmarked():  # nothing written: ends the row lock, keeps `rollout`
                    await session.commit()
                answer = await temporal.control_rollout(
                    lambda: get_temporal(request),
                    rollout_id=rollout_id,
                    request=control_request,
                    update_id=update_id,
                )
    except InvalidStateTransition as exc:
        await outcome("rejected", "rejected", exc.message)
        raise
    except temporal.ControlUnanswered as exc:
        log.warning("control update failed", rollout_id=rollout_id, action=action, why=exc.note)
        await outcome("failed", "error", exc.note)
        raise DependencyUnavailable(
            f"the {action} request is recorded but {exc.message}; retry"
        ) from None
    session.expire_all()
    current = await queries.get_rollout(session, scope=principal.scope, rollout_id=rollout_id)
    data = RolloutControlOut(
        rollout=rollout_out(current, settings),
        control=ControlOutcome(action=answer.action, status=answer.status, paused=answer.paused),
    )
    return JSONResponse(ok(request, data), status_code=202)


def _control_route(action: str, summary: str) -> None:
    async def endpoint(
        request: Request,
        body: ControlBody,
        principal: OperatorDep,
        session: SessionDep,
        settings: SettingsDep,
        rollout_id: RolloutId,
    ) -> Any:
        return await _control(request, principal, session, settings, rollout_id, action, body)

    endpoint.__name__ = f"{action}_rollout"
    endpoint.__doc__ = (
        f'Body `{{"reason": "..."}}` (required). The request is audited '
        f"(`rollout.{action}_requested`, source `api`, the caller, the reason, the request id), "
        "then sent to the workflow as its `control` Update. 202 with the rollout and the "
        "workflow's answer once the workflow accepted it; 409 `INVALID_STATE_TRANSITION` at "
        "once when the rollout is finished or the workflow refuses the transition (audited "
        f"as `rollout.{action}_rejected`); 503 when Temporal does not answer. The Update's id "
        "comes from the request's Idempotency-Key: a retry with the "
        "same key gets the first Update's outcome, applied once. "
        + (
            "A `pending` rollout whose workflow has not started is aborted at once (the "
            "workflow, started later, ends without issuing). "
            if action == "abort"
            else ""
        )
        + f"CLI equivalent: `temporal workflow signal --workflow-id rollout-ID --name {action} "
        '--input \'{"reason": "...", "actor": "..."}\'`.'
    )
    router.add_api_route(
        f"/{{rollout_id}}/{action}",
        endpoint,
        methods=["POST"],
        status_code=202,
        response_model=Envelope[RolloutControlOut],
        summary=summary,
        responses=ErrorResponses.control,
        name=f"{action}_rollout",
    )


_control_route("pause", "Pause a rollout: no new vehicles are notified until it resumes")
_control_route("resume", "Resume a paused rollout")
_control_route(
    "rollback", "Roll a rollout back: every touched vehicle returns to its previous state"
)
_control_route("abort", "Abort a rollout: stop issuing; vehicles already notified keep it")
